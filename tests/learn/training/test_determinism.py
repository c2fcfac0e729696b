"""Every model in the registry trains deterministically: same seed, same files."""

from __future__ import annotations

import json

import pytest

from loralens.learn.training.config import TrainConfig
from loralens.learn.training.loop import train
from loralens.models import MODEL_NAMES

TIMING = ("seconds", "train_loras_per_s")  # wall-clock measurements, the only keys allowed to vary


def _written(run) -> tuple[dict, bytes, bytes]:
    metrics = json.loads((run / "metrics.json").read_text())
    for key in TIMING:
        metrics.pop(key)
    return metrics, (run / "predictions.csv").read_bytes(), (run / "model.safetensors").read_bytes()


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_same_seed_gives_identical_metrics_predictions_and_weights(make_store, tmp_path, name):
    store = make_store(tmp_path / "s", n=24, ranks=(2, 3))
    runs = {}
    for run, seed in (("a", 5), ("b", 5), ("other", 6)):
        cfg = TrainConfig(model=name, targets=["y"], seed=seed, epochs=3, plots=False)
        train(store, cfg, tmp_path / run)
        runs[run] = _written(tmp_path / run)
    assert runs["a"][0] == runs["b"][0]
    assert runs["a"][1:] == runs["b"][1:]
    # the seed is used: another seed splits and initializes otherwise
    assert runs["a"][1] != runs["other"][1]
