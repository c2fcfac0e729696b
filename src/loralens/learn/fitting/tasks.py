"""Targets, losses and metrics: what a LoL model is trained to predict and how it is scored.

The task type follows from the label columns: when every value of every target column is 0 or 1
the task is (binary or multilabel) classification, otherwise regression. Regression targets are
standardized with the training split's mean and std for training; every reported regression
metric is on the original scale. A predicted probability at or above ``THRESHOLD`` is class 1.

Regression predictions are clipped to the range of the training labels. A linear fit on ΔW
extrapolates without bound, and LoRAs larger than any seen in training (a higher rank, a higher
learning rate) push it far past where the label saturates: on the development zoos, trained on
rank-4 LoRAs and tested on rank-8 ones, clipping took the dense ridge's R² from 0.84 to 0.98
(gpt2-dev) and from -0.44 to -0.08 (skills-dev), and left every in-distribution split as it
was or better (one gpt2-dev seed 0.77 -> 0.99). Margins of 5-25% of the range gained at most
0.005 in one case and lost up to 0.10 in others (``benchmarks/clip_ranks.py``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats

REGRESSION = "regression"
CLASSIFICATION = "classification"
#: A probability (or a 0/1 label) at or above this is class 1.
THRESHOLD = 0.5


def infer_task(values: np.ndarray) -> str:
    """'classification' when every non-missing value is 0 or 1, else 'regression'."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if v.size and np.isin(v, (0.0, 1.0)).all():
        return CLASSIFICATION
    return REGRESSION


@dataclass
class Task:
    """The targets of a run and how they are scaled: all that predict needs to map outputs back."""

    kind: str
    targets: list[str]
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    #: The training labels' range per target; regression predictions are clipped to it (empty:
    #: no clipping, as in runs saved before it).
    low: list[float] = field(default_factory=list)
    high: list[float] = field(default_factory=list)

    @classmethod
    def fit(
        cls,
        targets: Sequence[str],
        y_train: np.ndarray,
        kind: str | None = None,
        y_seen: np.ndarray | None = None,
    ) -> Task:
        """Scaling from the training labels ``y_train``; the clipping range from ``y_seen``, every
        label the final model learned from (default: ``y_train``)."""
        y_train = np.asarray(y_train, dtype=np.float64).reshape(len(y_train), -1)
        y_seen = y_train if y_seen is None else np.asarray(y_seen, np.float64)
        y_seen = y_seen.reshape(len(y_seen), -1)
        kind = kind or infer_task(y_train)
        if kind != REGRESSION:
            zeros, ones = np.zeros(y_train.shape[1]), np.ones(y_train.shape[1])
            return cls(kind, list(targets), zeros.tolist(), ones.tolist())
        with warnings.catch_warnings():  # a target without labels: NaN, then no scaling or range
            warnings.simplefilter("ignore", RuntimeWarning)
            mean, std = np.nanmean(y_train, axis=0), np.nanstd(y_train, axis=0)
            low, high = np.nanmin(y_seen, axis=0), np.nanmax(y_seen, axis=0)
        std = np.where(np.isfinite(std) & (std > 0), std, 1.0)
        bounded = np.isfinite(low).all()
        return cls(
            kind,
            list(targets),
            mean.tolist(),
            std.tolist(),
            low.tolist() if bounded else [],
            high.tolist() if bounded else [],
        )

    @property
    def out_dim(self) -> int:
        return len(self.targets)

    def to_dict(self) -> dict[str, Any]:
        d = {"kind": self.kind, "targets": self.targets, "mean": self.mean, "std": self.std}
        return d | ({"low": self.low, "high": self.high} if self.low else {})

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Task:
        return cls(
            d["kind"],
            list(d["targets"]),
            list(d["mean"]),
            list(d["std"]),
            list(d.get("low", [])),
            list(d.get("high", [])),
        )

    # scaling -------------------------------------------------------------------------
    def encode(self, y: np.ndarray) -> np.ndarray:
        """Original-scale targets -> what the model is trained on (standardized or 0/1)."""
        y = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
        return (y - np.asarray(self.mean)) / np.asarray(self.std)

    def decode(self, out: np.ndarray) -> np.ndarray:
        """Model outputs -> predictions on the original scale (probabilities for classification)."""
        out = np.asarray(out, dtype=np.float64).reshape(len(out), -1)
        if self.kind == CLASSIFICATION:
            return 1.0 / (1.0 + np.exp(-out))
        pred = out * np.asarray(self.std) + np.asarray(self.mean)
        return np.clip(pred, self.low, self.high) if self.low else pred

    def raw(self, pred: np.ndarray) -> np.ndarray:
        """Original-scale predictions -> model outputs (the inverse of :meth:`decode`)."""
        pred = np.asarray(pred, dtype=np.float64).reshape(len(pred), -1)
        if self.kind == CLASSIFICATION:
            p = np.clip(pred, 1e-12, 1 - 1e-12)
            return np.log(p / (1 - p))
        return self.encode(pred)

    # training ------------------------------------------------------------------------
    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """MSE on standardized targets, or BCE with logits; missing (NaN) targets are masked."""
        per, mask = self._entry_losses(out, y)
        return (per * mask).sum() / mask.sum().clamp_min(1)

    def _entry_losses(
        self, out: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-entry loss, mask of labelled entries) of raw outputs against encoded targets."""
        mask = ~torch.isnan(y)
        y = torch.where(mask, y, torch.zeros_like(y))
        out = out.to(torch.float32)
        if self.kind == CLASSIFICATION:
            return F.binary_cross_entropy_with_logits(out, y, reduction="none"), mask
        return (out - y) ** 2, mask

    def row_losses(self, out: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Each row's loss, the mean over its labelled targets (NaN for a row with none), of raw
        outputs as scored (:meth:`metrics`) against original-scale targets."""
        out, enc = self._scored(out), self.encode(y)
        per, mask = self._entry_losses(
            torch.as_tensor(out), torch.as_tensor(enc, dtype=torch.float32)
        )
        count = mask.sum(1)
        rows = (per * mask).sum(1) / count.clamp_min(1)
        return torch.where(count > 0, rows, torch.nan).double().numpy()

    def _scored(self, out: np.ndarray) -> np.ndarray:
        """Raw outputs as predicted: regression outputs clipped to the training labels' range."""
        out = np.asarray(out, dtype=np.float64).reshape(len(out), -1)
        return self.encode(self.decode(out)) if self.low else out

    def metrics(self, out: np.ndarray, y: np.ndarray) -> dict[str, Any]:
        """Metrics of raw model outputs ``out`` against original-scale targets ``y``."""
        out = self._scored(out)
        y = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
        enc = self.encode(y)
        loss = float(
            self.loss(
                torch.as_tensor(out, dtype=torch.float32), torch.as_tensor(enc, dtype=torch.float32)
            )
        )
        pred = self.decode(out)
        if self.kind == CLASSIFICATION:
            m = classification_metrics(pred, y, self.targets)
        else:
            m = regression_metrics(pred, y, self.targets)
            m["mse_standardized"] = float(np.nanmean((out - enc) ** 2))
        m["loss"] = loss
        m["n"] = len(y)
        return m


# ------------------------------------------------------------------------------ metrics


def spearman_rho(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (ties averaged); NaN when either side is constant."""
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(stats.spearmanr(a, b).statistic)


def kendall_tau(a: np.ndarray, b: np.ndarray) -> float:
    """Kendall's tau-b (ties accounted for); NaN when either side is constant."""
    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(stats.kendalltau(a, b).statistic)


def r2_score(pred: np.ndarray, y: np.ndarray) -> float:
    ss_res = float(np.sum((y - pred) ** 2))
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")


def _nanmean(values: Sequence[float]) -> float:
    v = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")


def regression_metrics(pred: np.ndarray, y: np.ndarray, targets: Sequence[str]) -> dict[str, Any]:
    """R^2, Kendall tau, Spearman rho on the original scale: mean over targets, and per target."""
    per: dict[str, dict[str, float]] = {}
    for j, name in enumerate(targets):
        ok = ~np.isnan(y[:, j])
        p, t = pred[ok, j], y[ok, j]
        per[name] = {
            "r2": r2_score(p, t),
            "kendall_tau": kendall_tau(p, t),
            "spearman": spearman_rho(p, t),
            "mse": float(np.mean((p - t) ** 2)) if len(t) else float("nan"),
        }
    out: dict[str, Any] = {
        k: _nanmean([m[k] for m in per.values()]) for k in ("r2", "kendall_tau", "spearman", "mse")
    }
    out["per_target"] = per
    return out


def roc_auc(score: np.ndarray, label: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with tie-averaged ranks); NaN with one class."""
    pos = label >= THRESHOLD
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = stats.rankdata(np.asarray(score, dtype=np.float64))
    return float((r[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


#: False-positive rates at which binary classification reports the true-positive rate: a
#: screening service tolerates a few false alarms, and AUROC says nothing about that corner.
FPR_LEVELS = (0.01, 0.05)


def tpr_key(fpr: float) -> str:
    """The metric name of the TPR at false-positive rate ``fpr`` (``tpr@5%fpr``)."""
    return f"tpr@{fpr * 100:g}%fpr"


def tpr_at_fpr(score: np.ndarray, label: np.ndarray, fpr: float) -> float:
    """The share of positives flagged by the lowest threshold that flags at most ``fpr`` of the
    negatives (a score strictly above the threshold is flagged; tied scores are never split, so
    a tie costs the positives it holds); NaN with one class."""
    score = np.asarray(score, dtype=np.float64)
    pos = np.asarray(label) >= THRESHOLD
    neg = np.sort(score[~pos])[::-1]
    if pos.sum() == 0 or len(neg) == 0:
        return float("nan")
    allowed = math.floor(fpr * len(neg) + 1e-9)
    if allowed >= len(neg):
        return 1.0
    return float(np.mean(score[pos] > neg[allowed]))


def classification_metrics(
    prob: np.ndarray, y: np.ndarray, targets: Sequence[str]
) -> dict[str, Any]:
    """Accuracy at THRESHOLD (mean over labels), AUROC and the TPR at each of ``FPR_LEVELS``
    (means over labels with both classes)."""
    per: dict[str, dict[str, float]] = {}
    for j, name in enumerate(targets):
        ok = ~np.isnan(y[:, j])
        p, t = prob[ok, j], y[ok, j]
        hits = (p >= THRESHOLD) == (t >= THRESHOLD)
        per[name] = {
            "accuracy": float(np.mean(hits)) if len(t) else float("nan"),
            "auroc": roc_auc(p, t),
            **{tpr_key(f): tpr_at_fpr(p, t, f) for f in FPR_LEVELS},
        }
    keys = ("accuracy", "auroc", *map(tpr_key, FPR_LEVELS))
    out: dict[str, Any] = {k: _nanmean([m[k] for m in per.values()]) for k in keys}
    out["per_target"] = per
    return out


def mean_std(
    results: Sequence[Mapping[str, Any]],
) -> tuple[dict[str, float | None], dict[str, float | None] | None]:
    """Per key, the mean and std over ``results`` (folds or seeds) of the finite numbers; the std
    is ``None`` from a single result (one number has no spread, it is not 0)."""
    keys = list(dict.fromkeys(k for r in results for k in r))
    mean: dict[str, float | None] = {}
    std: dict[str, float | None] = {}
    for k in keys:
        v = [x for x in (r.get(k) for r in results) if isinstance(x, (int, float))]
        v = [float(x) for x in v if np.isfinite(x)]
        mean[k] = float(np.mean(v)) if v else None
        std[k] = float(np.std(v)) if len(v) > 1 else None
    return mean, (std if len(results) > 1 else None)


# ------------------------------------------------------------------------------ baselines


def baseline_metrics(task: Task, y_train: np.ndarray, y_eval: np.ndarray) -> dict[str, Any]:
    """The "no weights" baseline: predict the train-set mean (regression) or majority class."""
    y_train = np.asarray(y_train, dtype=np.float64).reshape(len(y_train), -1)
    y_eval = np.asarray(y_eval, dtype=np.float64).reshape(len(y_eval), -1)
    if task.kind == CLASSIFICATION:
        p = np.nanmean(y_train, axis=0)
        majority = (p >= THRESHOLD).astype(np.float64)
        # a constant score: AUROC is 0.5 by definition; accuracy is the majority rate
        prob = np.tile(np.where(majority > 0, 0.75, 0.25), (len(y_eval), 1))
        m = classification_metrics(prob, y_eval, task.targets)
        for v in (*m["per_target"].values(), m):  # a constant score ranks nothing
            v["auroc"] = 0.5
            v.update({tpr_key(f): f for f in FPR_LEVELS})  # flagging at random at that rate
        return m
    pred = np.tile(np.nanmean(y_train, axis=0), (len(y_eval), 1))
    return regression_metrics(pred, y_eval, task.targets)


__all__ = [
    "CLASSIFICATION",
    "FPR_LEVELS",
    "REGRESSION",
    "THRESHOLD",
    "Task",
    "baseline_metrics",
    "classification_metrics",
    "infer_task",
    "kendall_tau",
    "mean_std",
    "r2_score",
    "regression_metrics",
    "roc_auc",
    "spearman_rho",
    "tpr_at_fpr",
    "tpr_key",
]
