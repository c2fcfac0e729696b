"""Linear probes: the baseline every learned model must beat, on the same split as the model.

Two probes, fitted with scikit-learn on the rows the model may use (train and val, never test),
their regularization chosen by cross-validation on those rows only:

- ``probe: dense ΔW``: ridge / logistic regression on the flattened ΔW = U Vᵀ of every layer,
  where it fits in memory (``DENSE_MAX_BYTES``); otherwise skipped, and said so;
- ``probe: spectral``: the same on GL(r)-invariant features (the per-layer singular values of
  ΔW and its Frobenius norm, ``features.svals_and_norms``, and their logarithms), which fit
  everywhere. Logarithms too: these span orders of magnitude across a zoo, and on raw values
  the few largest LoRAs set the fit (eval_loss of a 250-LoRA skills-lm zoo, 3 seeds: R² -0.13
  on raw values, 0.40 on logarithms, 0.62 on both).
- ``probe: spectral stats``: logistic / ridge regression on per-layer spectral statistics
  (``features.spectral_stats``: singular values, norms, stable rank, energy entropy, kurtosis)
  and the logarithms of their magnitudes: the weight-space backdoor detectors' baseline.

Outputs are in the model's raw space (standardized targets, or logits), so ``Task.metrics``
scores probes and models alike.
"""

from __future__ import annotations

import hashlib
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from loralens.learn.fitting.tasks import CLASSIFICATION, Task
from loralens.models.linear_base import linear_features
from loralens.store import LoRAStore

PROBE_DENSE = "probe: dense ΔW"
PROBE_SPECTRAL = "probe: spectral"
PROBE_SPECTRAL_STATS = "probe: spectral stats"
PROBES = (PROBE_DENSE, PROBE_SPECTRAL, PROBE_SPECTRAL_STATS)
#: The dense probe is skipped when the float32 ΔW of the selected LoRAs exceed this.
DENSE_MAX_BYTES = 1 << 30
#: Ridge penalties tried (on standardized features); logistic regression tries 1 / these.
ALPHAS = np.logspace(-3, 5, 17)
#: Bytes of coefficients :func:`fit_linear` keeps from its recent fits.
FIT_MEMO_BYTES = 256 << 20
_fits: OrderedDict[bytes, tuple[np.ndarray, float, float]] = OrderedDict()


def dense_bytes(store: LoRAStore, n: int) -> int:
    """Bytes of the float32 flattened ΔW of ``n`` LoRAs of ``store``."""
    return 4 * n * sum(int(o) * int(i) for o, i in store.shapes)


def probe_features(store: LoRAStore, rows: np.ndarray, which: str) -> np.ndarray | str:
    """(len(rows), D) features of ``rows`` for probe ``which``, or why it was skipped."""
    if which == PROBE_DENSE and dense_bytes(store, len(rows)) > DENSE_MAX_BYTES:
        gib = dense_bytes(store, len(rows)) / 2**30
        return f"skipped: dense ΔW of {len(rows)} LoRAs is {gib:.1f} GiB (bound 1 GiB)"
    pad = store.ranks[rows].max(axis=0) if len(rows) else None
    kind = {PROBE_DENSE: "dense", PROBE_SPECTRAL: "spectral", PROBE_SPECTRAL_STATS: "stats"}[which]
    with torch.no_grad():
        parts = [
            linear_features(batch, kind).float().numpy()
            for _, batch in store.iter_batches(64, rows=rows, pad_ranks=pad)
        ]
    return np.concatenate(parts).astype(np.float32)


def fit_linear(
    x: np.ndarray, y: np.ndarray, classification: bool, scale: np.ndarray | None = None
) -> tuple[np.ndarray, float]:
    """``(coef, intercept)`` on the raw features ``x`` of a ridge (or logistic) regression of the
    finite entries of ``y`` (0/1 for classification), fitted on centered features divided by
    ``scale`` (default: each feature's standard deviation), its penalty chosen by
    cross-validation on these rows only (:func:`fit_linear_scored` also gives the score)."""
    coef, intercept, _ = fit_linear_scored(x, y, classification, scale)
    return coef, intercept


def fit_linear_scored(
    x: np.ndarray, y: np.ndarray, classification: bool, scale: np.ndarray | None = None
) -> tuple[np.ndarray, float, float]:
    """:func:`fit_linear` and its cross-validated score at the chosen penalty (higher is
    better: leave-one-out negative squared error, or mean log-likelihood over folds).

    Recent fits are kept by the content of their inputs: every model of a benchmark fits the
    same linear base on the same rows, and a cross-validated logistic fit per label of a
    multilabel family is most of a run's time."""
    h = hashlib.blake2b(digest_size=16)
    for a in (x, y) if scale is None else (x, y, scale):
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.view(np.uint8))
    key = h.digest() + bytes([classification])
    if key not in _fits:
        _fits[key] = _fit_linear(x, y, classification, scale)
        while sum(c.nbytes for c, _, _ in _fits.values()) > FIT_MEMO_BYTES and len(_fits) > 1:
            _fits.popitem(last=False)
    _fits.move_to_end(key)
    coef, intercept, score = _fits[key]
    return coef.copy(), intercept, score


def _fit_linear(
    x: np.ndarray, y: np.ndarray, classification: bool, scale: np.ndarray | None
) -> tuple[np.ndarray, float, float]:
    """(coef, intercept, cross-validated score: higher is better) of one scaling."""
    from sklearn.linear_model import LogisticRegressionCV, RidgeCV
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    ok = ~np.isnan(y)
    x, y = x[ok], y[ok]
    zero = np.zeros(x.shape[1])
    if classification:
        counts = np.bincount(y.astype(int), minlength=2)
        if counts.min() < 2:  # one class (or a single example of the other): its log-odds
            p = (counts[1] + 0.5) / (counts.sum() + 1.0)
            return zero, float(np.log(p / (1 - p))), 0.0
        folds = StratifiedKFold(int(min(5, counts.min())), shuffle=True, random_state=0)
        model = LogisticRegressionCV(Cs=1.0 / ALPHAS, cv=folds, scoring=neg_log_loss, max_iter=2000)
    else:
        if len(y) < 3:
            return zero, float(y.mean()) if len(y) else 0.0, 0.0
        model = RidgeCV(alphas=ALPHAS)
    scaler = StandardScaler().fit(x)
    if scale is not None:
        scaler.scale_ = np.asarray(scale, dtype=np.float64)
    xs = scaler.transform(x)
    # An L2-penalized weight lies in the span of the rows (representer theorem): fit on the
    # rows' coordinates in that span, exactly the same fit, n x n instead of n x D.
    span = _row_span(xs) if xs.shape[1] > len(xs) else None
    # One BLAS thread: on these small problems more threads only wait on each other (on 2
    # busy cores a cross-validated logistic fit took 60x the CPU time with OpenBLAS's threads).
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", FutureWarning)  # scikit-learn's changing defaults
        z = xs if span is None else span[0]
        model.fit(z, y.astype(int) if classification else y)
    coef = np.ravel(model.coef_) if span is None else xs.T @ (span[1] @ np.ravel(model.coef_))
    coef = coef / scaler.scale_
    if classification:  # mean log-loss over folds at the best penalty
        score = float(next(iter(model.scores_.values())).mean(axis=0).max())
    else:  # leave-one-out (negative) squared error at the best penalty
        score = float(model.best_score_)
    return coef, float(np.ravel(model.intercept_)[0] - coef @ scaler.mean_), score


def neg_log_loss(estimator: Any, x: np.ndarray, y: np.ndarray) -> float:
    """scikit-learn's ``neg_log_loss`` scorer of a binary classifier, the same number without
    its input checks: those took 40% of a cross-validated logistic fit (17 penalties x 5 folds
    of scoring calls, 15 ms each), the linear probes' and base's fits of ``loralens demo``."""
    proba = estimator.predict_proba(x)
    eps = np.finfo(proba.dtype).eps
    picked = np.clip(proba, eps, 1 - eps)[np.arange(len(y)), np.asarray(y, dtype=int)]
    return -float(np.mean(-np.log(picked)))


def _row_span(xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows' coordinates in an orthonormal basis of their span, ``z = xs @ V`` (n x k), and
    the map ``M`` with ``V = xs.T @ M``: from the n x n Gram matrix (a matrix product and an
    n x n eigendecomposition; 70x faster than the SVD of xs at 180 x 20,736). Directions whose
    singular value is below 1e-6 of the largest are left out: a ridge gives them no weight."""
    w, u = np.linalg.eigh(xs @ xs.T)
    keep = w > w.max() * 1e-12
    s = np.sqrt(w[keep])
    return u[:, keep] * s, u[:, keep] / s


def fit_predict(x_fit: np.ndarray, y_fit: np.ndarray, x_test: np.ndarray, task: Task) -> np.ndarray:
    """Raw outputs on ``x_test`` of one probe per target (:func:`fit_linear` on ``x_fit``)."""
    enc = task.encode(y_fit)
    out = np.zeros((len(x_test), task.out_dim))
    for j in range(task.out_dim):
        coef, intercept = fit_linear(x_fit, enc[:, j], task.kind == CLASSIFICATION)
        out[:, j] = x_test.astype(np.float64) @ coef + intercept
    return out


def probe_folds(
    store: LoRAStore,
    kind: str,
    targets: Sequence[str],
    y_all: np.ndarray,
    folds: Sequence[tuple[np.ndarray, np.ndarray]],
) -> dict[str, dict[str, Any]]:
    """Each probe's test metrics per fold ``(fit rows, test rows)`` (store rows; the scaling of
    the targets fitted on the fit rows): ``{name: {"folds": [metrics, ...]}}`` or ``{name:
    {"skipped": why}}``. Features are computed once."""
    rows = np.unique(np.concatenate([np.concatenate(f) for f in folds]))
    where = {int(r): i for i, r in enumerate(rows)}
    result: dict[str, dict[str, Any]] = {}
    for name in PROBES:
        x = probe_features(store, rows, name)
        if isinstance(x, str):
            result[name] = {"skipped": x}
            continue
        per = []
        for fit_rows, test_rows in folds:
            xf = x[[where[int(r)] for r in fit_rows]]
            xt = x[[where[int(r)] for r in test_rows]]
            task = Task.fit(list(targets), y_all[fit_rows], kind=kind)
            raw = fit_predict(xf, y_all[fit_rows], xt, task)
            per.append(task.metrics(raw, y_all[test_rows]))
        result[name] = {"folds": per}
    return result


__all__ = [
    "DENSE_MAX_BYTES",
    "PROBES",
    "PROBE_DENSE",
    "PROBE_SPECTRAL",
    "PROBE_SPECTRAL_STATS",
    "dense_bytes",
    "fit_linear",
    "fit_linear_scored",
    "fit_predict",
    "neg_log_loss",
    "probe_features",
    "probe_folds",
]
