"""Small stores, said out loud: refusal, cross-validation, stratified splits, seen LoRAs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from loralens.learn.fitting.data import class_strata, make_splits, select_rows
from loralens.learn.runs.evaluation import evaluate
from loralens.learn.runs.folder import load_run
from loralens.learn.training.config import TrainConfig
from loralens.learn.training.loop import train
from loralens.store import StoreError


def test_too_few_loras_refused(tmp_path, make_store):
    store = make_store(tmp_path / "s", n=9)
    with pytest.raises(StoreError, match="too few to train and measure"):
        train(store, TrainConfig("mlp", ["y"], epochs=1), None)


def test_fourteen_loras_cross_validate_and_predict(tmp_path, make_store):
    store = make_store(tmp_path / "s", n=14)
    m = train(store, TrainConfig("mlp", ["y"], epochs=3, plots=False), tmp_path / "run")
    assert m["cv"]["folds"] == 5 and m["n"]["test"] == 14  # every LoRA tested once
    assert m["test"]["r2"] is not None and m["test_std"]["r2"] is not None
    assert len(m["cv"]["test_per_fold"]) == 5
    run = load_run(tmp_path / "run")
    pred = run.predict_loras([store[0], store[1]])  # the refit model predicts
    assert pred.shape == (2, 1) and np.isfinite(pred).all()
    out = evaluate(run, store)
    assert out["n_seen"] == 14 and "training-set metrics" in out["warnings"][0]


def test_classification_splits_hold_both_classes(tmp_path, make_store):
    """48 LoRAs, a rare class (5 of 48): every split of the holdout and every CV test fold
    that can hold it does."""
    store = make_store(tmp_path / "s", n=48, extra=lambda k, s: {"rare": int(k % 10 == 3)})
    y = store.labels(["rare"])
    assert int(np.nansum(y)) == 5
    rows = select_rows(store, None)
    for seed in range(5):
        (split,) = make_splits(store, rows, y, seed, classification=True, folds=1)
        for part in ("train", "val", "test"):
            assert set(y[split[part], 0]) == {0.0, 1.0}, (seed, part)
        folds = make_splits(store, rows, y, seed, classification=True)
        assert len(folds) == 5
        assert sum(y[f["test"], 0].sum() for f in folds) == 5
        assert all(y[f["test"], 0].sum() >= 1 for f in folds)
        assert all(set(y[f["val"], 0]) == {0.0, 1.0} for f in folds)
    assert class_strata(y).tolist() == y[:, 0].astype(int).tolist()


def test_classification_auroc_defined_on_48_loras(tmp_path, make_store):
    store = make_store(tmp_path / "s", n=48, extra=lambda k, s: {"rare": int(k % 10 == 3)})
    m = train(store, TrainConfig("mlp", ["rare"], epochs=2, plots=False), None)
    assert m["test"]["auroc"] is not None  # no fold test set with one class only


def test_one_split_prints_no_zero_spread(tmp_path, make_store):
    from typer.testing import CliRunner

    from loralens.cli import app

    store = make_store(tmp_path / "s", n=80)
    res = CliRunner().invoke(
        app,
        ["train", "--data", str(store.path), "--target", "y", "--model", "mlp", "--epochs", "2",
         "--out", str(tmp_path / "r"), "--quiet"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "±" not in res.output and "probe: spectral" in res.output  # one split: no spread


def test_evaluate_leaves_out_seen_loras(tmp_path, make_store):
    store = make_store(tmp_path / "s", n=80)
    m = train(store, TrainConfig("mlp", ["y"], epochs=2, plots=False), tmp_path / "run")
    out = evaluate(tmp_path / "run", store)
    assert out["n_seen"] == m["n"]["train"] + m["n"]["val"] + m["n"]["cal"]  # cal: seen too
    assert out["n"] == m["n"]["test"]
    assert f"{out['n_seen']} of 80 LoRAs were used to train" in out["warnings"][0]
    rec = json.loads((tmp_path / "run" / "trained_on.json").read_text())
    assert len(rec["hashes"]) == out["n_seen"]
    # a copy of the store under other ids is matched by content
    other = make_store(tmp_path / "copy", n=80)
    assert evaluate(tmp_path / "run", other)["n_seen"] == out["n_seen"]
