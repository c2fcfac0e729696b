"""Every path that gives a run its intervals or sets calibrates on rows the final model was not
fitted on, so that ``train`` then ``predict`` covers new LoRAs at the stated level: a seeded
split, a split column with and without ``cal`` rows, a model that is its linear base alone, a
network, and cross-validation of a small store. Coverage is measured through ``predict`` on a
test split no part of the run saw, within a band the numbers of calibration and test LoRAs
explain."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binom

from helpers import linear_zoo
from loralens.learn.runs.folder import load_run
from loralens.learn.training.config import TrainConfig
from loralens.learn.training.loop import run_splits, train

LEVEL = 0.9
#: Rows of the split column: 160 train, 40 val, 60 cal (or train, without), 140 test.
PARTS = ["train"] * 8 + ["val"] * 2 + ["cal"] * 3 + ["test"] * 7


def band(n_cal: int, n_test: int) -> float:
    """Four standard deviations of a test coverage: the calibration quantile's own spread
    (about level (1 - level) / n_cal) plus the binomial spread over the test LoRAs."""
    return 4 * math.sqrt(LEVEL * (1 - LEVEL) * (1 / n_cal + 1 / n_test))


def column(with_cal: bool):
    def split(k: int, y: float) -> dict:
        part = PARTS[k % len(PARTS)]
        return {"split": "train" if part == "cal" and not with_cal else part}

    return split


def covered(run_dir, store, rows, target: str) -> np.ndarray:
    """Whether ``predict``'s interval (or set) holds each of ``rows``' label."""
    preds = load_run(run_dir).predict([store[int(r)] for r in rows])
    y = store.labels([target])[rows, 0]
    if "interval" in preds[0]:
        return np.array(
            [lo <= t <= hi for p, t in zip(preds, y) for lo, hi in [p["interval"][target]]]
        )
    return np.array([int(t) in p["set"][target] for p, t in zip(preds, y)])


def check(metrics: dict, hits: np.ndarray) -> None:
    """Coverage within the band; called calibrated unless the run calibrated on the validation
    rows that also chose its epoch (``val``: optimistic), where it must say which it is."""
    cal = metrics["calibration"]
    coverage = float(np.mean(hits))
    assert cal["test"]["coverage"] == pytest.approx(coverage)  # what the run reports is predict's
    assert abs(coverage - LEVEL) <= band(cal["n_calibration"], len(hits)), (cal, coverage)
    n = len(hits)
    failed = bool(binom.cdf(round(coverage * n), n, LEVEL) < 0.01)
    assert cal["calibrated"] is (not failed) and bool(cal["problems"]) is failed
    assert cal["calibrated"] or cal["method"] == "val", cal


BASE_ALONE = {"epochs": 1, "lr": 1e-9}  # the base alone wins: no epoch trains anything
NETWORK = {"linear_base": "none", "epochs": 30}


CASES = {
    "cal-base": (True, BASE_ALONE, "split+cv"),
    "nocal-base": (False, BASE_ALONE, "cv"),
    "cal-network": (True, NETWORK, "split"),
    "nocal-network": (False, NETWORK, "val"),
}


# classification with the base alone calibrates the same way as regression (its five logistic
# refits take minutes): its sets are checked with a network
@pytest.mark.parametrize(
    ("target", "case"),
    [("y", case) for case in CASES] + [("c", "cal-network"), ("c", "nocal-network")],
)
def test_a_split_column_calibrates_on_rows_no_fit_saw_and_covers_its_test_split(
    tmp_path, target, case
):
    with_cal, model, method = CASES[case]
    store = linear_zoo(tmp_path / "s", 400, 0, extra=column(with_cal))
    config = TrainConfig(
        model="glnet", targets=[target], seed=0, plots=False, probes=False, **model
    )
    m = train(store, config, tmp_path / "run")
    assert m["calibration"]["method"] == method
    test = np.flatnonzero(store.index["split"].to_numpy() == "test")
    check(m, covered(tmp_path / "run", store, test, target))


@pytest.mark.parametrize("model", [BASE_ALONE, NETWORK], ids=["base", "network"])
def test_a_seeded_split_holds_calibration_rows_out_and_covers_its_test_split(tmp_path, model):
    store = linear_zoo(tmp_path / "s", 400, 0)
    config = TrainConfig(
        model="glnet",
        targets=["y"],
        seed=0,
        plots=False,
        probes=False,
        fractions=(0.45, 0.1, 0.45),
        **model,
    )
    m = train(store, config, tmp_path / "run")
    assert m["calibration"]["method"] == ("split+cv" if model is BASE_ALONE else "split")
    _, (split,) = run_splits(store, config, store.labels(["y"]))
    assert len(split["cal"]) == 40
    check(m, covered(tmp_path / "run", store, split["test"], "y"))


def test_a_small_store_calibrates_out_of_fold_and_covers_new_loras(tmp_path):
    store = linear_zoo(tmp_path / "s", 50, 0)
    config = TrainConfig(model="glnet", targets=["y"], seed=0, plots=False, probes=False)
    m = train(store, config, tmp_path / "run")
    assert m["calibration"]["method"] == "cross"
    new = linear_zoo(tmp_path / "new", 300, 1)
    hits = covered(tmp_path / "run", new, np.arange(300), "y")
    assert abs(np.mean(hits) - LEVEL) <= band(50, 300), np.mean(hits)
