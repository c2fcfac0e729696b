"""What ``predict`` gives after ``train``, checked against computations independent of it: a
classification run's probabilities are the sigmoid of its raw logit divided by the temperature
it stores, a temperature that makes its test split's log loss better, not worse; regression
predictions are clipped to the range of the labels the run learned from (train + val), not to
the test labels' range, and never left unclipped."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

import loralens as ll
from helpers import linear_zoo
from loralens.cli import app
from loralens.errors import LoRALensWarning
from loralens.learn.runs.evaluation import evaluate
from loralens.learn.runs.folder import load_run
from loralens.learn.training.config import TrainConfig
from loralens.learn.training.loop import train
from loralens.lora import collate

PARTS = ["train"] * 8 + ["val"] * 2 + ["cal"] * 3 + ["test"] * 7


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _log_loss(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(p, 1e-12, 1 - 1e-12)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def _scaled(lora: ll.LoRA, factor: float) -> ll.LoRA:
    return ll.LoRA([ll.LoRALayer(x.name, x.U * factor, x.V) for x in lora.layers])


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory):
    """A network trained long on noisy labels: over-confident, so its temperature is far from 1."""
    root = tmp_path_factory.mktemp("temperature")
    store = linear_zoo(root / "s", 400, 0, noise=1.0, extra=lambda k, y: {"split": PARTS[k % 20]})
    config = TrainConfig(
        model="glnet",
        targets=["c"],
        seed=0,
        plots=False,
        probes=False,
        linear_base="none",
        epochs=30,
    )
    train(store, config, root / "run")
    return store, root / "run"


def test_probabilities_are_the_raw_logit_over_the_stored_temperature(cls_run):
    store, run_dir = cls_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    temperature = metrics["calibration"]["temperature"][0]
    assert abs(np.log(temperature)) > 0.2, temperature  # else this test could tell nothing
    test = np.flatnonzero(store.index["split"].to_numpy() == "test")
    loras = [store[int(r)] for r in test]
    run = load_run(run_dir)
    prob = np.array([row["probability"]["c"] for row in run.predict(loras)])
    logit = run.raw(collate(loras).pad_to(run.spec.ranks))[:, 0].astype(np.float64)
    np.testing.assert_allclose(prob, _sigmoid(logit / temperature), rtol=1e-5, atol=1e-6)
    y = store.labels(["c"])[test, 0]
    assert _log_loss(_sigmoid(logit / temperature), y) < _log_loss(_sigmoid(logit), y)


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    """A linear run whose test split holds the largest labels: the range it learned is below,
    so its intervals cannot cover them, and ``train`` warns so."""
    root = tmp_path_factory.mktemp("clip")
    store = linear_zoo(root / "s", 300, 0, noise=0.1, extra=lambda k, y: {"split": _part(k, y)})
    config = TrainConfig(model="glnet", targets=["y"], seed=0, plots=False, probes=False)
    with pytest.warns(LoRALensWarning, match="fails its check on the test split") as caught:
        train(store, config, root / "run")
    assert len([w for w in caught if issubclass(w.category, LoRALensWarning)]) == 1
    return (
        store,
        root / "run",
        np.array([_part(k, y) for k, y in enumerate(store.labels(["y"])[:, 0])]),
    )


def _part(k: int, y: float) -> str:
    return "test" if y > 0.5 else ("val" if k % 4 == 3 else "train")


@pytest.mark.parametrize("factor", [10.0, -10.0])
def test_predictions_are_clipped_to_the_range_of_the_labels_the_run_learned_from(clip_run, factor):
    store, run_dir, split = clip_run
    y = store.labels(["y"])[:, 0]
    seen = y[split != "test"]
    assert y.max() > seen.max() + 0.1  # the test labels reach beyond what the run learned from
    top = store[int(np.argmax(np.where(split == "test", -np.inf, y)))]
    (row,) = load_run(run_dir).predict(_scaled(top, factor))
    edge = seen.max() if factor > 0 else seen.min()
    assert row["prediction"]["y"] == pytest.approx(edge)


def test_a_run_that_failed_its_check_is_never_called_calibrated_and_knows_its_training_loras(
    clip_run, tmp_path
):
    store, run_dir, split = clip_run
    cal = json.loads((run_dir / "metrics.json").read_text())["calibration"]
    assert cal["test"]["coverage"] < 0.5 and cal["calibrated"] is False
    assert cal["problems"] and "y: its 90% intervals held for only" in cal["problems"][0]
    test, trained = (
        int(np.flatnonzero(split == "test")[0]),
        int(np.flatnonzero(split == "train")[0]),
    )
    ll.save_lora(store[test], tmp_path / "a")
    ll.save_lora(store[trained], tmp_path / "b")
    args = ["predict", str(run_dir), str(tmp_path / "a"), str(tmp_path / "b")]
    res = CliRunner().invoke(app, [*args, "--json"])
    assert res.exit_code == 0, res.output
    new, seen = json.loads(res.stdout)
    assert new["calibrated"] is False and new["interval"] is not None
    assert new["run"]["calibrated"] is False and new["run"]["problems"] == cal["problems"]
    best_epoch = json.loads((run_dir / "metrics.json").read_text())["best_epoch"]
    assert new["run"]["predictor"] == ("linear base alone" if best_epoch == 0 else "network")
    assert (new["seen"], seen["seen"]) == (False, True)  # the run trained on the second
    res = CliRunner().invoke(app, args)
    assert "NOT calibrated" in res.output and "trained on it" in res.output
    assert evaluate(run_dir, store)["calibration"]["calibrated"] is False
