"""Which rows a run uses: ``--where`` selects them, unlabelled rows are left out, and a store's
``split`` column decides train/val/test."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from loralens.cli import app
from loralens.learn.fitting.data import split_rows

runner = CliRunner()


def _ok(result):
    assert result.exit_code == 0, result.output
    return result


def test_where_selects_the_rows_train_uses(make_store, tmp_path):
    # every 7th LoRA has no label: it is never used, --where or not
    store = make_store(
        tmp_path / "s", n=50, ranks=(2, 3), extra=lambda k, s: {"z": None if k % 7 == 0 else s}
    )
    index = store.index
    chosen = set(index["id"][(index["rank"] == 3) & index["z"].notna()])
    assert 15 < len(chosen) < 25
    cmd = ["train", "--data", str(store.path), "--target", "z", "--model", "mlp-svd"]
    _ok(
        runner.invoke(
            app,
            [
                *cmd,
                "--out",
                str(tmp_path / "run"),
                "--epochs",
                "1",
                "--where",
                "rank == 3",
                "--quiet",
            ],
        )
    )
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["cv"]["folds"] == 5  # under 60 LoRAs: every chosen one tested once, out of fold
    assert metrics["n"]["test"] == len(chosen)
    ids = pd.read_csv(tmp_path / "run" / "predictions.csv", dtype={"id": str})["id"]
    assert set(ids) == chosen and len(ids) == metrics["n"]["test"]


def test_where_that_is_no_query_says_so(make_store, tmp_path):
    store = make_store(tmp_path / "s", n=12)
    cmd = ["train", "--data", str(store.path), "--target", "y", "--out", str(tmp_path / "r")]
    res = runner.invoke(app, [*cmd, "--where", "rank ==="])
    assert res.exit_code == 1 and "--where" in res.output


def test_split_column_decides_the_split(make_store, tmp_path):
    names = {0: "test", 1: "valid", 2: "train", 3: "train"}  # "valid" is accepted for val
    store = make_store(tmp_path / "s", n=24, extra=lambda k, s: {"split": names[k % 4]})
    cmd = ["train", "--data", str(store.path), "--target", "y", "--model", "glnet"]
    _ok(runner.invoke(app, [*cmd, "--out", str(tmp_path / "run"), "--epochs", "1", "--quiet"]))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["n"] == {"train": 12, "val": 6, "test": 6}
    ids = pd.read_csv(tmp_path / "run" / "predictions.csv", dtype={"id": str})["id"]
    assert sorted(ids) == [f"x{k:03d}" for k in range(0, 24, 4)]


def test_splits_are_deterministic_and_disjoint():
    a, b = split_rows(100, seed=3), split_rows(100, seed=3)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert [len(a[k]) for k in ("train", "val", "test")] == [80, 10, 10]
    assert len(np.unique(np.concatenate(list(a.values())))) == 100
    assert not np.array_equal(split_rows(100, seed=4)["test"], a["test"])
    s = split_rows(0, split_column=["train", "test", "valid", "train"])
    assert s["val"].tolist() == [2] and s["test"].tolist() == [1]
    with pytest.raises(ValueError):
        split_rows(0, split_column=["train", "holdout"])
