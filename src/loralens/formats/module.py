"""One module's tensors in an open weights file, with the checks every reader applies to them:
floating dtypes, finite values (before and after scaling), a finite scale, a delta W that fits
float32, and a DoRA magnitude of the right size. Plain LoRA and LyCORIS layers both end here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from loralens.formats.errors import LoRAFormatError
from loralens.formats.keys import ModuleParts
from loralens.formats.tensor_file import TensorFile, as_rows
from loralens.lora import LoRALayer, all_finite, overflowing_norm

#: ``scale_for(name, rank, parts, alpha)`` -> (scale, the rank the config expects or None);
#: ``alpha`` is the value of the module's alpha key, if it has one; ``rank`` is None for a
#: module with no low-rank factor to take it from (a LoKr with both halves stored full).
ScaleFn = Callable[[str, "int | None", ModuleParts, "float | None"], "tuple[float, int | None]"]


class ModuleReader:
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
        if not self.allow and not all_finite(t):
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

    def read64(self, role: str) -> torch.Tensor:
        """The (floating) tensor in ``role`` as float64, checked finite."""
        self.floating(role)
        t = self.file.read(self.parts.keys[role], torch.float64)
        self.check_finite(t, repr(self.parts.keys[role]))
        return t

    def scale(self, t: torch.Tensor, scale: float, role: str) -> torch.Tensor:
        """``t *= scale``, refused if that overflows."""
        t.mul_(scale)
        if abs(scale) > 1:
            self.check_finite(t, f"{self.parts.keys[role]!r} times the scale {scale:g}")
        return t

    def magnitude_convention(self, out: int, inp: int) -> str | None:
        """The convention of the module's DoRA magnitude (:func:`magnitude_convention`) for a
        layer ``out`` x ``inp`` (input channels for conv), from its shape; None without one."""
        if "mag" not in self.parts.keys:
            return None
        return magnitude_convention(self.parts.keys["mag"], self.shape("mag"), out, inp)

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

    def scale_for(self, scale_for: ScaleFn, rank: int | None, rank_role: str | None) -> float:
        """The module's scale from the format's rule, refused unless finite and unless the rank
        (of the factor in ``rank_role``; None: no factor has one) is the one the config expects."""
        scale, expected_rank = scale_for(self.name, rank, self.parts, self.alpha())
        if not math.isfinite(scale):
            raise self.fail(f"its scale is {scale}")
        if rank is not None and expected_rank is not None and expected_rank != rank:
            raise LoRAFormatError(
                self.file.path,
                f"module {self.name!r} has rank {rank} (from {self.parts.keys[rank_role]!r}, "
                f"shape {self.shape(rank_role)}) but the config says r={expected_rank}",
            )
        return float(scale)


def finish_layer(
    mod: ModuleReader, U: torch.Tensor, V: torch.Tensor, meta: dict[str, Any]
) -> LoRALayer:
    """The layer of scaled float32 factors ``U``, ``V``: refused if its factors or delta W are
    too large for float32 arithmetic (unless non-finite values are allowed), with the DoRA
    magnitude checked and kept."""
    if not mod.allow:
        _check_delta_fits(mod, U, V)
    if "mag" in mod.parts.keys:
        meta["magnitude"] = _magnitude(mod, meta, U, V)
        meta["magnitude_convention"] = mod.magnitude_convention(
            U.shape[0], int(meta.get("in_channels", V.shape[0]))
        )
    return LoRALayer(name=mod.name, U=U, V=V, meta=meta)


def magnitude_convention(key: str, shape: tuple[int, ...], out: int, inp: int) -> str:
    """Which DoRA magnitude ``key`` of ``shape`` holds, for a layer ``out`` x ``inp`` (input
    channels for conv): "per_output" (one norm per output row: PEFT's ``lora_magnitude_vector``
    and LyCORIS' ``dora_scale`` out x 1, ``wd_on_out``), "per_input" (one per input column:
    kohya's and ComfyUI's ``dora_scale`` 1 x in), or "unknown" (a flat ``dora_scale`` of a
    square layer, which could be either)."""
    if not key.endswith("dora_scale"):
        return "per_output"
    if len(shape) >= 2:
        if shape[0] == out and all(s == 1 for s in shape[1:]):
            return "per_output"
        if shape[0] == 1 and shape[1] == inp and all(s == 1 for s in shape[2:]):
            return "per_input"
        return "unknown"
    n = math.prod(shape)
    if out == inp:
        return "unknown"
    return "per_output" if n == out else "per_input"


def _check_delta_fits(mod: ModuleReader, U: torch.Tensor, V: torch.Tensor) -> None:
    """Refuse a layer whose finite factors make Grams or a delta W that overflow float32:
    every command would meet inf there."""
    over = overflowing_norm(U, V)
    if over is not None:
        what, symbol, fro = over
        raise mod.fail(
            f"its {what} is too large: |{symbol}|_F = {fro:.3g}, whose square (every "
            "command computes it) overflows float32"
        )


def _magnitude(
    mod: ModuleReader, meta: dict[str, Any], U: torch.Tensor, V: torch.Tensor
) -> torch.Tensor:
    """The DoRA magnitude, refused unless it has one entry per output (PEFT's
    ``lora_magnitude_vector``: out features, or the embedding dim) or, for a LyCORIS-style
    ``dora_scale``, per output or input (``wd_on_out`` either way; input channels for conv)."""
    key, shape = mod.parts.keys["mag"], mod.shape("mag")
    mod.floating("mag")
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
