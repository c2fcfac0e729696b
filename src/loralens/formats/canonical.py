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
from loralens.lora import LoRA, LoRALayer

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


def _piece(layer: LoRALayer, part: Part) -> LoRALayer:
    """The rows of ``layer`` that ``part`` holds, as a layer named ``part.name``."""
    meta: dict[str, Any] = {**layer.meta, "file_key": layer.name, "canonical": True}
    if part.component is not None:
        meta["component"] = part.component
    if part.rows is None and not part.swap_halves:
        return LoRALayer(part.name, layer.U, layer.V, meta)
    out = layer.out_features
    if part.swap_halves:
        index = torch.cat([torch.arange(out // 2, out), torch.arange(0, out // 2)])
        meta["file_rows"] = "halves swapped"
    else:
        index = torch.arange(*part.rows)
        meta["file_rows"] = list(part.rows)
    for key in ("magnitude", "lora_bias"):
        if key in meta:
            meta[key] = torch.as_tensor(meta[key]).reshape(-1)[index].clone()
    return LoRALayer(part.name, layer.U[index].clone(), layer.V, meta)


def _splittable(layer: LoRALayer) -> bool:
    """Rows can be split off unless a DoRA magnitude is per input column (it normalizes
    whole columns of the fused weight)."""
    return "magnitude" not in layer.meta or layer.meta.get("magnitude_convention") == "per_output"


def canonicalize(lora: LoRA) -> LoRA:
    """``lora`` with canonical layer names (in natural order), each layer's file name in
    ``meta["file_key"]`` and ``meta["canonical"]`` saying whether it was mapped;
    ``metadata["model_family"]`` (see :func:`model_family`) and, where some could not be
    mapped, ``metadata["uncanonical_layers"]``.
    """
    fmt = str(lora.metadata.get("format", ""))
    bare = bare_component(lora.names) if fmt in _MODULE_PATH_FORMATS else None
    layers: list[LoRALayer] = []
    unmapped: list[str] = []
    for layer in lora.layers:
        parts = canonical_parts(layer.name, fmt, *layer.shape, bare_component=bare)
        whole = len(parts or ()) == 1 and parts[0].rows is None and not parts[0].swap_halves
        if parts is not None and (whole or _splittable(layer)):
            layers.extend(_piece(layer, p) for p in parts)
        else:
            unmapped.append(layer.name)
            layers.append(layer.with_factors(layer.U, layer.V))
            layers[-1].meta.update(file_key=layer.name, canonical=False)
    _refuse_collisions(layers, lora)
    layers.sort(key=lambda la: natural_key(la.name))
    metadata = dict(lora.metadata)
    metadata["model_family"] = model_family([la.name for la in layers], [la.shape for la in layers])
    if unmapped:
        metadata["uncanonical_layers"] = unmapped
    return LoRA(layers=layers, metadata=metadata)


def _refuse_collisions(layers: list[LoRALayer], lora: LoRA) -> None:
    seen: dict[str, str] = {}
    for la in layers:
        if la.name in seen:
            raise LoRAFormatError(
                lora.metadata.get("source", "<LoRA>"),
                f"modules {seen[la.name]!r} and {la.meta['file_key']!r} both adapt "
                f"{la.name!r}; a file holds one LoRA per module",
            )
        seen[la.name] = la.meta["file_key"]
