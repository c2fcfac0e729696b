"""A model's linear base: a fixed linear map of ΔW (or of its spectrum) that the network adds to.

On a few hundred LoRAs a ridge regression on the dense ΔW is hard to beat (issue 13: R² 0.91
against 0.55 for GL-net alone on a zoo nobody tuned on), and a network trained from scratch
forgets what the ridge knows. So a model may carry a ridge (logistic) fit, made once before
training on the training rows, and learn only what it misses:

    output = base(ΔW) + gate * network(LoRA)

``gate`` is a learned scalar starting at 1; training measures the base alone (the gate shut)
as "epoch 0", so early stopping keeps the plain linear fit when the network never beats it. Both bases are functions of
ΔW = U Vᵀ alone, so they keep every GL(r) invariance of the network they are added to:

- ``dense``: ⟨A_l, ΔW_l⟩ summed over layers (needs ΔW of each LoRA in memory once per batch);
- ``spectral``: a linear map of each layer's singular values and ΔW norm, and their logs
  (``features.svals_and_norms``; fits any size). Singular values past the training rank are
  dropped, those missing are zero.
"""

from __future__ import annotations

import torch
from torch import nn

from loralens.errors import SettingsError
from loralens.features import spectral_stats, svals_and_norms
from loralens.lora import LayerSpec, LoRABatch

KINDS = ("none", "dense", "spectral")
#: Added before the logarithm of spectral features (zero-padded singular values stay finite).
LOG_EPS = 1e-8


def spectral_width(spec: LayerSpec) -> int:
    """Singular values kept per layer by the spectral features of LoRAs shaped like ``spec``."""
    return max(int(r) for r in spec.ranks)


def feature_dim(kind: str, spec: LayerSpec) -> int:
    """Length of the features of ``kind`` for one LoRA shaped like ``spec``."""
    if kind == "dense":
        return sum(int(o) * int(i) for o, i in spec.shapes)
    return 2 * len(spec.names) * (spectral_width(spec) + 1)


def linear_features(batch: LoRABatch, kind: str, k: int | None = None) -> torch.Tensor:
    """(B, D) float64 features of ``kind`` of every LoRA of ``batch``: what the probes and the
    linear base are fitted on. "dense": ΔW; "spectral": ``k`` singular values per layer and ΔW
    norms, and their logs; "stats": ``features.spectral_stats`` (a probe only), and their logs."""
    if kind == "dense":
        feats = [w.reshape(len(batch), -1).double() for w in batch.delta_weights()]
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


class LinearBase(nn.Module):
    """``features(batch) @ weight + bias``: zero until :meth:`set` gives it a fit."""

    def __init__(self, kind: str, spec: LayerSpec, out_dim: int):
        super().__init__()
        if kind not in KINDS[1:]:
            raise SettingsError(f"linear base must be one of {list(KINDS[1:])}, got {kind!r}")
        self.kind, self.k = kind, spectral_width(spec)
        self.register_buffer("weight", torch.zeros(feature_dim(kind, spec), out_dim).double())
        self.register_buffer("bias", torch.zeros(out_dim).double())

    def features(self, batch: LoRABatch) -> torch.Tensor:
        return linear_features(batch, self.kind, self.k)

    @torch.no_grad()
    def set(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Install a fit: ``weight`` (D, out_dim) and ``bias`` (out_dim,) on the raw features."""
        self.weight.copy_(weight)
        self.bias.copy_(bias)

    def forward(self, batch: LoRABatch) -> torch.Tensor:
        return self.features(batch) @ self.weight + self.bias


__all__ = [
    "KINDS",
    "LinearBase",
    "feature_dim",
    "linear_features",
    "spectral_width",
    "unit_features",
]
