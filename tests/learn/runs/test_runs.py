"""Run directories and inference: a reloaded run reproduces what training wrote, ``evaluate``
scores the outputs of the LoRAs it names, and predicting from files equals predicting from
the store (mixed ranks included)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

import loralens as ll
from loralens.cli import app
from loralens.learn.runs.evaluation import evaluate
from loralens.learn.runs.folder import load_run
from loralens.learn.training.config import TrainConfig
from loralens.learn.training.loop import train
from loralens.store import LoRAStore

runner = CliRunner()


def _ok(result):
    assert result.exit_code == 0, result.output
    return result


def _r2(pred: np.ndarray, y: np.ndarray) -> float:
    return float(1 - ((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum())


def test_reloaded_run_reproduces_predictions_csv_and_test_metrics(make_store, tmp_path):
    store = make_store(tmp_path / "s", n=60)
    cfg = TrainConfig(model="glnet", targets=["y"], epochs=40, patience=3, lr=3e-2, plots=False)
    metrics = train(store, cfg, tmp_path / "run")
    # the state kept must not be the last one, else restoring the best is not being tested
    assert metrics["best_epoch"] < metrics["epochs_run"]
    saved = pd.read_csv(tmp_path / "run" / "predictions.csv", dtype={"id": str})
    run = load_run(tmp_path / "run")
    rows = [store.row_of(i) for i in saved["id"]]
    got = run.predict_loras([store[r] for r in rows])[:, 0]
    np.testing.assert_allclose(got, saved["y_pred"], rtol=1e-5, atol=1e-6)
    y = store.labels(["y"])[rows, 0]
    np.testing.assert_allclose(saved["y_true"], y)
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written["test"]["r2"] == pytest.approx(_r2(got, y), rel=1e-5, abs=1e-6)
    tau = stats.kendalltau(got, y).statistic
    assert written["test"]["kendall_tau"] == pytest.approx(tau, rel=1e-5, abs=1e-6)
    assert written["n"]["test"] == len(rows)


@pytest.mark.parametrize("target", ["y", "c"])
def test_evaluate_equals_metrics_of_predict_on_the_same_rows(make_store, tmp_path, target):
    store = make_store(tmp_path / "s", n=40)
    cfg = TrainConfig(model="mlp-svd", targets=[target], epochs=4, plots=False)
    train(store, cfg, tmp_path / "run")
    run = load_run(tmp_path / "run")
    ev = evaluate(run, store, where="y > 0.5")
    rows = np.flatnonzero(store.labels(["y"])[:, 0] > 0.5)
    assert 10 < len(rows) < len(store) and ev["n"] == len(rows)
    pred = run.predict_loras([store[r] for r in rows])[:, 0]
    truth = store.labels([target])[rows, 0]
    got = ev["metrics"]
    if target == "y":
        assert got["r2"] == pytest.approx(_r2(pred, truth), rel=1e-5, abs=1e-6)
        assert got["kendall_tau"] == pytest.approx(stats.kendalltau(pred, truth).statistic)
        assert got["spearman"] == pytest.approx(stats.spearmanr(pred, truth).statistic)
        # an error near zero compared at the scale of the labels, not relative to itself
        mse = float(np.mean((pred - truth) ** 2))
        assert got["mse"] == pytest.approx(mse, abs=1e-6 * float(np.var(truth)))
    else:
        assert ev["task"] == "classification"
        assert got["accuracy"] == pytest.approx(float(np.mean((pred >= 0.5) == (truth == 1))))
        assert got["auroc"] == pytest.approx(roc_auc_score(truth, pred), rel=1e-6)


@pytest.mark.parametrize("model", ["glnet", "mlp"])
def test_predict_from_files_equals_predict_from_the_store(make_peft_zoo, tmp_path, model):
    """Rank-2 and rank-4 PEFT folders in one store; rank-2 adapters are zero-padded to the
    model's rank 4 at prediction, which must change nothing (checked against the store's rows
    and against the same LoRA padded by hand)."""
    zoo = make_peft_zoo(tmp_path / "zoo", n=24, ranks=(4, 2))
    _ok(runner.invoke(app, ["pack", str(zoo), "--out", str(tmp_path / "s")]))
    args = ["--data", str(tmp_path / "s"), "--target", "quality", "--model", model]
    _ok(
        runner.invoke(
            app, ["train", *args, "--out", str(tmp_path / "run"), "--epochs", "2", "--quiet"]
        )
    )
    store, run = LoRAStore(tmp_path / "s"), load_run(tmp_path / "run")
    names = [f"a{k:03d}" for k in range(6)]
    files = [str(zoo / "adapters" / n) for n in names]
    rows = [store.row_of(n) for n in names]
    assert sorted(set(store.ranks[rows].max(axis=1).tolist())) == [2, 4]
    assert list(run.spec.ranks) == [4, 4, 4, 4]
    from_store = run.task.decode(run.raw(store.batch(rows, pad_ranks=run.spec.ranks)))[:, 0]
    # one batch of mixed ranks, and one adapter per batch (a rank-2 batch padded to rank 4)
    for batch_size in ("64", "1"):
        cmd = ["predict", str(tmp_path / "run"), *files, "--json", "--batch-size", batch_size]
        out = json.loads(_ok(runner.invoke(app, cmd)).stdout)
        from_files = np.array([row["prediction"]["quality"] for row in out])
        np.testing.assert_allclose(from_files, from_store, rtol=1e-5, atol=1e-6)
    # the rank-2 adapter a001 padded by hand with zero columns: the same prediction
    lora = ll.load_lora(files[1])
    padded = ll.LoRA(
        [
            ll.LoRALayer(
                la.name,
                torch.cat([la.U, torch.zeros_like(la.U)], 1),
                torch.cat([la.V, torch.zeros_like(la.V)], 1),
            )
            for la in lora.layers
        ]
    )
    assert padded.ranks == [4, 4, 4, 4]
    np.testing.assert_allclose(
        run.predict_loras([padded])[0, 0], from_files[1], rtol=1e-5, atol=1e-6
    )
