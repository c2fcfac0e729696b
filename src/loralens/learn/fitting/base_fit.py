"""Fitting a model's linear base (:mod:`loralens.models.linear_base`) before its network trains:
which base, and its ridge/logistic fit on the training rows."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from loralens.learn.fitting.data import ProjectedRows
from loralens.learn.fitting.probes import DENSE_MAX_BYTES, dense_bytes, fit_linear_scored
from loralens.learn.fitting.tasks import CLASSIFICATION, Task
from loralens.models.basis import UpdateBasis
from loralens.models.linear_base import UPDATE_FITS, fit_scale
from loralens.store import LoRAStore


def linear_base_kind(
    store: LoRAStore, requested: str, rows: np.ndarray, basis: UpdateBasis | None = None
) -> tuple[str, str]:
    """(the linear base to fit, why): ``requested``, with "auto" resolved to "update" where
    the model reads LoRAs through a ``basis`` (its features are bounded whatever the width),
    else by the size of the training LoRAs' dense ΔW ("dense", or "spectral" past
    ``DENSE_MAX_BYTES``)."""
    if requested != "auto":
        return requested, f"asked for (--linear-base {requested})"
    if basis is not None:
        feats = sum(a * b for a, b in basis.sizes)
        return "update", (
            f"auto: each layer's update in the basis of the training updates ({feats} features, "
            f"{basis.energy():.3f} of their energy kept), over its norm, and the spectra"
        )
    size = dense_bytes(store, len(rows))
    if size <= DENSE_MAX_BYTES:
        return (
            "dense",
            f"auto without a basis: the training LoRAs' ΔW fits ({size / 2**20:.0f} MiB)",
        )
    return "spectral", (
        f"auto without a basis (--basis none): the training LoRAs' ΔW would take "
        f"{size / 2**30:.1f} GiB, past {DENSE_MAX_BYTES / 2**30:.0f} GiB"
    )


def base_features(
    store: LoRAStore | ProjectedRows, model: torch.nn.Module, rows: np.ndarray
) -> dict[bool, np.ndarray]:
    """The features of store ``rows`` that the model's linear base may read, computed by the
    model itself (so fitting and prediction see the very same map, through its basis): one
    (len(rows), D) array per form the fit chooses among, keyed by ``delta`` (an ``update``
    base's blocks as ΔW itself, or as directions; other bases have only False)."""
    base = model.linear_base
    forms = (False, True) if base.kind == "update" else (False,)
    pad = [int(r) for r in model.spec.ranks]
    parts: dict[bool, list[torch.Tensor]] = {d: [] for d in forms}
    with torch.no_grad():
        for _, b in store.iter_batches(64, rows=rows, pad_ranks=pad):
            inner = model.prepare(b)
            for d in forms:
                parts[d].append(base.features(inner, d))
    return {d: torch.cat(p).numpy() for d, p in parts.items()}


@dataclass
class BaseFit:
    """A linear base's fit: its form (``delta``), (D, out) weights and (out,) bias."""

    delta: bool
    weight: np.ndarray
    bias: np.ndarray

    def predict(self, xs: Mapping[bool, np.ndarray]) -> np.ndarray:
        """Raw outputs on the features ``xs`` (:func:`base_features`) of other rows."""
        return xs[self.delta].astype(np.float64) @ self.weight + self.bias


def fit_base(
    model: torch.nn.Module, task: Task, y: np.ndarray, xs: Mapping[bool, np.ndarray]
) -> BaseFit:
    """The ridge (logistic) fit of the model's linear base on features ``xs``
    (:func:`base_features`) and encoded targets ``y`` of the same rows, one target at a time:
    an ``update`` base tries each of ``UPDATE_FITS`` and keeps, per target, the spectral weight
    its cross-validation prefers, and the form (directions or ΔW) preferred over all targets."""
    base = model.linear_base
    y = y.astype(np.float64)
    cls = task.kind == CLASSIFICATION
    per_entry = model.basis is None
    tries = UPDATE_FITS if base.kind == "update" else ((False, 1.0),)
    best: dict[bool, list[tuple[np.ndarray, float, float]]] = {}
    for delta, weight in tries:
        scale = fit_scale(xs[delta], base.kind, model.inner, per_entry, weight)
        fits = [fit_linear_scored(xs[delta], y[:, j], cls, scale) for j in range(y.shape[1])]
        kept = best.setdefault(delta, fits)
        best[delta] = [new if new[2] > old[2] else old for new, old in zip(fits, kept)]
    delta = max(best, key=lambda d: sum(f[2] for f in best[d]))
    fits = best[delta]
    return BaseFit(
        delta, np.stack([c for c, _, _ in fits], axis=1), np.array([b for _, b, _ in fits])
    )


def fit_linear_base(
    model: torch.nn.Module, task: Task, y: np.ndarray, xs: Mapping[bool, np.ndarray]
) -> None:
    """Fit the model's linear base (:func:`fit_base`) and install it.

    The fit is in-sample: with far more ΔW entries than LoRAs it leaves the network little to
    learn on the training rows, and so little to overfit. Training the network on out-of-fold
    residuals instead (5-fold) was tried on the development zoos and lost: R² 0.80 vs 0.99 and
    0.67 vs 0.81 on the seeds where the network then moved off the base (BENCHMARKS.md).
    """
    fit = fit_base(model, task, y, xs)
    model.linear_base.set(
        torch.from_numpy(fit.weight), torch.from_numpy(fit.bias).double(), fit.delta
    )


@torch.no_grad()
def warm_start(
    model: torch.nn.Module,
    task: Task,
    y: np.ndarray,
    rows: LoRAStore | ProjectedRows,
    fit_rows: np.ndarray,
) -> None:
    """Start a network without a linear base whose output has a linear path from invariant
    features (GL-net's log scales and spectra) at the ridge (logistic) fit of that path on the
    training rows: its input standardization is first set from those rows. Networks without
    such a path are left as built."""
    if not hasattr(model, "skip_features"):
        return
    pad = [int(r) for r in model.spec.ranks]
    batches = [b for _, b in rows.iter_batches(64, rows=fit_rows, pad_ranks=pad)]
    model.train()
    for b in batches:  # the running standardization sees the training rows once
        model.embed(b)
    model.eval()
    f = torch.cat([model.skip_features(model.embed(b)) for b in batches]).double().numpy()
    y = y.astype(np.float64)
    fits = [fit_linear_scored(f, y[:, j], task.kind == CLASSIFICATION) for j in range(y.shape[1])]
    model.set_skip(
        torch.from_numpy(np.stack([c for c, _, _ in fits], axis=1)),
        torch.tensor([b for _, b, _ in fits]),
    )


__all__ = [
    "BaseFit",
    "base_features",
    "fit_base",
    "fit_linear_base",
    "linear_base_kind",
    "warm_start",
]
