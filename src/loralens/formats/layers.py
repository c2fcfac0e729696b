"""Build exact :class:`~loralens.lora.LoRALayer` s from parsed keys: pair each module's factors,
check dtypes, shapes, ranks and finiteness, and fold the format's scale into U.

Shapes and dtypes are checked from the file's header before any values are read; each factor is
then read straight into its float32 destination (a chunk at a time for safetensors), so reading
peaks near the float32 result, whatever the file's storage dtype.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from loralens.formats.errors import LoRAFormatError
from loralens.formats.keys import ModuleParts, natural_key
from loralens.formats.lycoris import Expansion, lycoris_algorithm, read_lycoris
from loralens.formats.module import ModuleReader, ScaleFn, finish_layer
from loralens.formats.tensor_file import TensorFile
from loralens.lora import LoRALayer


def build_layers(
    modules: dict[str, ModuleParts],
    file: TensorFile,
    scale_for: ScaleFn,
    *,
    allow_nonfinite: bool,
    fan_in_fan_out: bool = False,
) -> list[LoRALayer]:
    """One exact layer per module, in natural module order, read from ``file`` one at a time.

    Raises on unpaired parts, non-floating factors, shape mismatches, ranks that disagree with
    the config, scales that are not finite and (unless ``allow_nonfinite``) NaN/inf factors,
    before or after scaling.
    """
    layers = []
    expansion = Expansion()
    for name in sorted(modules, key=natural_key):
        mod = ModuleReader(file, name, modules[name], allow_nonfinite)
        algo = lycoris_algorithm(mod)
        if algo is None:
            layers.append(_lora_layer(mod, scale_for, fan_in_fan_out))
        else:
            layers.append(read_lycoris(mod, algo, scale_for, expansion))
    return layers


def _lora_layer(mod: ModuleReader, scale_for: ScaleFn, fan_in_fan_out: bool) -> LoRALayer:
    """A plain LoRA layer (down/up or lora_A/B factors, linear, conv or embedding)."""
    path, name, parts = mod.file.path, mod.name, mod.parts
    t = parts.keys
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
    a_shape, b_shape = mod.shape(a_role), mod.shape(b_role)
    kind, meta = _kind_and_check(name, a_shape, b_shape, has_emb, path)
    dtype = mod.floating(a_role)
    for role in (b_role, "mag", "B_bias"):
        if role in t:
            mod.floating(role)
    rank = a_shape[0]
    scale = mod.scale_for(scale_for, rank, a_role)
    meta.update(kind=kind, scale=scale, dtype=str(dtype).replace("torch.", ""))
    if kind == "embedding":
        # delta (num_embeddings x dim) = (B @ A).T * scale = (A.T * scale) @ B.T
        U = torch.empty(a_shape[1], rank)
        mod.read(a_role, U, rows=U.T)
        V = mod.read(b_role, torch.empty(b_shape[0], rank))
        mod.scale(U, scale, a_role)
    else:
        U = mod.scale(mod.read(b_role, torch.empty(b_shape[0], rank)), scale, b_role)
        V = torch.empty(math.prod(a_shape[1:]), rank)
        mod.read(a_role, V, rows=V.T)
    if kind == "linear":
        meta["fan_in_fan_out"] = bool(fan_in_fan_out)
    if "B_bias" in t:
        if mod.shape("B_bias") != (U.shape[0],):
            raise mod.fail(
                f"lora_B bias {parts.keys['B_bias']!r} has shape {mod.shape('B_bias')}, "
                f"expected ({U.shape[0]},) (its out features)"
            )
        bias = mod.read("B_bias", torch.empty(U.shape[0]))
        meta["lora_bias"] = mod.scale(bias, scale, "B_bias")  # what PEFT adds on merge
    return finish_layer(mod, U, V, meta)


def _kind_and_check(
    name: str, A: tuple[int, ...], B: tuple[int, ...], embedding: bool, path: Path
) -> tuple[str, dict[str, Any]]:
    """(kind, meta) of a module from its factors' shapes; refuses shapes that do not pair."""
    shapes = f"A {A}, B {B}"
    if 0 in A or 0 in B:
        raise LoRAFormatError(path, f"module {name!r} has an empty factor: {shapes}")
    if embedding:
        if len(A) != 2 or len(B) != 2 or A[0] != B[1]:
            raise LoRAFormatError(
                path,
                f"module {name!r}: embedding factors do not fit (expected lora_embedding_A "
                f"r x num_embeddings and lora_embedding_B dim x r): {shapes}",
            )
        return "embedding", {}
    if len(A) == 2 and len(B) == 2:
        if A[0] != B[1]:
            raise LoRAFormatError(
                path,
                f"module {name!r}: A/B shape mismatch (expected A r x in, B out x r): {shapes}",
            )
        return "linear", {}
    if len(A) >= 3 and len(B) == len(A):
        if A[0] != B[1] or any(int(s) != 1 for s in B[2:]):
            raise LoRAFormatError(
                path,
                f"module {name!r}: conv A/B shape mismatch (expected A r x in x kernel..., "
                f"B out x r x 1...): {shapes}",
            )
        return "conv", {
            "kernel_size": [int(s) for s in A[2:]],
            "in_channels": int(A[1]),
        }
    raise LoRAFormatError(
        path, f"module {name!r}: A/B shape mismatch (different numbers of axes): {shapes}"
    )


def alpha_scale(rank: int | None, alpha: float | None) -> float:
    """kohya/diffusers/LyCORIS rule: scale = alpha / rank, and alpha 0 or missing means alpha =
    rank; a module without a rank (a LoKr with both halves full) has scale 1."""
    if not alpha or rank is None:
        return 1.0
    return alpha / rank
