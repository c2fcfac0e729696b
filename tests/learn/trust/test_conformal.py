"""Conformal intervals and sets keep their promise on data whose noise is known: coverage at the
nominal level, widths neither too narrow nor too wide, calibrated probabilities."""

from __future__ import annotations

import math

import numpy as np
import pytest

from loralens.learn.trust import conformal as cp


@pytest.mark.parametrize("level", [0.8, 0.9])
def test_split_conformal_intervals_cover_at_the_nominal_rate_with_the_right_width(level):
    """y = f(x) + N(0, 0.5^2), the model predicts f(x): the interval must hold about ``level``
    of new points and be about as wide as the true noise quantile (too narrow or too wide fails)."""
    rng = np.random.default_rng(0)
    sigma, n_cal, n_test = 0.5, 2000, 20000
    res_cal = rng.normal(0, sigma, n_cal)
    q = cp.conformal_quantile(np.abs(res_cal), level)
    pred = rng.normal(size=(n_test, 1))
    y = pred + rng.normal(0, sigma, (n_test, 1))
    lo, hi = cp.intervals(pred, np.ones(n_test), np.array([q]))
    rep = cp.interval_report(lo, hi, y, np.array([1.0]))
    assert abs(rep["coverage"] - level) < 0.02
    from scipy.stats import norm

    true_half = sigma * norm.ppf(0.5 + level / 2)
    assert rep["per_target"][0]["width"] == pytest.approx(2 * true_half, rel=0.06)


def test_normalized_intervals_follow_known_heteroscedastic_noise():
    """Noise sd proportional to a known difficulty d: scores |res| / d give intervals that cover
    90% both where d is small and where it is large, and are narrow where d is small."""
    rng = np.random.default_rng(1)
    d_cal, d_test = rng.uniform(0.1, 2.0, 3000), rng.uniform(0.1, 2.0, 20000)
    q = cp.conformal_quantile(np.abs(rng.normal(0, 1, 3000) * d_cal) / d_cal, 0.9)
    y = (rng.normal(0, 1, 20000) * d_test)[:, None]
    lo, hi = cp.intervals(np.zeros((20000, 1)), d_test, np.array([q]))
    inside = ((y >= lo) & (y <= hi)).ravel()
    easy, hard = d_test < 0.5, d_test > 1.5
    assert abs(inside[easy].mean() - 0.9) < 0.02 and abs(inside[hard].mean() - 0.9) < 0.02
    assert (hi - lo)[easy].mean() < 0.3 * (hi - lo)[hard].mean()


def test_too_few_calibration_scores_promise_nothing():
    assert cp.conformal_quantile(np.arange(5.0), 0.9) == math.inf  # ceil(6 * 0.9) = 6 > 5
    assert cp.conformal_quantile(np.arange(9.0), 0.9) == 8.0


def test_temperature_scaling_repairs_overconfident_logits_and_sets_cover():
    rng = np.random.default_rng(2)
    true_logit = rng.normal(0, 2, 6000)
    y = (rng.uniform(size=6000) < cp.sigmoid(true_logit)).astype(float)
    logits = 4.0 * true_logit  # four times too confident
    t = cp.fit_temperature(logits[:3000], y[:3000])
    assert t == pytest.approx(4.0, rel=0.15)
    before = cp.ece(cp.sigmoid(logits[3000:]), y[3000:])
    after = cp.ece(cp.sigmoid(logits[3000:] / t), y[3000:])
    assert after < 0.03 < before
    q = cp.conformal_quantile(cp.set_scores(cp.sigmoid(logits[:3000] / t), y[:3000]), 0.9)
    rep = cp.set_report(cp.sigmoid(logits[3000:, None] / t), y[3000:, None], np.array([q]))
    assert abs(rep["coverage"] - 0.9) < 0.02 and 1.0 <= rep["set_size"] < 2.0


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.1, True, "0.9"])
def test_coverage_outside_0_1_is_refused(bad):
    with pytest.raises(ValueError, match="coverage"):
        cp.check_level(bad)
