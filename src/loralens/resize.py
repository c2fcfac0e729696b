"""``resize``: each layer's delta W replaced by its best rank-k approximation (Eckart-Young), from
the factors alone.

With U = Q_u R_u and V = Q_v R_v (thin QR, float64), delta W = Q_u (R_u R_v^T) Q_v^T, so the
singular values of delta W are those of the r x r core R_u R_v^T = P S Q^T, and the best
rank-k approximation is (Q_u P_k S_k^1/2)(Q_v Q_k S_k^1/2)^T, its Frobenius error the root-sum-square
of the dropped singular values. Cost O((out + in) r^2), against O(out in min(out, in)) for an SVD
of the dense delta W (kohya's resize script). DoRA magnitudes and lora_B biases are kept as they
are; the error is that of delta W (a DoRA layer's merge also renormalizes by the base weights).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from loralens.errors import SettingsError
from loralens.lora import LoRA, LoRALayer


def factor_svd(U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(left singular vectors out x r, singular values r, right singular vectors in x r) of
    U @ V.T in float64, from QR of U and V and an SVD of the r x r core."""
    Qu, Ru = torch.linalg.qr(U.double())
    Qv, Rv = torch.linalg.qr(V.double())
    P, s, Qt = torch.linalg.svd(Ru @ Rv.T, full_matrices=False)
    return Qu @ P, s, Qv @ Qt.T


def keep_rank(s: torch.Tensor, *, rank: int | None = None, energy: float | None = None) -> int:
    """How many singular values to keep: ``rank`` (at most as many as there are), or the fewest
    whose squares hold at least ``energy`` of the total (at least 1)."""
    if (rank is None) == (energy is None):
        raise SettingsError("give exactly one of rank and energy")
    if rank is not None:
        if rank < 1:
            raise SettingsError(f"rank must be at least 1, got {rank}")
        return min(int(rank), int(s.numel()))
    if not 0 < energy <= 1:
        raise SettingsError(f"energy must be in (0, 1], got {energy}")
    power = s.double() ** 2
    total = float(power.sum())
    if total == 0:
        return 1
    kept = torch.cumsum(power, 0) / total
    return min(int((kept < energy - 1e-12).sum()) + 1, int(s.numel()))


def resize_layer(
    layer: LoRALayer, *, rank: int | None = None, energy: float | None = None
) -> tuple[LoRALayer, dict[str, Any]]:
    """The layer at its best rank-k approximation, and a report row: name, shape, rank before
    and after, |delta W|_F, the Frobenius error and its ratio to |delta W|_F."""
    left, s, right = factor_svd(layer.U, layer.V)
    k = keep_rank(s, rank=rank, energy=energy)
    root = s[:k].sqrt()
    dtype = layer.U.dtype
    U, V = (left[:, :k] * root).to(dtype), (right[:, :k] * root).to(dtype)
    meta = {**layer.meta, "scale": 1.0, "resized_from_rank": layer.rank}
    fro = float(s.norm())
    error = float(s[k:].norm())
    row = {
        "name": layer.name,
        "shape": list(layer.shape),
        "rank": layer.rank,
        "new_rank": k,
        "fro_norm": fro,
        "error": error,
        "rel_error": error / fro if fro > 0 else 0.0,
    }
    return LoRALayer(layer.name, U.contiguous(), V.contiguous(), meta), row


def resize(
    lora: LoRA, *, rank: int | None = None, energy: float | None = None
) -> tuple[LoRA, list[dict[str, Any]]]:
    """``lora`` with every layer at its best rank-``rank`` approximation (or the smallest rank
    keeping ``energy`` of its squared singular values), and one report row per layer (see
    :func:`resize_layer`). Never forms a delta W."""
    if energy is not None and not (isinstance(energy, float | int) and math.isfinite(energy)):
        raise SettingsError(f"energy must be a number in (0, 1], got {energy!r}")
    layers, rows = [], []
    for layer in lora.layers:
        new, row = resize_layer(layer, rank=rank, energy=energy)
        layers.append(new)
        rows.append(row)
    return LoRA(layers=layers, metadata=dict(lora.metadata)), rows


def resize_file(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    rank: int | None = None,
    energy: float | None = None,
    to: str | None = None,
) -> tuple[Path, list[dict[str, Any]]]:
    """Read the LoRA at ``src``, resize it (:func:`resize`) and write it to ``out`` as ``to``
    (default: the format it was read as; LyCORIS files as kohya, ComfyUI and XLabs files as
    diffusers). Returns the path written and the report rows."""
    from loralens.formats import load_lora, write_lora
    from loralens.formats.convert import SAME_FAMILY

    lora = load_lora(src)
    small, rows = resize(lora, rank=rank, energy=energy)
    target = to or SAME_FAMILY[lora.metadata["format"]]
    return write_lora(small, out, target), rows
