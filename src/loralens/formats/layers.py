"""Plan exact :class:`~loralens.lora.LoRALayer` s from parsed keys, then read them one at a time:
pair each module's factors, check dtypes, shapes and ranks from the file's header, and when a
layer is read, check finiteness and fold the format's scale into U.

Planning reads no values but the alphas (scalars), so a file's layer names and shapes are known
before any factor is read. Each factor is then read straight into its float32 destination (a
chunk at a time for safetensors), so reading a layer peaks near its float32 result, whatever the
file's storage dtype, and a reader that keeps one layer at a time holds about one layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loralens.formats.errors import LoRAFormatError
from loralens.formats.keys import ModuleParts, natural_key
from loralens.formats.lycoris import Expansion, lycoris_algorithm, plan_lycoris
from loralens.formats.module import ModuleReader, ScaleFn, finish_layer
from loralens.formats.tensor_file import TensorFile, open_tensor_file
from loralens.lora import LoRALayer


@dataclass
class PendingLayer:
    """One module of an open file as planned from its header: its name, its delta W's shape
    (out, in), its LyCORIS algorithm (None: plain LoRA) and DoRA magnitude convention (None:
    no magnitude); ``read(expansion)`` reads its values into the exact layer."""

    name: str
    shape: tuple[int, int]
    lycoris: str | None
    magnitude_convention: str | None
    read: Callable[[Expansion], LoRALayer]


@dataclass
class FileLayers:
    """An open weights file, its layers planned in natural module order, and the LoRA metadata
    its format records."""

    file: TensorFile
    layers: list[PendingLayer]
    metadata: dict[str, Any]


@contextmanager
def opened(path: Path) -> Iterator[TensorFile]:
    """The weights file at ``path``, open for planning: closed if planning fails, left open for
    the :class:`FileLayers` made from it otherwise."""
    file = open_tensor_file(path)
    try:
        yield file
    except BaseException:
        file.close()
        raise


def plan_layers(
    modules: dict[str, ModuleParts],
    file: TensorFile,
    scale_for: ScaleFn,
    *,
    allow_nonfinite: bool,
    fan_in_fan_out: bool = False,
) -> list[PendingLayer]:
    """One planned layer per module, in natural module order.

    Raises on unpaired parts, non-floating factors, shape mismatches, ranks that disagree with
    the config and scales that are not finite; reading a layer raises on NaN/inf factors, before
    or after scaling (unless ``allow_nonfinite``).
    """
    layers = []
    for name in sorted(modules, key=natural_key):
        mod = ModuleReader(file, name, modules[name], allow_nonfinite)
        algo = lycoris_algorithm(mod)
        if algo is None:
            layers.append(_plan_lora(mod, scale_for, fan_in_fan_out))
        else:
            layers.append(plan_lycoris(mod, algo, scale_for))
    return layers


def _plan_lora(mod: ModuleReader, scale_for: ScaleFn, fan_in_fan_out: bool) -> PendingLayer:
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
    if kind == "linear":
        meta["fan_in_fan_out"] = bool(fan_in_fan_out)
    # delta W of an embedding (num_embeddings x dim) = (B @ A).T * scale = (A.T * scale) @ B.T
    out, inp = (
        (a_shape[1], b_shape[0]) if kind == "embedding" else (b_shape[0], math.prod(a_shape[1:]))
    )
    if "B_bias" in t and mod.shape("B_bias") != (out,):
        raise mod.fail(
            f"lora_B bias {parts.keys['B_bias']!r} has shape {mod.shape('B_bias')}, "
            f"expected ({out},) (its out features)"
        )

    def read(_: Expansion) -> LoRALayer:
        U, V = torch.empty(out, rank), torch.empty(inp, rank)
        if kind == "embedding":
            mod.read(a_role, U, rows=U.T)
            mod.read(b_role, V)
            mod.scale(U, scale, a_role)
        else:
            mod.scale(mod.read(b_role, U), scale, b_role)
            mod.read(a_role, V, rows=V.T)
        layer_meta = dict(meta)
        if "B_bias" in t:
            bias = mod.read("B_bias", torch.empty(out))
            layer_meta["lora_bias"] = mod.scale(bias, scale, "B_bias")  # what PEFT adds on merge
        return finish_layer(mod, U, V, layer_meta)

    convention = mod.magnitude_convention(out, int(meta.get("in_channels", inp)))
    return PendingLayer(name, (out, inp), None, convention, read)


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
