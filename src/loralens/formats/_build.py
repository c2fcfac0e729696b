"""Parse LoRA state-dict keys into modules, pair factors by module path, and build exact layers.

Every format reduces to: for each module path, a down factor ``A`` (r x in, or r x in x k... for
conv, or r x num_embeddings for embeddings), an up factor ``B`` (out x r, ...), an optional
``alpha``, DoRA magnitude and lora_B bias. Pairing is by parsed module path, never by position;
any key that is parsed but left without its partner, or that is not understood, is an error.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loralens.formats.errors import LoRAFormatError
from loralens.lora import LoRALayer

# PEFT: <module>.lora_A[.<adapter>].weight, <module>.lora_embedding_A[.<adapter>], ...
PEFT_KEY = re.compile(
    r"^(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.(?!(?:weight|bias)$)(?P<adapter>[^.]+))?(?:\.(?P<param>weight|bias))?$"
)
# kohya (and kohya-like): <module>.lora_down.weight, <module>.lora_up.weight, <module>.alpha
KOHYA_KEY = re.compile(r"^(?P<module>.+?)\.(?P<kind>lora_down|lora_up)\.weight$")
# old diffusers: <module>.lora.down.weight, <attn>.processor.to_q_lora.down.weight,
# <module>.lora_linear_layer.down.weight
DIFFUSERS_KEY = re.compile(
    r"^(?P<module>.+?)(?P<sep>\.lora|_lora|\.lora_linear_layer)\.(?P<kind>down|up)\.weight$"
)
ALPHA_KEY = re.compile(r"^(?P<module>.+)\.alpha$")
DORA_SCALE_KEY = re.compile(r"^(?P<module>.+)\.dora_scale$")
# LyCORIS and other adapter families that are not plain low-rank products
FOREIGN_MARKERS = ("hada_w1", "hada_w2", "lokr_w1", "lokr_w2", "lora_mid", ".oft_", "b_norm")


def natural_key(name: str) -> tuple:
    """Sort key that compares digit runs as integers: layers.2 < layers.10."""
    parts = re.split(r"(\d+)", name)
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts))


@dataclass
class ModuleParts:
    """Tensors found for one module path, by role, with the key each came from."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)
    adapters: set[str] = field(default_factory=set)


ROLE_OF_PEFT = {
    ("lora_A", "weight"): "A",
    ("lora_B", "weight"): "B",
    ("lora_B", "bias"): "B_bias",
    ("lora_embedding_A", None): "eA",
    ("lora_embedding_B", None): "eB",
    ("lora_magnitude_vector", None): "mag",
    ("lora_magnitude_vector", "weight"): "mag",
}


def parse_keys(
    tensors: dict[str, torch.Tensor], path: Path, *, strip_prefix: str = ""
) -> tuple[dict[str, ModuleParts], list[str]]:
    """Group a state dict's keys by module path and role; return (modules, unparsed keys)."""
    modules: dict[str, ModuleParts] = {}
    unparsed: list[str] = []

    def put(module: str, role: str, key: str, adapter: str | None = None) -> None:
        if strip_prefix and module.startswith(strip_prefix):
            module = module[len(strip_prefix) :]
        parts = modules.setdefault(module, ModuleParts())
        if role in parts.tensors:
            raise LoRAFormatError(
                path,
                f"two tensors for the same {role!r} of module {module!r}: "
                f"{parts.keys[role]!r} and {key!r}",
            )
        parts.tensors[role] = tensors[key]
        parts.keys[role] = key
        if adapter is not None:
            parts.adapters.add(adapter)

    for key in tensors:
        if any(marker in key for marker in FOREIGN_MARKERS):
            raise LoRAFormatError(
                path,
                f"key {key!r} belongs to a LyCORIS/LoCon-Tucker/OFT-style adapter, which is not "
                "a plain low-rank product U V^T; loralens reads LoRA adapters only",
            )
        m = PEFT_KEY.match(key)
        if m:
            role = ROLE_OF_PEFT.get((m["kind"], m["param"]))
            if role is None:
                unparsed.append(key)
                continue
            put(m["module"], role, key, m["adapter"])
            continue
        m = KOHYA_KEY.match(key)
        if m:
            put(m["module"], "A" if m["kind"] == "lora_down" else "B", key)
            continue
        m = DIFFUSERS_KEY.match(key)
        if m:
            module = m["module"]
            if m["sep"] == "_lora":  # attention-processor style: attn1.processor.to_q_lora
                module = module.replace(".processor.", ".")
                if module.endswith(".to_out"):
                    module += ".0"
            put(module, "A" if m["kind"] == "down" else "B", key)
            continue
        m = ALPHA_KEY.match(key)
        if m:
            put(m["module"], "alpha", key)
            continue
        m = DORA_SCALE_KEY.match(key)
        if m:
            put(m["module"], "mag", key)
            continue
        unparsed.append(key)

    adapters = set().union(*(p.adapters for p in modules.values())) if modules else set()
    if len(adapters) > 1:
        raise LoRAFormatError(
            path,
            f"keys carry several adapter names {sorted(adapters)}; save one adapter per file",
        )
    return modules, unparsed


def check_finite(t: torch.Tensor, path: Path, layer: str, what: str, allow: bool) -> None:
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
        check_finite(A32, path, name, parts.keys[a_role], allow_nonfinite)
        check_finite(B32, path, name, parts.keys[b_role], allow_nonfinite)
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
            check_finite(mag, path, name, parts.keys["mag"], allow_nonfinite)
            meta["magnitude"] = mag
        if "B_bias" in t:
            bias = _f32(t["B_bias"])
            check_finite(bias, path, name, parts.keys["B_bias"], allow_nonfinite)
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
