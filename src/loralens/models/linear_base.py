"""A model's linear base: a fixed linear map of features of ΔW that the network adds to.

On a few hundred LoRAs a ridge regression on ΔW is hard to beat (R² 0.91 against 0.55 for GL-net
alone on a zoo nobody tuned on), and a network trained from scratch forgets what the ridge
knows. So a model may carry a ridge (logistic) fit, made once before training on the training
rows, and learn only what it misses:

    output = base(ΔW) + gate * network(LoRA)

``gate`` is a learned scalar starting at 1; training measures the base alone (the gate shut)
as "epoch 0", so early stopping keeps the plain linear fit when the network never beats it. Both bases are functions of
ΔW = U Vᵀ alone, so they keep every GL(r) invariance of the network they are added to:

- ``update``: per layer, the direction of the update ΔW / |ΔW| and the ``spectral`` features:
  what a LoRA changes, how much, and how its change is spread over directions. The default: on
  the development zoos it beat a ridge on ΔW itself (benchmarks/BENCHMARKS.md);
- ``dense``: ⟨A_l, ΔW_l⟩ summed over layers;
- ``spectral``: a linear map of each layer's singular values and ΔW norm, and their logs
  (``features.svals_and_norms``; fits any size). Singular values past the training rank are
  dropped, those missing are zero.

A model with a basis (:mod:`loralens.models.basis`) hands its base the projected factors, so ΔW
is the k_out x k_in matrix of the update in the training updates' directions: the same inner
products as the flattened ΔW inside their span, at a size that does not grow with the width.

How the features are scaled for the fit (:func:`fit_scale`) is part of the base: each layer's
block of ΔW (or of its direction) to unit mean square, so every layer counts alike whatever its
size or basis (a ridge on it is unchanged by any rotation of a layer's inputs or outputs);
``spectral`` features one by one; ΔW of a model without a basis entry by entry, as it was fitted
before bases existed.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from loralens.errors import SettingsError
from loralens.features import spectral_stats, svals_and_norms
from loralens.lora import LayerSpec, LoRABatch

KINDS = ("none", "update", "dense", "spectral")
#: The fits an ``update`` base chooses among by cross-validation on its training rows: each
#: layer's block as the direction ΔW / |ΔW| (``delta`` False) or as ΔW itself (True: a label
#: linear in ΔW), and the total variance of each layer's spectral features against 1 for the
#: block. On the development zoos eval_loss wanted 4-8, data membership at most 0.5, and no
#: label ΔW itself (BENCHMARKS.md).
UPDATE_FITS = ((False, 0.5), (False, 2.0), (False, 8.0), (True, 0.5))
#: Added before the logarithm of spectral features (zero-padded singular values stay finite).
LOG_EPS = 1e-8


def spectral_width(spec: LayerSpec) -> int:
    """Singular values kept per layer by the spectral features of LoRAs shaped like ``spec``."""
    return max(int(r) for r in spec.ranks)


def feature_dim(kind: str, spec: LayerSpec) -> int:
    """Length of the features of ``kind`` for one LoRA shaped like ``spec``."""
    dense = sum(int(o) * int(i) for o, i in spec.shapes)
    spectral = 2 * len(spec.names) * (spectral_width(spec) + 1)
    return {"dense": dense, "spectral": spectral, "update": dense + spectral}[kind]


def linear_features(
    batch: LoRABatch, kind: str, k: int | None = None, delta: bool = False
) -> torch.Tensor:
    """(B, D) float64 features of ``kind`` of every LoRA of ``batch``: what the probes and the
    linear base are fitted on. "dense": ΔW; "spectral": ``k`` singular values per layer and ΔW
    norms, and their logs; "update": each layer's ΔW / |ΔW| (or ΔW itself, ``delta``), then
    the spectral features; "stats": ``features.spectral_stats`` (a probe only), and their logs."""
    if kind == "dense":
        feats = [w.reshape(len(batch), -1).double() for w in batch.delta_weights()]
    elif kind == "update":
        blocks = linear_features(batch, "dense") if delta else unit_features(batch, "dense", 0)
        feats = [blocks, linear_features(batch, "spectral", k)]
    elif kind == "stats":
        st = spectral_stats(batch).reshape(len(batch), -1).double()
        feats = [st, torch.log(st.abs() + LOG_EPS)]
    else:
        s, norms = svals_and_norms(batch, k)
        both = torch.cat([s.reshape(len(batch), -1), norms.reshape(len(batch), -1)], 1).double()
        feats = [both, torch.log(both + LOG_EPS)]
    return torch.cat(feats, dim=1)


def unit_features(batch: LoRABatch, kind: str, k: int) -> torch.Tensor:
    """(B, D) float64 scale-free features: each layer's ΔW ("dense") or its ``k`` singular values
    ("spectral") divided by the layer's ΔW norm, so a LoRA scaled by any factor keeps them (the
    fit check predicts a LoRA's update size from them: :mod:`loralens.learn.trust.fitcheck`)."""
    if kind == "dense":
        feats = [w.reshape(len(batch), -1).double() for w in batch.delta_weights()]
        return torch.cat([f / f.norm(dim=1, keepdim=True).clamp_min(LOG_EPS) for f in feats], 1)
    s, norms = svals_and_norms(batch, k)
    s, norms = s.double(), norms.double()
    return (s / norms.clamp_min(LOG_EPS)[..., None]).reshape(len(batch), -1)


def fit_scale(
    x: np.ndarray, kind: str, spec: LayerSpec, per_entry: bool, spectral_weight: float = 1.0
) -> np.ndarray:
    """(D,) what each feature of ``kind`` is divided by (after centering) for the base's fit on
    the rows ``x``: a layer's ΔW or direction block by its root mean square (unit total
    variance per layer), spectral features each by its standard deviation, in an ``update``
    base the layer's spectral block scaled to ``spectral_weight`` in all; ``per_entry`` ΔW (a
    model without a basis) entry by entry. Constant features keep scale 1."""
    x = np.asarray(x, dtype=np.float64)
    centered = x - x.mean(axis=0)
    std = centered.std(axis=0)
    scale = np.where(std > 0, std, 1.0)
    dense = sum(int(o) * int(i) for o, i in spec.shapes) if kind in ("dense", "update") else 0
    if not per_entry or kind == "update":
        start = 0
        for o, i in spec.shapes:
            block = centered[:, start : start + int(o) * int(i)]
            rms = float(np.sqrt((block * block).sum(axis=1).mean()))
            scale[start : start + int(o) * int(i)] = rms if rms > 0 else 1.0
            start += int(o) * int(i)
    if kind == "update":
        scale[dense:] *= math.sqrt(2 * (spectral_width(spec) + 1) / spectral_weight)
    return scale


class LinearBase(nn.Module):
    """``features(batch) @ weight + bias``: zero until :meth:`set` gives it a fit."""

    def __init__(self, kind: str, spec: LayerSpec, out_dim: int):
        super().__init__()
        if kind not in KINDS[1:]:
            raise SettingsError(f"linear base must be one of {list(KINDS[1:])}, got {kind!r}")
        self.kind, self.k = kind, spectral_width(spec)
        self.register_buffer("weight", torch.zeros(feature_dim(kind, spec), out_dim).double())
        self.register_buffer("bias", torch.zeros(out_dim).double())
        if kind == "update":  # 1: its blocks are ΔW itself, 0: their directions (UPDATE_FITS)
            self.register_buffer("delta", torch.zeros((), dtype=torch.float64))

    def features(self, batch: LoRABatch, delta: bool | None = None) -> torch.Tensor:
        """The features the base reads (an ``update`` base's fitted form, or ``delta``'s)."""
        if delta is None:
            delta = self.kind == "update" and bool(self.delta)
        return linear_features(batch, self.kind, self.k, delta)

    @torch.no_grad()
    def set(self, weight: torch.Tensor, bias: torch.Tensor, delta: bool = False) -> None:
        """Install a fit: ``weight`` (D, out_dim) and ``bias`` (out_dim,) on the raw features
        (of ΔW itself in an ``update`` base's blocks where ``delta``)."""
        self.weight.copy_(weight)
        self.bias.copy_(bias)
        if self.kind == "update":
            self.delta.fill_(float(delta))

    def forward(self, batch: LoRABatch) -> torch.Tensor:
        return self.features(batch) @ self.weight + self.bias


__all__ = [
    "KINDS",
    "UPDATE_FITS",
    "LinearBase",
    "feature_dim",
    "fit_scale",
    "linear_features",
    "spectral_width",
    "unit_features",
]
