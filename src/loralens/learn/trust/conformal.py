"""Conformal prediction on held-out residuals: regression intervals, binary prediction sets,
temperature-calibrated probabilities, and the numbers that say whether they keep their promise
(coverage, width, expected calibration error).

Everything here is plain numpy on arrays of calibration scores; which LoRAs calibrate and how
their scores are computed is :mod:`loralens.learn.trust.calibration`'s job.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from loralens.errors import SettingsError

#: Default coverage of intervals and prediction sets.
COVERAGE = 0.9
#: Bins of the expected calibration error.
ECE_BINS = 10
#: A measured coverage fails a run's check when a binomial of the stated level gives that few
#: covered LoRAs or fewer with a probability below this (shared by a run's targets).
CHECK_ALPHA = 0.01
#: Folds of the calibration LoRAs in which a temperature is fitted and judged out of fold.
TEMPERATURE_FOLDS = 5


def check_level(level: float, what: str = "coverage") -> float:
    """``level`` as a float strictly between 0 and 1; ValueError naming ``what`` otherwise."""
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not 0 < level < 1:
        raise SettingsError(f"{what} must be a number strictly between 0 and 1, got {level!r}")
    return float(level)


def conformal_quantile(scores: np.ndarray, level: float) -> float:
    """The ceil((n+1)·level)-th smallest of ``scores`` (NaN ignored): a new exchangeable score is
    at most this with probability >= level. ``inf`` when there are too few scores to promise it."""
    s = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    s = s[~np.isnan(s)]
    k = math.ceil((len(s) + 1) * level)
    return float(s[k - 1]) if 0 < k <= len(s) else math.inf


# ---------------------------------------------------------------------------------- regression


def intervals(pred: np.ndarray, scale: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) = pred -/+ q · scale, per row and target: ``pred`` (N, T), ``scale`` (N,) or
    (N, T) per-LoRA difficulty (1 for plain intervals), ``q`` (T,) quantiles of |res| / scale."""
    pred = np.asarray(pred, dtype=np.float64)
    scale = np.asarray(scale, dtype=np.float64)
    half = (scale[:, None] if scale.ndim == 1 else scale) * np.asarray(q, dtype=np.float64)
    return pred - half, pred + half


def interval_report(
    lo: np.ndarray, hi: np.ndarray, y: np.ndarray, y_std: np.ndarray
) -> dict[str, Any]:
    """Empirical coverage and mean width of intervals against original-scale labels ``y``
    (NaN labels left out), over all targets and per target; width also relative to ``y_std``."""
    y = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    ok = ~np.isnan(y)
    inside = (y >= lo) & (y <= hi)
    width = hi - lo
    per = []
    for j in range(y.shape[1]):
        m = ok[:, j]
        w = float(np.mean(width[m, j])) if m.any() else math.nan
        per.append(
            {
                "coverage": float(np.mean(inside[m, j])) if m.any() else math.nan,
                "width": w,
                "width_rel_std": w / float(y_std[j]) if y_std[j] > 0 else math.nan,
                "n": int(m.sum()),
            }
        )
    return {
        "coverage": float(np.mean(inside[ok])) if ok.any() else math.nan,
        "width_rel_std": _mean([p["width_rel_std"] for p in per]),
        "per_target": per,
    }


# ---------------------------------------------------------------------------------- classification


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The temperature T > 0 minimizing the binary log loss of sigmoid(logits / T) on (logits,
    0/1 labels), searched on log T in [1e-2, 1e2]; 1.0 when there are no labels of both kinds."""
    from scipy.optimize import minimize_scalar

    logits = np.asarray(logits, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    ok = ~np.isnan(y) & np.isfinite(logits)
    z, t = logits[ok], y[ok]
    if len(t) < 2 or t.min() == t.max():
        return 1.0

    def nll(log_t: float) -> float:
        s = z / math.exp(log_t)
        return float(np.mean(np.logaddexp(0.0, s) - t * s))

    res = minimize_scalar(nll, bounds=(math.log(1e-2), math.log(1e2)), method="bounded")
    return float(math.exp(res.x))


def calibrated(logits: np.ndarray, temperature: np.ndarray | float) -> np.ndarray:
    """Probabilities of ``logits`` under ``temperature`` (per target): sigmoid(logits / T)."""
    return sigmoid(np.asarray(logits, dtype=np.float64) / np.asarray(temperature, dtype=np.float64))


def choose_temperature(logits: np.ndarray, y: np.ndarray, seed: int = 0) -> float:
    """:func:`fit_temperature` on (logits, 0/1 labels), or 1.0 (the probabilities as they are)
    when the temperatures fitted without each of ``TEMPERATURE_FOLDS`` seeded folds give their
    folds a larger ECE than no temperature does: a scaling that would make the probabilities
    worse on LoRAs it was not fitted on is not applied."""
    logits = np.asarray(logits, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    ok = ~np.isnan(y) & np.isfinite(logits)
    z, t = logits[ok], y[ok]
    if len(t) < 2 * TEMPERATURE_FOLDS:
        return 1.0
    folds = np.random.default_rng(seed).permutation(np.arange(len(t)) % TEMPERATURE_FOLDS)
    held = np.empty(len(t))
    for g in range(TEMPERATURE_FOLDS):
        m = folds == g
        held[m] = calibrated(z[m], fit_temperature(z[~m], t[~m]))
    if ece(held, t) >= ece(sigmoid(z), t):
        return 1.0
    return fit_temperature(z, t)


def set_scores(prob: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Nonconformity of each label: 1 - the probability given to the true class (NaN: no label)."""
    prob = np.asarray(prob, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    return np.where(np.isnan(y), np.nan, 1.0 - np.where(y >= 0.5, prob, 1.0 - prob))


def prediction_sets(prob: np.ndarray, q: float) -> list[list[int]]:
    """Per probability of class 1, the classes whose nonconformity 1 - p(class) is at most ``q``
    (empty when the model is confidently wrong about both, both when it cannot tell)."""
    return [[c for c, p_c in ((0, 1.0 - p), (1, p)) if 1.0 - p_c <= q] for p in np.ravel(prob)]


def set_report(prob: np.ndarray, y: np.ndarray, q: np.ndarray) -> dict[str, Any]:
    """Coverage (true class in the set), mean set size and ECE of probabilities ``prob`` (N, T)
    with per-target set quantiles ``q`` (T,) against 0/1 labels ``y``."""
    y = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    per = []
    for j in range(y.shape[1]):
        m = ~np.isnan(y[:, j])
        sets = prediction_sets(prob[m, j], q[j])
        hit = [int(t) in s for s, t in zip(sets, y[m, j])]
        per.append(
            {
                "coverage": float(np.mean(hit)) if hit else math.nan,
                "set_size": float(np.mean([len(s) for s in sets])) if sets else math.nan,
                "ece": ece(prob[m, j], y[m, j]),
                "n": int(m.sum()),
            }
        )
    return {
        "coverage": _mean([p["coverage"] for p in per]),
        "set_size": _mean([p["set_size"] for p in per]),
        "ece": _mean([p["ece"] for p in per]),
        "per_target": per,
    }


def coverage_problems(report: dict[str, Any], targets: list[str]) -> list[str]:
    """Why the intervals or sets of ``report`` (:func:`interval_report` or :func:`set_report`
    with its ``level`` and ``n``) do not keep their promise: one line per target whose LoRAs
    were covered so rarely that a binomial of the level, over that many LoRAs, gives as few with
    probability below ``CHECK_ALPHA`` (shared by the targets); empty when every target holds.
    A report without ``per_target`` is judged over all its LoRAs at once."""
    from scipy.stats import binom

    level = float(report["level"])
    per = report.get("per_target") or [{"coverage": report["coverage"], "n": report["n"]}]
    names = targets if report.get("per_target") else [", ".join(targets)]
    alpha = CHECK_ALPHA / len(per)
    what = "sets" if "set_size" in report else "intervals"
    out = []
    for name, p in zip(names, per):
        n, cov = int(p.get("n") or 0), p.get("coverage")
        if not n or cov is None or math.isnan(cov):
            continue
        covered = round(cov * n)
        if binom.cdf(covered, n, level) < alpha:
            least = int(binom.ppf(alpha, n, level))
            out.append(
                f"{name}: its {level:.0%} {what} held for only {covered} of {n} LoRAs "
                f"({cov:.2f}), where chance alone explains down to about {least}"
            )
    return out


def ece(prob: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error of binary probabilities: over equal-width bins of the
    confidence max(p, 1-p), the share-weighted |accuracy - mean confidence|."""
    prob, y = np.asarray(prob, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if len(y) == 0:
        return math.nan
    conf = np.maximum(prob, 1.0 - prob)
    hit = (prob >= 0.5) == (y >= 0.5)
    edges = np.linspace(0.5, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            total += m.mean() * abs(hit[m].mean() - conf[m].mean())
    return float(total)


def _mean(values: list[float]) -> float:
    v = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(v)) if np.isfinite(v).any() else math.nan


__all__ = [
    "CHECK_ALPHA",
    "COVERAGE",
    "TEMPERATURE_FOLDS",
    "calibrated",
    "check_level",
    "choose_temperature",
    "conformal_quantile",
    "coverage_problems",
    "ece",
    "fit_temperature",
    "interval_report",
    "intervals",
    "prediction_sets",
    "set_report",
    "set_scores",
    "sigmoid",
]
