"""Fitting a model's linear base (:mod:`loralens.models.linear_base`) before its network trains:
which base, and its ridge/logistic fit on the training rows."""

from __future__ import annotations

import numpy as np
import torch

from loralens.learn.fitting.probes import DENSE_MAX_BYTES, dense_bytes, fit_linear
from loralens.learn.fitting.tasks import CLASSIFICATION, Task
from loralens.store import LoRAStore


def linear_base_kind(store: LoRAStore, requested: str, rows: np.ndarray) -> str:
    """The linear base to fit: ``requested``, with "auto" resolved by the size of the
    training LoRAs' dense ΔW."""
    if requested != "auto":
        return requested
    return "dense" if dense_bytes(store, len(rows)) <= DENSE_MAX_BYTES else "spectral"


def base_features(store: LoRAStore, model: torch.nn.Module, rows: np.ndarray) -> np.ndarray:
    """(len(rows), D) the features of store ``rows`` that the model's linear base reads, computed
    by the model itself (so fitting and prediction see the very same map)."""
    pad = [int(r) for r in model.spec.ranks]
    with torch.no_grad():
        return torch.cat(
            [
                model.linear_base.features(b)
                for _, b in store.iter_batches(64, rows=rows, pad_ranks=pad)
            ]
        ).numpy()


def fit_linear_base(model: torch.nn.Module, task: Task, y: np.ndarray, x: np.ndarray) -> None:
    """Fit the model's linear base on features ``x`` (:func:`base_features`) and encoded
    targets ``y`` of the same rows, one target at a time.

    The fit is in-sample: with far more ΔW entries than LoRAs it leaves the network little to
    learn on the training rows, and so little to overfit. Training the network on out-of-fold
    residuals instead (5-fold) was tried on the development zoos and lost: R² 0.80 vs 0.99 and
    0.67 vs 0.81 on the seeds where the network then moved off the base (BENCHMARKS.md).
    """
    y = y.astype(np.float64)
    fits = [fit_linear(x, y[:, j], task.kind == CLASSIFICATION) for j in range(y.shape[1])]
    weight = np.stack([c for c, _ in fits], axis=1)
    model.linear_base.set(torch.from_numpy(weight), torch.tensor([b for _, b in fits]).double())


__all__ = ["base_features", "fit_linear_base", "linear_base_kind"]
