"""Calibrating a run that predicts with its linear base alone: the base's out-of-fold residuals
over the rows it was fitted on join the held-out calibration LoRAs (CV+), and the intervals
keep their promise on new LoRAs of a synthetic zoo with a known noise level."""

from __future__ import annotations

import numpy as np

from helpers import linear_zoo
from loralens.learn.runs.evaluation import evaluate
from loralens.learn.training.config import TrainConfig
from loralens.learn.training.loop import train

NOISE = 0.3


def test_a_base_only_run_calibrates_on_out_of_fold_residuals_and_covers_new_loras(tmp_path):
    store = linear_zoo(tmp_path / "s", 200, 0)
    config = TrainConfig(
        model="glnet", targets=["y"], epochs=1, lr=1e-9, seed=0, plots=False, interval="plain"
    )
    m = train(store, config, tmp_path / "run")
    cal = m["calibration"]
    assert m["best_epoch"] == 0 and cal["method"] == "split+cv"
    assert cal["n_calibration"] == m["n"]["train"] + m["n"]["val"] + m["n"]["cal"]
    ev = evaluate(tmp_path / "run", linear_zoo(tmp_path / "new", 400, 1))
    rep = ev["calibration"]["report"]
    assert ev["n"] == 400
    assert 0.85 <= rep["coverage"] <= 0.95, rep["coverage"]
    # the ideal interval is +- 1.645 NOISE; the ridge's own error widens it a little
    width = rep["per_target"][0]["width"] / (2 * 1.645 * NOISE)
    assert 0.9 <= width <= 1.5, width
    assert np.isfinite(rep["width_no_weights_rel_std"])
