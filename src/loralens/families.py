"""Which well-known base model an adapter fits, from its layers' module names and shapes alone.

:data:`FAMILIES` is a table of published base models (SD1.x, SD2.x, SDXL, SD3, Flux, Llama /
Mistral / Qwen2 / Gemma / Phi sizes, GPT-2 sizes). Each entry knows the module names its
adapters use (diffusers/transformers paths, kohya's underscored copies, the original
checkpoints' names) and the exact (out, in) shape of each. A family *fits* an adapter when at
least one of the adapter's layers is one of its modules and every such layer has that module's
shape (and a block index the model has). Several families can fit (Llama-3-8B and Mistral-7B
share every shape): all are reported, and none is picked; nothing fits: "unknown".

Names are compared with ``.`` read as ``_``, so ``unet.down_blocks.1.attentions.0...`` and
``lora_unet_down_blocks_1_attentions_0...`` are the same module.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

#: shape check of one module: (out, in) of the layer, the name's match -> fits
Check = Callable[[tuple[int, int], re.Match], bool]


@dataclass(frozen=True)
class Family:
    """One published base model: its name, its kind of architecture and its modules' shapes."""

    name: str
    #: "decoder", "gpt2", "unet", "mmdit" (SD3) or "flux"
    kind: str
    #: the width reported as hidden size (for a UNet: the text encoder's, read by cross-attention)
    hidden: int
    rules: tuple[tuple[re.Pattern, Check], ...]

    def names(self, name: str) -> bool:
        """Whether ``name`` (normalized) is one of this family's module names, whatever its shape."""
        return any(pattern.search(name) for pattern, _ in self.rules)

    def fits(self, layers: Sequence[tuple[str, tuple[int, int]]]) -> int:
        """How many of ``layers`` ((normalized name, shape)) are this family's modules, or -1
        when one of them has a shape (or block index) this family does not."""
        n = 0
        for name, shape in layers:
            for pattern, check in self.rules:
                m = pattern.search(name)
                if m:
                    if not check(shape, m):
                        return -1
                    n += 1
                    break
        return n


def _rule(pattern: str, out: int, inn: int, blocks: int | None = None):
    """A module of fixed shape; with ``blocks``, the pattern's first group is a block index."""

    def check(shape: tuple[int, int], m: re.Match) -> bool:
        return shape == (out, inn) and (blocks is None or int(m.group(1)) < blocks)

    return re.compile(pattern), check


# ------------------------------------------------------------------------ language models

_L = r"(?:^|_)layers_(\d+)_"


def _llama(name: str, hidden: int, q: int, kv: int, inter: int, blocks: int) -> Family:
    """Llama-style decoders (Llama, Mistral, Qwen2, Gemma): q/k/v/o and gated-MLP projections."""
    shapes = {
        r"self_attn_q_proj": (q, hidden),
        r"self_attn_[kv]_proj": (kv, hidden),
        r"self_attn_o_proj": (hidden, q),
        r"mlp_(?:gate|up)_proj": (inter, hidden),
        r"mlp_down_proj": (hidden, inter),
    }
    rules = tuple(_rule(_L + p + "$", o, i, blocks) for p, (o, i) in shapes.items())
    return Family(name, "decoder", hidden, rules)


def _phi3(name: str, hidden: int, qkv: int, inter: int, blocks: int) -> Family:
    shapes = {
        r"self_attn_qkv_proj": (qkv, hidden),
        r"self_attn_o_proj": (hidden, hidden),
        r"mlp_gate_up_proj": (2 * inter, hidden),
        r"mlp_down_proj": (hidden, inter),
    }
    rules = tuple(_rule(_L + p + "$", o, i, blocks) for p, (o, i) in shapes.items())
    return Family(name, "decoder", hidden, rules)


def _phi2(name: str, hidden: int, inter: int, blocks: int) -> Family:
    shapes = {
        r"self_attn_(?:[qkv]_proj|dense)": (hidden, hidden),
        r"mlp_fc1": (inter, hidden),
        r"mlp_fc2": (hidden, inter),
    }
    rules = tuple(_rule(_L + p + "$", o, i, blocks) for p, (o, i) in shapes.items())
    return Family(name, "decoder", hidden, rules)


def _gpt2(name: str, hidden: int, blocks: int) -> Family:
    """GPT-2 (Conv1D modules, read in out x in orientation)."""
    h = r"(?:^|_)h_(\d+)_"
    shapes = {
        r"attn_c_attn": (3 * hidden, hidden),
        r"attn_c_proj": (hidden, hidden),
        r"mlp_c_fc": (4 * hidden, hidden),
        r"mlp_c_proj": (hidden, 4 * hidden),
    }
    rules = tuple(_rule(h + p + "$", o, i, blocks) for p, (o, i) in shapes.items())
    return Family(name, "gpt2", hidden, rules)


# ------------------------------------------------------------------------ diffusion models

_UNET = r"(?:down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block)_.*"
_TB = _UNET + r"transformer_blocks_\d+_"


def _clip(prefix: str, width: int, blocks: int):
    """A CLIP text encoder's layers under ``prefix`` (kohya ``lora_te*`` / diffusers names)."""
    layers = f"^(?:{prefix})_text_model_encoder_layers_(\\d+)_"
    return (
        _rule(layers + r"self_attn_(?:[qkv]|out)_proj$", width, width, blocks),
        _rule(layers + r"mlp_fc1$", 4 * width, width, blocks),
        _rule(layers + r"mlp_fc2$", width, 4 * width, blocks),
    )


def _unet(name: str, channels: set[int], cross: int, encoders: tuple) -> Family:
    """SD UNets: transformer blocks at ``channels`` widths whose cross-attention reads ``cross``
    (the text encoder's width); ``encoders`` are the text encoders' rules."""

    def square(shape, m):
        return shape[0] in channels and shape == (shape[0], shape[0])

    def to_cross(shape, m):
        return shape[0] in channels and shape[1] == cross

    def ff_in(shape, m):
        return shape[1] in channels and shape[0] == 8 * shape[1]  # GEGLU: 2 x 4c

    def ff_out(shape, m):
        return shape[0] in channels and shape[1] == 4 * shape[0]

    rules = (
        (re.compile(_TB + r"attn1_to_[qkv]$|" + _TB + r"attn[12]_to_(?:q|out_0)$"), square),
        (re.compile(_TB + r"attn2_to_[kv]$"), to_cross),
        (re.compile(_TB + r"ff_net_0_proj$"), ff_in),
        (re.compile(_TB + r"ff_net_2$"), ff_out),
        (re.compile(_UNET + r"proj_(?:in|out)$"), square),
    )
    return Family(name, "unet", cross, rules + encoders)


#: A diffusers DiT block (Flux double blocks, SD3 joint blocks), not a UNet's transformer block.
_DIFFUSERS_BLOCK = r"(?:^|_)(?<!single_)(?<!_\d_)transformer_blocks_(\d+)_"


def _dit_block(h: int, blocks: int, attn: str) -> tuple:
    """The attention and feed-forward modules of a diffusers DiT block of width ``h`` (Flux's
    double blocks, SD3's joint blocks); ``attn`` matches the attention modules' names."""
    return (
        _rule(
            _DIFFUSERS_BLOCK + attn + r"_(?:to_[qkv]|add_[qkv]_proj|to_out_0|to_add_out)$",
            h,
            h,
            blocks,
        ),
        _rule(_DIFFUSERS_BLOCK + r"ff(?:_context)?_net_0_proj$", 4 * h, h, blocks),
        _rule(_DIFFUSERS_BLOCK + r"ff(?:_context)?_net_2$", h, 4 * h, blocks),
    )


def _flux(name: str) -> Family:
    h, double, single = 3072, 19, 38
    sgl = r"single_transformer_blocks_(\d+)_"
    bfl, bfl1 = r"double_blocks_(\d+)_", r"single_blocks_(\d+)_"  # BFL / kohya / ComfyUI
    rules = (
        *_dit_block(h, double, "attn"),
        _rule(_DIFFUSERS_BLOCK + r"norm1(?:_context)?_linear$", 6 * h, h, double),
        _rule(sgl + r"attn_to_[qkv]$", h, h, single),
        _rule(sgl + r"proj_mlp$", 4 * h, h, single),
        _rule(sgl + r"proj_out$", h, 5 * h, single),
        _rule(sgl + r"norm_linear$", 3 * h, h, single),
        _rule(bfl + r"(?:img|txt)_attn_qkv$", 3 * h, h, double),
        _rule(bfl + r"(?:img|txt)_attn_proj$", h, h, double),
        _rule(bfl + r"(?:img|txt)_mlp_0$", 4 * h, h, double),
        _rule(bfl + r"(?:img|txt)_mlp_2$", h, 4 * h, double),
        _rule(bfl + r"(?:img|txt)_mod_lin$", 6 * h, h, double),
        _rule(bfl + r"processor_qkv_lora\d?$", 3 * h, h, double),  # XLabs
        _rule(bfl + r"processor_proj_lora\d?$", h, h, double),
        _rule(bfl1 + r"linear1$", 3 * h + 4 * h, h, single),
        _rule(bfl1 + r"linear2$", h, h + 4 * h, single),
        _rule(bfl1 + r"modulation_lin$", 3 * h, h, single),
    )
    return Family(name, "flux", h, rules)


def _sd3(name: str, h: int, blocks: int) -> Family:
    jb = r"joint_blocks_(\d+)_(?:x|context)_block_"  # SAI / kohya / ComfyUI
    rules = (
        *_dit_block(h, blocks, "attn2?"),
        _rule(jb + r"attn2?_qkv$", 3 * h, h, blocks),
        _rule(jb + r"attn2?_proj$", h, h, blocks),
        _rule(jb + r"mlp_fc1$", 4 * h, h, blocks),
        _rule(jb + r"mlp_fc2$", h, 4 * h, blocks),
    )
    return Family(name, "mmdit", h, rules)


_SD1_TE = _clip("lora_te|text_encoder", 768, 12)  # CLIP ViT-L/14
FAMILIES: tuple[Family, ...] = (
    _unet("Stable Diffusion 1.x", {320, 640, 1280}, 768, _SD1_TE),
    _unet("Stable Diffusion 2.x", {320, 640, 1280}, 1024, _clip("lora_te|text_encoder", 1024, 23)),
    _unet(
        "Stable Diffusion XL",
        {640, 1280},
        2048,
        _clip("lora_te1|text_encoder", 768, 12) + _clip("lora_te2|text_encoder_2", 1280, 32),
    ),
    _sd3("SD3 Medium / SD3.5 Medium", 1536, 24),
    _sd3("SD3.5 Large", 2432, 38),
    _flux("Flux.1 (dev / schnell)"),
    _llama("Llama-2-7B", 4096, 4096, 4096, 11008, 32),
    _llama("Llama-2-13B", 5120, 5120, 5120, 13824, 40),
    _llama("Llama-2-70B / Llama-3-70B", 8192, 8192, 1024, 28672, 80),
    _llama("Llama-3-8B / Llama-3.1-8B", 4096, 4096, 1024, 14336, 32),
    _llama("Mistral-7B", 4096, 4096, 1024, 14336, 32),
    _llama("Llama-3.2-1B", 2048, 2048, 512, 8192, 16),
    _llama("Llama-3.2-3B", 3072, 3072, 1024, 8192, 28),
    _llama("TinyLlama-1.1B", 2048, 2048, 256, 5632, 22),
    _llama("Qwen2-0.5B / Qwen2.5-0.5B", 896, 896, 128, 4864, 24),
    _llama("Qwen2-1.5B / Qwen2.5-1.5B", 1536, 1536, 256, 8960, 28),
    _llama("Qwen2.5-3B", 2048, 2048, 256, 11008, 36),
    _llama("Qwen2-7B / Qwen2.5-7B", 3584, 3584, 512, 18944, 28),
    _llama("Qwen2.5-14B", 5120, 5120, 1024, 13824, 48),
    _llama("Qwen2.5-32B", 5120, 5120, 1024, 27648, 64),
    _llama("Qwen2-72B / Qwen2.5-72B", 8192, 8192, 1024, 29568, 80),
    _llama("Gemma-2B", 2048, 2048, 256, 16384, 18),
    _llama("Gemma-7B", 3072, 4096, 4096, 24576, 28),
    _llama("Gemma-2-2B", 2304, 2048, 1024, 9216, 26),
    _llama("Gemma-2-9B", 3584, 4096, 2048, 14336, 42),
    _llama("Gemma-2-27B", 4608, 4096, 2048, 36864, 46),
    _phi3("Phi-3-mini / Phi-3.5-mini", 3072, 9216, 8192, 32),
    _phi3("Phi-3-medium", 5120, 7680, 17920, 40),
    _phi2("Phi-2", 2560, 10240, 32),
    _phi2("Phi-1.5", 2048, 8192, 24),
    _gpt2("GPT-2 (124M)", 768, 12),
    _gpt2("GPT-2 medium", 1024, 24),
    _gpt2("GPT-2 large", 1280, 36),
    _gpt2("GPT-2 XL", 1600, 48),
)


def normalize_name(name: str) -> str:
    """A module name with ``.`` read as ``_`` (kohya's spelling of the same path)."""
    return name.replace(".", "_")


def matching_families(
    names: Sequence[str], shapes: Sequence[Sequence[int]]
) -> list[tuple[Family, int]]:
    """Every family of :data:`FAMILIES` that fits these layers (names and (out, in) shapes),
    with how many layers are its modules; most layers first, then table order."""
    layers = [(normalize_name(n), (int(s[0]), int(s[1]))) for n, s in zip(names, shapes)]
    fits = [(f, n) for f in FAMILIES if (n := f.fits(layers)) > 0]
    return sorted(fits, key=lambda fn: -fn[1])


_BLOCK = re.compile(r"(?:^|_)(?:layers|h|blocks|layer)_(\d+)_")


def guess_base_model(report: dict[str, Any]) -> dict[str, Any]:
    """The base model of an ``inspect`` report: the file's own word when it has one
    (``source`` "metadata"), else the families that fit its layers (``source`` "layout"; ``name``
    lists them all when several fit), else ``name`` None. ``candidates`` always holds the
    fitting families' names, ``matched_layers`` how many layers are a candidate's modules;
    ``family`` (the candidates' kind, or where none fits the kind whose module names the layers
    use), ``hidden_size`` (the candidates') and ``blocks`` (one past the highest block index
    seen, for language models) describe the layout where they are known."""
    names = [r["name"] for r in report["layers"]]
    shapes = [r["shape"] for r in report["layers"]]
    fits = matching_families(names, shapes)
    candidates = [f.name for f, _ in fits]
    kinds = {f.kind for f, _ in fits} or {  # none fits: the architecture its names say
        f.kind for f in FAMILIES if any(f.names(normalize_name(n)) for n in names)
    }
    kind = kinds.pop() if len(kinds) == 1 else None
    hidden = {f.hidden for f, _ in fits}
    blocks = {int(m.group(1)) for n in names if (m := _BLOCK.search(normalize_name(n)))}
    said = report.get("base_model")
    guess = {
        "name": said or (" or ".join(candidates) if candidates else None),
        "source": "metadata" if said else "layout" if candidates else None,
        "candidates": candidates,
        "matched_layers": fits[0][1] if fits else 0,
        "family": kind,
        "hidden_size": hidden.pop() if len(hidden) == 1 else None,
        "blocks": max(blocks) + 1 if blocks and kind in ("decoder", "gpt2") else None,
        "local_path": bool(said) and is_local_path(said),
    }
    guess["label"] = base_model_label(guess)
    return guess


#: How a kind of architecture reads in a label.
KIND_WORDS = {
    "decoder": "Llama-like decoder",
    "gpt2": "GPT-2-like model",
    "unet": "Stable Diffusion UNet",
    "mmdit": "SD3-like MMDiT",
    "flux": "Flux-like transformer",
}


def is_local_path(name: str) -> bool:
    """Whether a file's base-model word is a path on the machine that wrote it (absolute, or
    from the home or current folder) rather than a model's name or hub id."""
    return name.startswith(("/", "~", "./", "../", "\\")) or bool(re.match(r"[A-Za-z]:[\\/]", name))


def base_model_label(guess: dict[str, Any]) -> str:
    """The one line every report shows for a guess (``inspect``, its summary, the page): the
    file's word (a local folder by its last part, a copy in the hub's cache by its hub id), and
    the families the layout fits, or the architecture its module names say where none fits."""
    if guess["candidates"]:
        layout = " or ".join(guess["candidates"])
    elif guess["family"]:
        blocks = guess.get("blocks")
        shape = [f"{blocks} block{'s' * (blocks != 1)}"] if blocks else []
        shape += [f"hidden size {guess['hidden_size']}"] if guess.get("hidden_size") else []
        word = KIND_WORDS.get(guess["family"], guess["family"])
        layout = f"unknown {word}" + (f" ({', '.join(shape)})" if shape else "")
    else:
        layout = ""
    if guess["source"] != "metadata":
        return f"{layout} (from its layout)" if guess["candidates"] else layout or "unknown"
    said = guess["name"]
    hub = re.search(r"models--([^\\/]+)[\\/]snapshots[\\/]", said)
    if guess.get("local_path") and hub:  # the hub's cache names a model's folder models--org--name
        said = f"{hub.group(1).replace('--', '/')} (a local copy from the hub)"
    elif guess.get("local_path"):
        tail = re.split(r"[\\/]", said.rstrip("/\\"))[-1] or said
        said = f"{tail} (a local folder)"
    else:
        said = f"{said} (from the file)"
    return f"{said}; layout: {layout}" if layout else said


__all__ = [
    "FAMILIES",
    "KIND_WORDS",
    "Family",
    "base_model_label",
    "guess_base_model",
    "is_local_path",
    "matching_families",
    "normalize_name",
]
