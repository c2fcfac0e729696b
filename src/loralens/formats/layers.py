"""Build exact :class:`~loralens.lora.LoRALayer` s from parsed keys: pair each module's factors,
check shapes, ranks and finiteness, and fold the format's scale into U.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from loralens.formats.errors import LoRAFormatError
from loralens.formats.keys import ModuleParts, natural_key
from loralens.lora import LoRALayer


def _check_finite(t: torch.Tensor, path: Path, layer: str, what: str, allow: bool) -> None:
    """Refuse NaN/inf in ``t`` (naming the file, layer and key) unless ``allow``."""
    if not allow and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise LoRAFormatError(
            path,
            f"layer {layer!r}: {what} holds {bad} NaN/inf value(s); pass allow_nonfinite=True "
            "to load it anyway",
        )


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32).contiguous()


ScaleFn = Callable[[str, int, ModuleParts], tuple[float, int | None, dict[str, Any]]]


def build_layers(
    modules: dict[str, ModuleParts],
    path: Path,
    scale_for: ScaleFn,
    *,
    allow_nonfinite: bool,
    fan_in_fan_out: bool = False,
) -> list[LoRALayer]:
    """One exact layer per module, in natural module order.

    ``scale_for(name, rank, parts)`` returns (scale, the rank the config expects or None,
    extra meta). Raises on unpaired parts, shape mismatches and ranks that disagree.
    """
    layers = []
    for name in sorted(modules, key=natural_key):
        parts = modules[name]
        t = parts.tensors
        has_lin = "A" in t or "B" in t
        has_emb = "eA" in t or "eB" in t
        if has_lin and has_emb:
            raise LoRAFormatError(
                path, f"module {name!r} has both lora_A/B and lora_embedding_A/B tensors"
            )
        a_role, b_role = ("eA", "eB") if has_emb else ("A", "B")
        if a_role not in t or b_role not in t:
            present = ", ".join(parts.keys[r] for r in sorted(parts.keys))
            missing = "down/A" if a_role not in t else "up/B"
            raise LoRAFormatError(
                path, f"unpaired key(s) for module {name!r}: {present} (no {missing} factor)"
            )
        A, B = t[a_role], t[b_role]
        kind, meta = _kind_and_check(name, A, B, has_emb, path)
        rank = int(A.shape[0])
        if rank == 0:
            raise LoRAFormatError(path, f"module {name!r} has rank 0 ({parts.keys[a_role]!r})")
        scale, expected_rank, extra = scale_for(name, rank, parts)
        if expected_rank is not None and expected_rank != rank:
            raise LoRAFormatError(
                path,
                f"module {name!r} has rank {rank} (from {parts.keys[a_role]!r}, shape "
                f"{tuple(A.shape)}) but the config says r={expected_rank}",
            )
        A32, B32 = _f32(A), _f32(B)
        _check_finite(A32, path, name, parts.keys[a_role], allow_nonfinite)
        _check_finite(B32, path, name, parts.keys[b_role], allow_nonfinite)
        if kind == "embedding":
            # delta (num_embeddings x dim) = (B @ A).T * scale = (A.T * scale) @ B.T
            U, V = A32.T * scale, B32
        else:
            U = B32.reshape(B32.shape[0], rank) * scale
            V = A32.reshape(rank, -1).T
        meta.update(kind=kind, scale=float(scale), dtype=str(A.dtype).replace("torch.", ""))
        if kind == "linear":
            meta["fan_in_fan_out"] = bool(fan_in_fan_out)
        if "mag" in t:
            mag = _f32(t["mag"])
            _check_finite(mag, path, name, parts.keys["mag"], allow_nonfinite)
            meta["magnitude"] = mag
        if "B_bias" in t:
            bias = _f32(t["B_bias"])
            _check_finite(bias, path, name, parts.keys["B_bias"], allow_nonfinite)
            meta["lora_bias"] = bias * scale  # what PEFT adds to the base bias on merge
        meta.update(extra)
        layers.append(LoRALayer(name=name, U=U.contiguous(), V=V.contiguous(), meta=meta))
    return layers


def _kind_and_check(
    name: str, A: torch.Tensor, B: torch.Tensor, embedding: bool, path: Path
) -> tuple[str, dict[str, Any]]:
    shapes = f"A {tuple(A.shape)}, B {tuple(B.shape)}"
    if embedding:
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise LoRAFormatError(
                path,
                f"module {name!r}: embedding factors do not fit (expected lora_embedding_A "
                f"r x num_embeddings and lora_embedding_B dim x r): {shapes}",
            )
        return "embedding", {}
    if A.ndim == 2 and B.ndim == 2:
        if A.shape[0] != B.shape[1]:
            raise LoRAFormatError(
                path,
                f"module {name!r}: A/B shape mismatch (expected A r x in, B out x r): {shapes}",
            )
        return "linear", {}
    if A.ndim >= 3 and B.ndim == A.ndim:
        if A.shape[0] != B.shape[1] or any(int(s) != 1 for s in B.shape[2:]):
            raise LoRAFormatError(
                path,
                f"module {name!r}: conv A/B shape mismatch (expected A r x in x kernel..., "
                f"B out x r x 1...): {shapes}",
            )
        return "conv", {
            "kernel_size": [int(s) for s in A.shape[2:]],
            "in_channels": int(A.shape[1]),
        }
    raise LoRAFormatError(
        path, f"module {name!r}: A/B shape mismatch (different numbers of axes): {shapes}"
    )


def alpha_scale(path: Path, name: str, rank: int, parts: ModuleParts) -> float:
    """kohya/diffusers rule: scale = alpha / rank, and alpha 0 or missing means alpha = rank."""
    if "alpha" not in parts.tensors:
        return 1.0
    a = parts.tensors["alpha"]
    if a.numel() != 1:
        raise LoRAFormatError(
            path,
            f"module {name!r}: alpha {parts.keys['alpha']!r} is not a scalar: {tuple(a.shape)}",
        )
    alpha = float(a.to(torch.float64).item())
    if not math.isfinite(alpha):
        raise LoRAFormatError(path, f"module {name!r}: alpha is {alpha}")
    if alpha == 0:
        return 1.0
    return alpha / rank
