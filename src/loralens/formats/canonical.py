"""One set of layer names per model: every format's module names mapped to the module paths
diffusers and transformers build (see :mod:`loralens.formats.canonical_tables`).

The same adapter saved as a kohya file (``lora_unet_down_blocks_0_..._to_q``, or SGM
``lora_unet_input_blocks_4_1_...`` for SDXL), a ComfyUI file (``diffusion_model.*``), an old or
new diffusers file (``unet.*``) or a PEFT folder (``down_blocks.*``) reads to the same layer
names (``unet.down_blocks.0....to_q``), so it packs into one store and predicts with one run.
Flux files in Black Forest Labs' naming (kohya, ComfyUI, XLabs) have fused modules (``qkv``,
``linear1``); they are split by output rows into diffusers' modules, exactly (rows of delta W
are rows of U). Each layer keeps the file's own module name in ``meta["file_key"]`` (and the
rows it holds of it in ``meta["file_rows"]``). A name that cannot be mapped with certainty
keeps the file's name and gets ``meta["canonical"] = False``; nothing is guessed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from loralens.formats import canonical_tables as T
from loralens.formats.diffusers import COMPONENTS as DIFFUSERS_COMPONENTS
from loralens.formats.errors import LoRAFormatError
from loralens.formats.keys import natural_key
from loralens.lora import LoRALayer

KOHYA_STEM = re.compile(r"^lora_(?P<part>unet|te[123]?)_(?P<rest>[^.]+)$")
_COMFY_TEXT = re.compile(r"^text_encoders\.(?P<enc>clip_[lg])\.transformer\.(?P<rest>.+)$")
_XLABS = re.compile(
    r"^(?:diffusion_model\.)?(?P<kind>double|single)_blocks\.(?P<n>\d+)\.processor\.(?P<lora>\w+)$"
)
_BFL_BLOCK = re.compile(r"^(?P<kind>double|single)_blocks\.(?P<n>\d+)\.(?P<rest>.+)$")
_SGM_BLOCK = re.compile(
    r"^(?P<where>input_blocks|middle_block|output_blocks)\.(?:(?P<n>\d+)\.)?(?P<sub>\d+)\.(?P<rest>.+)$"
)
#: Formats whose dotted names are module paths of the model the adapter was trained on.
_MODULE_PATH_FORMATS = ("peft", "diffusers")
COMPONENTS = tuple(c.rstrip(".") for c in DIFFUSERS_COMPONENTS)
#: Cross-attention key width of diffusers' UNet -> the base-model family it belongs to.
_UNET_CROSS_WIDTH = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


@dataclass(frozen=True)
class Part:
    """A canonical module, the rows of the file module's delta W it holds (None: all; with
    ``swap_halves`` all, second half first), and the pipeline component it is in (None: the
    names are one model's module paths)."""

    name: str
    rows: tuple[int, int] | None = None
    component: str | None = None
    swap_halves: bool = False


def _in(component: str, path: str, rows: tuple[int, int] | None = None) -> Part:
    return Part(f"{component}.{path}", rows, component)


def split_stem(stem: str) -> str:
    """A kohya stem (module path with "." written "_") as a dotted path, reading the parts named
    in :data:`WORDS` as one (longest first): ``down_blocks_0_attn1_to_out_0`` ->
    ``down_blocks.0.attn1.to_out.0``. Only a grammar match makes the result trustworthy."""
    pieces, out, i = stem.split("_"), [], 0
    while i < len(pieces):
        for j in range(min(len(pieces), i + T.MAX_WORD_PIECES), i, -1):
            word = "_".join(pieces[i:j])
            if j == i + 1 or word in T.WORDS:
                out.append(word)
                i = j
                break
    return ".".join(out)


def _from_sgm(path: str) -> str | None:
    """A UNet path in the original (SGM/LDM) naming kohya uses for SDXL, in diffusers' naming."""
    if path in T.SGM_TOP:
        return T.SGM_TOP[path]
    m = _SGM_BLOCK.match(path)
    if m is None:
        return None
    where, sub, rest = m["where"], int(m["sub"]), m["rest"]
    per = T.SGM_LAYERS_PER_BLOCK
    inner = "attentions" if sub == 1 and rest not in ("conv", "op") else "resnets"
    if inner == "resnets":
        rest = T.SGM_RESNET.get(rest, rest)
    if where == "middle_block":
        if m["n"] is not None or sub > 2:
            return None
        return f"mid_block.{inner}.{sub // 2 if inner == 'resnets' else 0}.{rest}"
    if m["n"] is None:
        return None
    n = int(m["n"])
    if where == "input_blocks":
        block, i = divmod(n - 1, per + 1)
        if n == 0:
            return None
        if i == per:  # the block's downsampler: input_blocks.<n>.0.op
            return f"down_blocks.{block}.downsamplers.0.conv" if (sub, rest) == (0, "op") else None
        return f"down_blocks.{block}.{inner}.{i}.{rest}"
    block, i = divmod(n, per + 1)
    if rest == "conv":  # the block's upsampler, after its resnet (and attention)
        return f"up_blocks.{block}.upsamplers.0.conv" if i == per and sub >= 1 else None
    return f"up_blocks.{block}.{inner}.{i}.{rest}"


def _split(prefix: str, spec: tuple[tuple[str, str], ...], out: int, inp: int) -> list[Part] | None:
    """Parts of a fused module: each ``h`` rows (the input width) or the ``rest``."""
    fixed = sum(inp for _, size in spec if size == "h")
    rest = out - fixed
    if rest < 0 or (rest > 0) != any(size == "rest" for _, size in spec):
        return None
    if len(spec) == 1:
        return [_in("transformer", prefix + spec[0][0])]
    parts, start = [], 0
    for name, size in spec:
        n = inp if size == "h" else rest
        parts.append(_in("transformer", prefix + name, (start, start + n)))
        start += n
    return parts


def _from_bfl(path: str, out: int, inp: int) -> list[Part] | None:
    """A Flux module in Black Forest Labs' naming as diffusers' module(s)."""
    if path in T.FLUX_TOP:
        return [_in("transformer", T.FLUX_TOP[path])]
    if path in T.FLUX_SWAPPED:
        if out % 2:
            return None
        return [Part(f"transformer.{T.FLUX_SWAPPED[path]}", None, "transformer", True)]
    m = _BFL_BLOCK.match(path)
    if m is None:
        return None
    double = m["kind"] == "double"
    spec = (T.FLUX_DOUBLE if double else T.FLUX_SINGLE).get(m["rest"])
    if spec is None:
        return None
    block = "transformer_blocks" if double else "single_transformer_blocks"
    return _split(f"{block}.{m['n']}.", spec, out, inp)


def _model_parts(path: str, out: int, inp: int) -> list[Part] | None:
    """A diffusion model's module (UNet or Flux) named in any naming, as canonical parts."""
    if T.UNET.fullmatch(path):
        return [_in("unet", path)]
    sgm = _from_sgm(path)
    if sgm is not None and T.UNET.fullmatch(sgm):
        return [_in("unet", sgm)]
    if T.FLUX.fullmatch(path):
        return [_in("transformer", path)]
    return _from_bfl(path, out, inp)


def _text_part(component: str, path: str) -> list[Part] | None:
    return [_in(component, path)] if T.TEXT_ENCODER.fullmatch(path) else None


def _xlabs_parts(m: re.Match, out: int, inp: int) -> list[Part] | None:
    if m["kind"] == "double":
        bfl = T.XLABS_DOUBLE.get(m["lora"])
        return None if bfl is None else _from_bfl(f"double_blocks.{m['n']}.{bfl}", out, inp)
    spec = T.XLABS_SINGLE.get(m["lora"])
    prefix = f"single_transformer_blocks.{m['n']}."
    return None if spec is None else _split(prefix, spec, out, inp)


def canonical_parts(
    name: str, fmt: str, out: int, inp: int, *, bare_component: str | None = None
) -> list[Part] | None:
    """The canonical module(s) of a file's module ``name`` (a layer of ``fmt`` whose delta W is
    ``out`` x ``inp``), or None where it cannot be mapped with certainty.

    ``bare_component`` is the pipeline component of a file whose module paths carry none (a
    PEFT folder of a UNet): decided for the whole file by :func:`bare_component`.
    """
    m = KOHYA_STEM.match(name)
    if m is not None:
        path = split_stem(m["rest"])
        if m["part"] == "unet":
            return _model_parts(path, out, inp)
        return _text_part(T.KOHYA_TEXT_ENCODERS[m["part"]], path)
    m = _XLABS.match(name)
    if m is not None:
        return _xlabs_parts(m, out, inp)
    if name.startswith("diffusion_model."):
        return _model_parts(name[len("diffusion_model.") :], out, inp)
    m = _COMFY_TEXT.match(name)
    if m is not None:
        return _text_part(T.COMFYUI_TEXT_ENCODERS[m["enc"]], m["rest"])
    if fmt not in _MODULE_PATH_FORMATS:
        return None
    head = name.partition(".")[0]
    if fmt == "diffusers" and head in COMPONENTS and "." in name:
        return [Part(name, component=head)]  # a diffusers pipeline path: certain by construction
    return [_in(bare_component, name) if bare_component else Part(name)]


def bare_component(names: Sequence[str]) -> str | None:
    """The pipeline component of module paths that name none: "unet" when every one is a
    diffusers UNet path, "transformer" when every one is a Flux transformer path, else None.
    At least one must be inside a block (``..._blocks.N.``): top-level names such as
    ``conv_in`` or ``proj_out`` alone could be any model's."""
    if not any(re.search(r"(?:^|_)blocks?\.\d+\.", n) for n in names):
        return None
    for component in ("unet", "transformer"):
        if all(T.COMPONENT_GRAMMARS[component].fullmatch(n) for n in names):
            return component
    return None


def model_family(names: Sequence[str], shapes: Sequence[Sequence[int]] | None = None) -> str | None:
    """The base-model family canonical layer names (and delta-W shapes, out x in) point to:
    "sd1", "sd2", "sdxl" (a UNet whose cross-attention width says which), "sd-unet" (a UNet of
    unknown width), "flux", or None when the names do not say."""
    if any(n.startswith("transformer.") and T.FLUX.fullmatch(n[12:]) for n in names):
        return "flux"
    unet = [i for i, n in enumerate(names) if n.startswith("unet.") and T.UNET.fullmatch(n[5:])]
    if not unet:
        return None
    widths = {
        int(shapes[i][1])
        for i in unet
        if shapes is not None and re.search(r"attn2\.to_[kv]$", names[i])
    }
    families = {_UNET_CROSS_WIDTH.get(w) for w in widths}
    return families.pop() if len(families) == 1 and None not in families else "sd-unet"


@dataclass(frozen=True)
class Placed:
    """A layer as ``load_lora`` gives it: its name, the file layer it comes from (an index into
    the file's layers) and the rows of it that it is (``part``; None: the whole layer under the
    file's name, which could not be mapped)."""

    name: str
    source: int
    part: Part | None

    def shape(self, shapes: Sequence[tuple[int, int]]) -> tuple[int, int]:
        """Its delta W's shape (out, in), from the file layers' ``shapes``."""
        out, inp = shapes[self.source]
        rows = self.part.rows if self.part is not None else None
        return (rows[1] - rows[0], inp) if rows is not None else (out, inp)


def place(
    names: Sequence[str],
    shapes: Sequence[tuple[int, int]],
    conventions: Sequence[str | None],
    fmt: str,
    source: Any,
) -> tuple[list[Placed], dict[str, Any]]:
    """Where each canonical layer of a file comes from, in natural order of the canonical names,
    for file layers ``names`` of delta-W ``shapes`` and DoRA magnitude ``conventions`` (rows can
    be split off unless a magnitude is per input column: it normalizes whole columns of the
    fused weight); and the metadata that adds: ``model_family`` (see :func:`model_family`) and,
    where some could not be mapped, ``uncanonical_layers``. ``source`` names the file in errors.
    """
    bare = bare_component(names) if fmt in _MODULE_PATH_FORMATS else None
    placed: list[Placed] = []
    unmapped: list[str] = []
    for i, (name, shape, convention) in enumerate(zip(names, shapes, conventions)):
        parts = canonical_parts(name, fmt, *shape, bare_component=bare)
        whole = len(parts or ()) == 1 and parts[0].rows is None and not parts[0].swap_halves
        if parts is not None and (whole or convention in (None, "per_output")):
            placed.extend(Placed(p.name, i, p) for p in parts)
        else:
            unmapped.append(name)
            placed.append(Placed(name, i, None))
    _refuse_collisions(placed, names, source)
    placed.sort(key=lambda p: natural_key(p.name))
    metadata: dict[str, Any] = {
        "model_family": model_family([p.name for p in placed], [p.shape(shapes) for p in placed])
    }
    if unmapped:
        metadata["uncanonical_layers"] = unmapped
    return placed, metadata


def cut(layer: LoRALayer, placed: Placed) -> LoRALayer:
    """The layer ``placed`` names, from the file ``layer`` it comes from: the rows of U it holds
    (a view; V is shared), with the file's name in ``meta["file_key"]``."""
    part = placed.part
    if part is None:
        out = layer.with_factors(layer.U, layer.V)
        out.meta.update(file_key=layer.name, canonical=False)
        return out
    meta: dict[str, Any] = {**layer.meta, "file_key": layer.name, "canonical": True}
    if part.component is not None:
        meta["component"] = part.component
    if part.rows is None and not part.swap_halves:
        return LoRALayer(part.name, layer.U, layer.V, meta)
    out = layer.out_features
    if part.swap_halves:
        index = torch.cat([torch.arange(out // 2, out), torch.arange(0, out // 2)])
        U = torch.cat([layer.U[out // 2 :], layer.U[: out // 2]])
        meta["file_rows"] = "halves swapped"
    else:
        index = torch.arange(*part.rows)
        U = layer.U[part.rows[0] : part.rows[1]]
        meta["file_rows"] = list(part.rows)
    for key in ("magnitude", "lora_bias"):
        if key in meta:
            meta[key] = torch.as_tensor(meta[key]).reshape(-1)[index].clone()
    return LoRALayer(part.name, U, layer.V, meta)


def _refuse_collisions(placed: Sequence[Placed], names: Sequence[str], source: Any) -> None:
    seen: dict[str, str] = {}
    for p in placed:
        if p.name in seen:
            raise LoRAFormatError(
                source,
                f"modules {seen[p.name]!r} and {names[p.source]!r} both adapt "
                f"{p.name!r}; a file holds one LoRA per module",
            )
        seen[p.name] = names[p.source]
