"""The coverage benchmark's split columns and its count of covered labels."""

import pandas as pd

from split_coverage import KINDS, covered, split_labels


def test_split_columns_are_seeded_permutations_in_the_stated_shares(tmp_path):
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    pd.DataFrame({"adapter": [f"{k:03d}" for k in range(50)], "y": range(50)}).to_csv(
        zoo / "labels.csv", index=False
    )
    labels = pd.read_csv(split_labels(zoo, 2, tmp_path / "l.csv"), dtype={"adapter": str})
    for kind, parts in KINDS.items():
        for seed in range(2):
            counts = labels[f"{kind}_s{seed}"].value_counts().to_dict()
            assert counts == {name: round(share * 50) for name, share in parts}
        assert (labels[f"{kind}_s0"] != labels[f"{kind}_s1"]).any()


def test_a_label_on_an_interval_edge_or_in_a_set_is_covered():
    truth = {"a": 1.0, "b": 3.0, "c": 1.0}
    rows = [
        {"adapter": "/x/a", "interval": {"y": [0.5, 1.0]}},
        {"adapter": "/x/b", "interval": {"y": [0.5, 2.0]}},
    ]
    assert covered(rows, truth, "y") == [True, False]
    sets = [{"adapter": "c", "interval": None, "set": {"y": [0, 1]}}]
    assert covered(sets, truth, "y") == [True]
