"""What every LoRA writer shares: each layer's factors as the file stores them (the scale taken
back out of U, so alpha / r and rank patterns are written as they were read), the PEFT-style
config of a set of layers, DoRA magnitudes in the convention a format reads, and the pipeline
component of canonical names.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any

import torch

from loralens.errors import InputError
from loralens.lora import LoRALayer


def layer_kind(layer: LoRALayer) -> str:
    return str(layer.meta.get("kind", "linear"))


def unfolded_scale(layer: LoRALayer) -> float:
    """The scale a writer takes back out of U (the reader's alpha / r), or 1 where it cannot be
    an alpha (none recorded, not a positive finite number, or U / scale overflows)."""
    scale = layer.meta.get("scale")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        return 1.0
    top = float(layer.U.detach().abs().max()) if layer.U.numel() else 0.0
    return float(scale) if top / scale < 3e38 else 1.0


def file_factors(layer: LoRALayer) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(up out x r, down r x in, alpha) as a file stores the layer: U with the reader's scale
    taken back out and alpha = scale * r, so alpha / r gives it again (:func:`unfolded_scale`)."""
    scale = unfolded_scale(layer)
    U, V = layer.U.detach().float(), layer.V.detach().float()
    return (U if scale == 1 else U / scale), V.T, scale * layer.rank


def check_not_file_names(layers: list[LoRALayer], where: str) -> None:
    """Refuse layers whose names are a file's own keys (not mapped to module paths)."""
    bad = [la.name for la in layers if la.meta.get("canonical") is False]
    if bad:
        shown = ", ".join(repr(n) for n in bad[:3])
        raise InputError(
            f"cannot write {where}: {len(bad)} layer(s) have no known module path ({shown}"
            f"{' ...' if len(bad) > 3 else ''}); their file names could not be mapped with "
            "certainty, and a model would not find those modules"
        )


def peft_magnitude(layer: LoRALayer) -> torch.Tensor:
    """The layer's DoRA magnitude as PEFT's ``lora_magnitude_vector`` (one per output), refused
    where it is per input column (kohya/ComfyUI ``dora_scale`` 1 x in) or of unknown kind: those
    cannot be turned into PEFT's without the base model's weights."""
    convention = layer.meta.get("magnitude_convention", "per_output")
    if convention != "per_output":
        raise InputError(
            f"layer {layer.name!r}: its DoRA magnitude is {convention} (kohya/ComfyUI dora_scale "
            "is one per input column; a flat dora_scale of a square layer could be either), but "
            "PEFT and diffusers store one per output row and the two differ by the base "
            "weights' norms; write it as kohya, which keeps dora_scale as read"
        )
    mag = torch.as_tensor(layer.meta["magnitude"]).float().reshape(-1)
    kind = layer_kind(layer)
    want = layer.in_features if kind == "embedding" else layer.out_features
    if mag.numel() != want:
        raise InputError(
            f"layer {layer.name!r}: DoRA magnitude has {mag.numel()} entries, expected {want}"
        )
    if kind == "conv":  # PEFT keeps a conv's magnitude as 1 x out x 1 x 1
        mag = mag.reshape(1, want, *[1] * len(layer.meta["kernel_size"]))
    return mag.contiguous()


def peft_layer_tensors(layer: LoRALayer, key: str, *, lora_bias: bool) -> dict[str, torch.Tensor]:
    """The PEFT-named tensors of one layer under ``key`` (lora_A/B, embedding A/B, magnitude,
    lora_B bias), from :func:`file_factors`."""
    up, down, _ = file_factors(layer)
    kind, out = layer_kind(layer), {}
    if kind == "embedding":
        out[f"{key}.lora_embedding_A"] = up.T.contiguous()
        out[f"{key}.lora_embedding_B"] = down.T.contiguous()
    elif kind in ("conv", "linear"):
        A, B = conv_factors(layer, up, down) if kind == "conv" else (down, up)
        out[f"{key}.lora_A.weight"] = A.contiguous()
        out[f"{key}.lora_B.weight"] = B.contiguous()
    else:
        raise InputError(f"layer {layer.name!r}: unknown kind {kind!r}")
    if "magnitude" in layer.meta:
        out[f"{key}.lora_magnitude_vector"] = peft_magnitude(layer)
    if lora_bias and kind != "embedding":
        bias = layer.meta.get("lora_bias")  # what PEFT adds on merge: lora_B's bias x scale
        scale = unfolded_scale(layer)
        bias = torch.zeros(layer.out_features) if bias is None else torch.as_tensor(bias) / scale
        out[f"{key}.lora_B.bias"] = bias.float().contiguous()
    return out


def conv_factors(
    layer: LoRALayer, up: torch.Tensor, down: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(down r x in x k..., up out x r x 1...) of a conv layer from its 2-D factors."""
    kernel = [int(k) for k in layer.meta["kernel_size"]]
    n = math.prod(kernel)
    if down.shape[1] % n:
        raise InputError(
            f"layer {layer.name!r}: V has {down.shape[1]} rows, not a multiple of the kernel "
            f"size {kernel}"
        )
    A = down.reshape(layer.rank, down.shape[1] // n, *kernel)
    return A, up.reshape(up.shape[0], layer.rank, *[1] * len(kernel))


def _common(values: list[Any]) -> Any:
    counts = Counter(values)
    return max(counts, key=lambda v: (counts[v], v))


def config_name(path: str) -> str:
    """The name a LoraConfig targets for the module at ``path``: a CLIP text encoder's path
    without its ``text_model.`` level, which transformers 5 removed from CLIPTextModel (not from
    CLIPTextModelWithProjection). PEFT matches target and pattern names as dotted suffixes, so the
    short name finds the module in either layout."""
    return path.removeprefix("text_model.") if path.startswith("text_model.encoder.") else path


def peft_config(layers: list[LoRALayer], paths: list[str]) -> dict[str, Any]:
    """A PEFT LoraConfig dict for ``layers`` at module ``paths`` in the model: the commonest rank
    and alpha as ``r`` / ``lora_alpha``, the others in ``rank_pattern`` / ``alpha_pattern``
    keyed by escaped names (:func:`config_name`)."""
    names = [config_name(p) for p in paths]
    ranks = [la.rank for la in layers]
    alphas = [file_factors(la)[2] for la in layers]
    r, alpha = _common(ranks), _common(alphas)
    dora = [("magnitude" in la.meta) for la in layers]
    if any(dora) and not all(dora):
        raise InputError(
            "cannot save a LoRA where only some layers are DoRA (have meta['magnitude']): "
            "PEFT's use_dora is one flag per adapter"
        )
    fan = [bool(la.meta.get("fan_in_fan_out")) for la in layers if layer_kind(la) == "linear"]
    return {
        "peft_type": "LORA",
        "task_type": None,
        "r": int(r),
        "lora_alpha": alpha,
        "rank_pattern": {re.escape(n): k for n, k in zip(names, ranks) if k != r},
        "alpha_pattern": {re.escape(n): a for n, a in zip(names, alphas) if a != alpha},
        "target_modules": list(names),
        "use_rslora": False,
        "use_dora": bool(all(dora)),
        "fan_in_fan_out": bool(fan) and all(fan),
        "lora_bias": any("lora_bias" in la.meta for la in layers),
        "lora_dropout": 0.0,
        "bias": "none",
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }


def by_component(layers: list[LoRALayer]) -> dict[str | None, list[LoRALayer]]:
    """Layers grouped by the pipeline component they are in (``meta["component"]``, set by
    ``load_lora``; None for one model's module paths, such as a language model's)."""
    groups: dict[str | None, list[LoRALayer]] = {}
    for la in layers:
        groups.setdefault(la.meta.get("component"), []).append(la)
    return groups
