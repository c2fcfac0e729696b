"""Build exact :class:`~loralens.lora.LoRALayer` s from parsed keys: pair each module's factors,
check dtypes, shapes, ranks and finiteness, and fold the format's scale into U.

Shapes and dtypes are checked from the file's header before any values are read; each factor is
then read straight into its float32 destination (a chunk at a time for safetensors), so reading
peaks near the float32 result, whatever the file's storage dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from loralens.formats.errors import LoRAFormatError
from loralens.formats.keys import ModuleParts, natural_key
from loralens.formats.tensor_file import TensorFile, as_rows
from loralens.lora import LoRALayer

#: ``scale_for(name, rank, parts, alpha)`` -> (scale, the rank the config expects or None);
#: ``alpha`` is the value of the module's alpha key, if it has one.
ScaleFn = Callable[[str, int, ModuleParts, "float | None"], "tuple[float, int | None]"]


def _all_finite(t: torch.Tensor) -> bool:
    """Whether ``t`` holds no NaN/inf. A sum is finite only if every term is (NaN and inf
    propagate), and summing is ~30x faster than ``isfinite`` on CPU; a sum that overflows
    (huge but finite values) falls back to the exact test."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


class _Module:
    """One module's keys in an open file, with the checks every reader applies to them."""

    def __init__(self, file: TensorFile, name: str, parts: ModuleParts, allow: bool) -> None:
        self.file, self.name, self.parts, self.allow = file, name, parts, allow

    def fail(self, problem: str) -> LoRAFormatError:
        return LoRAFormatError(self.file.path, f"module {self.name!r}: {problem}")

    def shape(self, role: str) -> tuple[int, ...]:
        return self.file.shape(self.parts.keys[role])

    def floating(self, role: str) -> torch.dtype:
        """The dtype of the tensor in ``role``, refused unless it is floating point."""
        key = self.parts.keys[role]
        dtype = self.file.dtype(key)
        if not dtype.is_floating_point:
            raise self.fail(
                f"{key!r} has dtype {str(dtype).removeprefix('torch.')}; LoRA factors, "
                "magnitudes and biases are floating point"
            )
        return dtype

    def check_finite(self, t: torch.Tensor, what: str) -> None:
        """Refuse NaN/inf in ``t`` (naming the file, layer and key) unless allowed."""
        if not self.allow and not _all_finite(t):
            bad = int((~torch.isfinite(t)).sum())
            raise LoRAFormatError(
                self.file.path,
                f"layer {self.name!r}: {what} holds {bad} NaN/inf value(s); pass "
                "allow_nonfinite=True to load it anyway",
            )

    def read(self, role: str, out: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Read ``role`` into the float32 ``out`` (through ``rows``, its first axis by the rest,
        when ``out`` is laid out otherwise) and check it is finite."""
        self.file.read_into(self.parts.keys[role], as_rows(out) if rows is None else rows)
        self.check_finite(out, repr(self.parts.keys[role]))
        return out

    def scale(self, t: torch.Tensor, scale: float, role: str) -> torch.Tensor:
        """``t *= scale``, refused if that overflows."""
        t.mul_(scale)
        if abs(scale) > 1:
            self.check_finite(t, f"{self.parts.keys[role]!r} times the scale {scale:g}")
        return t

    def alpha(self) -> float | None:
        """The value of the module's alpha key (a real scalar), or None without one."""
        if "alpha" not in self.parts.keys:
            return None
        key = self.parts.keys["alpha"]
        dtype, shape = self.file.dtype(key), self.shape("alpha")
        if math.prod(shape) != 1 or dtype == torch.bool or dtype.is_complex:
            raise self.fail(
                f"alpha {key!r} is not a real scalar: {str(dtype).removeprefix('torch.')} {shape}"
            )
        alpha = float(self.file.read(key, torch.float64).item())
        if not math.isfinite(alpha):
            raise self.fail(f"alpha is {alpha}")
        return alpha


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
    path = file.path
    layers = []
    for name in sorted(modules, key=natural_key):
        parts = modules[name]
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
        mod = _Module(file, name, parts, allow_nonfinite)
        a_shape, b_shape = mod.shape(a_role), mod.shape(b_role)
        kind, meta = _kind_and_check(name, a_shape, b_shape, has_emb, path)
        dtype = mod.floating(a_role)
        for role in (b_role, "mag", "B_bias"):
            if role in t:
                mod.floating(role)
        rank = a_shape[0]
        scale, expected_rank = scale_for(name, rank, parts, mod.alpha())
        if not math.isfinite(scale):
            raise mod.fail(f"its scale is {scale}")
        if expected_rank is not None and expected_rank != rank:
            raise LoRAFormatError(
                path,
                f"module {name!r} has rank {rank} (from {parts.keys[a_role]!r}, shape "
                f"{a_shape}) but the config says r={expected_rank}",
            )
        meta.update(kind=kind, scale=float(scale), dtype=str(dtype).replace("torch.", ""))
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
        if not allow_nonfinite:
            _check_delta_fits(mod, U, V)
        if kind == "linear":
            meta["fan_in_fan_out"] = bool(fan_in_fan_out)
        if "mag" in t:
            meta["magnitude"] = _magnitude(mod, meta, U, V)
        if "B_bias" in t:
            if mod.shape("B_bias") != (U.shape[0],):
                raise mod.fail(
                    f"lora_B bias {parts.keys['B_bias']!r} has shape {mod.shape('B_bias')}, "
                    f"expected ({U.shape[0]},) (its out features)"
                )
            bias = mod.read("B_bias", torch.empty(U.shape[0]))
            meta["lora_bias"] = mod.scale(bias, scale, "B_bias")  # what PEFT adds on merge
        layers.append(LoRALayer(name=name, U=U, V=V, meta=meta))
    return layers


_F32_MAX = float(torch.finfo(torch.float32).max)


def _check_delta_fits(mod: _Module, U: torch.Tensor, V: torch.Tensor) -> None:
    """Refuse a layer whose delta W = U @ V.T overflows float32 although its factors do not
    (e.g. a kohya alpha of 1e38): |delta W|_F^2 = sum((U^T U) * (V^T V)), from the r x r
    Grams in float64, so delta W is never formed."""
    u, v = U.double(), V.double()
    fro = float(((u.T @ u) * (v.T @ v)).sum().clamp(min=0).sqrt())
    if not fro < _F32_MAX:
        raise mod.fail(f"its delta W overflows float32 (|delta W|_F = {fro:.3g})")


def _magnitude(
    mod: _Module, meta: dict[str, Any], U: torch.Tensor, V: torch.Tensor
) -> torch.Tensor:
    """The DoRA magnitude, refused unless it has one entry per output (PEFT's
    ``lora_magnitude_vector``: out features, or the embedding dim) or, for a LyCORIS-style
    ``dora_scale``, per output or input (``wd_on_out`` either way; input channels for conv)."""
    key, shape = mod.parts.keys["mag"], mod.shape("mag")
    if key.endswith("dora_scale"):
        sizes = {U.shape[0], V.shape[0], meta.get("in_channels", V.shape[0])}
    else:
        sizes = {V.shape[0] if meta["kind"] == "embedding" else U.shape[0]}
    if math.prod(shape) not in sizes:
        raise mod.fail(
            f"DoRA magnitude {key!r} has {math.prod(shape)} entries (shape {shape}), expected "
            f"{' or '.join(map(str, sorted(sizes)))}"
        )
    return mod.read("mag", torch.empty(shape))


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


def alpha_scale(rank: int, alpha: float | None) -> float:
    """kohya/diffusers rule: scale = alpha / rank, and alpha 0 or missing means alpha = rank."""
    if not alpha:
        return 1.0
    return alpha / rank
