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

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from loralens.features import spectral_stats, svals_and_norms
from loralens.learn.tasks import CLASSIFICATION, Task
from loralens.store import LoRAStore

PROBE_DENSE = "probe: dense ΔW"
PROBE_SPECTRAL = "probe: spectral"
PROBE_SPECTRAL_STATS = "probe: spectral stats"
PROBES = (PROBE_DENSE, PROBE_SPECTRAL, PROBE_SPECTRAL_STATS)
#: The dense probe is skipped when the float32 ΔW of the selected LoRAs exceed this.
DENSE_MAX_BYTES = 1 << 30
#: Added before the logarithm of spectral features (zero-padded singular values stay finite).
LOG_EPS = 1e-8
#: Ridge penalties tried (on standardized features); logistic regression tries 1 / these.
ALPHAS = np.logspace(-3, 5, 17)


def dense_bytes(store: LoRAStore, n: int) -> int:
    """Bytes of the float32 flattened ΔW of ``n`` LoRAs of ``store``."""
    return 4 * n * sum(int(o) * int(i) for o, i in store.shapes)


def probe_features(store: LoRAStore, rows: np.ndarray, which: str) -> np.ndarray | str:
    """(len(rows), D) features of ``rows`` for probe ``which``, or why it was skipped."""
    if which == PROBE_DENSE and dense_bytes(store, len(rows)) > DENSE_MAX_BYTES:
        gib = dense_bytes(store, len(rows)) / 2**30
        return f"skipped: dense ΔW of {len(rows)} LoRAs is {gib:.1f} GiB (bound 1 GiB)"
    pad = store.ranks[rows].max(axis=0) if len(rows) else None
    parts = []
    with torch.no_grad():
        for _, batch in store.iter_batches(64, rows=rows, pad_ranks=pad):
            if which == PROBE_DENSE:
                feats = [w.reshape(len(batch), -1) for w in batch.delta_weights()]
            elif which == PROBE_SPECTRAL_STATS:
                st = spectral_stats(batch).reshape(len(batch), -1).double()
                feats = [st, torch.log(st.abs() + LOG_EPS)]
            else:
                s, norms = svals_and_norms(batch)
                both = torch.cat([s.reshape(len(batch), -1), norms.reshape(len(batch), -1)], 1)
                feats = [both, torch.log(both.double() + LOG_EPS)]
            parts.append(torch.cat([f.float() for f in feats], dim=1).numpy())
    return np.concatenate(parts).astype(np.float32)


def fit_predict(x_fit: np.ndarray, y_fit: np.ndarray, x_test: np.ndarray, task: Task) -> np.ndarray:
    """Raw outputs on ``x_test`` of one probe per target, fitted on ``x_fit`` (NaN labels left
    out) with its penalty chosen by cross-validation on the fitting rows only."""
    from sklearn.linear_model import LogisticRegressionCV, RidgeCV
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    enc = task.encode(y_fit)
    out = np.zeros((len(x_test), task.out_dim))
    for j in range(task.out_dim):
        ok = ~np.isnan(enc[:, j])
        xj, yj = x_fit[ok], enc[ok, j]
        if task.kind == CLASSIFICATION:
            counts = np.bincount(yj.astype(int), minlength=2)
            if counts.min() < 2:  # one class (or a single example of the other): its log-odds
                p = (counts[1] + 0.5) / (counts.sum() + 1.0)
                out[:, j] = np.log(p / (1 - p))
                continue
            folds = StratifiedKFold(int(min(5, counts.min())), shuffle=True, random_state=0)
            clf = LogisticRegressionCV(
                Cs=1.0 / ALPHAS, cv=folds, scoring="neg_log_loss", max_iter=2000
            )
            with warnings.catch_warnings():  # scikit-learn's notices of changing defaults
                warnings.simplefilter("ignore", FutureWarning)
                model = make_pipeline(StandardScaler(), clf).fit(xj, yj.astype(int))
            out[:, j] = model.decision_function(x_test)
        else:
            if len(yj) < 3:
                out[:, j] = yj.mean() if len(yj) else 0.0
                continue
            model = make_pipeline(StandardScaler(), RidgeCV(alphas=ALPHAS)).fit(xj, yj)
            out[:, j] = model.predict(x_test)
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
    "fit_predict",
    "probe_features",
    "probe_folds",
]
