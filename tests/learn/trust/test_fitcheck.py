"""The fit check's distribution layer on synthetic LoRAs whose update size depends on their
direction (as a learning rate sets both): a LoRA scaled by 10 or 0.1 is flagged by the scale
score where the norm range cannot see it, the two scores together flag about the chosen share
of in-distribution LoRAs, and the scale-free features ignore a LoRA's scale."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from helpers import random_lora
from loralens.learn.trust.fitcheck import FitCheck, FitInputs, out_of_fold_scores
from loralens.lora import collate
from loralens.models.linear_base import unit_features

NAMES = ["l0", "l1", "l2"]
U_DIM, E_DIM = 24, 20


def _loras(n: int, seed: int) -> FitInputs:
    """``n`` in-distribution LoRAs: a unit direction u, an embedding read from it, and a log
    update size set by the direction (spanning e^6, about 400x) plus small noise per layer."""
    rng = np.random.default_rng(seed)
    u = rng.standard_normal((n, U_DIM))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    w = np.random.default_rng(99).standard_normal(U_DIM)
    size = 3.0 * np.tanh(u @ w)  # log RMS in about [-3, 3]
    log_rms = size[:, None] + 0.15 * rng.standard_normal((n, len(NAMES)))
    embed = u[:, :E_DIM] + 0.05 * rng.standard_normal((n, E_DIM))
    return FitInputs(embed, log_rms, u, np.zeros(n))


def _calibrated(share: float = 0.05, n_train: int = 100, n_cal: int = 60) -> FitCheck:
    """A fit check calibrated as ``learn.calibrate`` does: held-out LoRAs pooled with the
    training LoRAs scored out of fold."""
    train, cal = _loras(n_train, 1), _loras(n_cal, 2)
    fit = FitCheck.fit(train, NAMES)
    folds = np.random.default_rng(0).permutation(np.arange(n_train) % 5)
    ood, size = out_of_fold_scores(train, folds, NAMES)
    fit.calibrate(
        np.r_[fit.scores(cal.embed), ood], np.r_[np.abs(fit.size_residuals(cal)), size], share=share
    )
    return fit


def _scaled(x: FitInputs, factor: float) -> FitInputs:
    return FitInputs(x.embed, x.log_rms + math.log(factor), x.unit, x.span)


@pytest.mark.parametrize("factor", [10.0, 0.1])
def test_a_lora_scaled_by_10_or_a_tenth_is_flagged_inside_the_training_range(factor):
    fit = _calibrated()
    new = _loras(400, 3)
    middle = np.abs(new.log_rms.mean(axis=1)) < 0.5  # x10 / x0.1 stays inside the norm range
    rows = fit.check(_scaled(new.take(middle), factor))
    assert not any("training range" in r for row in rows for r in row["reasons"])
    flagged = np.mean([not r["in_distribution"] for r in rows])
    assert flagged > 0.95, flagged
    side = "larger" if factor > 1 else "smaller"
    assert all(any(f"x {side} than training LoRAs" in r for r in row["reasons"]) for row in rows)


def test_both_scores_together_flag_about_the_chosen_share_of_new_in_distribution_loras():
    """Each score's threshold is at share / 2 of held-out scores, so the union flags about
    share (at each score's full share about twice that; with the training LoRAs scored in
    sample, 100 of them in 20 dimensions, also about twice)."""
    fit = _calibrated(share=0.1, n_cal=40)
    rows = fit.check(_loras(3000, 4))
    flagged = np.mean([not r["in_distribution"] for r in rows])
    assert 0.06 <= flagged <= 0.13, flagged
    assert fit.shares() == (0.05, 0.05, 0.0) and math.isfinite(fit.size_threshold)


def test_unit_features_ignore_the_scale_of_a_lora():
    lora = random_lora([2, 3], [(6, 5), (4, 7)], seed=0)
    big = lora.map_factors(lambda _, la: (la.U * 10.0, la.V))
    for kind in ("dense", "spectral"):
        a, b = (unit_features(collate([x]), kind, 3) for x in (lora, big))
        torch.testing.assert_close(a, b)
        assert a.abs().max() > 0
