"""Writing single-file LoRAs: kohya (``lora_unet_*.lora_down.weight`` + ``.alpha``) and diffusers
(``unet.*.lora_A.weight`` with ``lora_adapter_metadata`` in the header, as
``save_lora_weights`` writes it), from layers with canonical names.

Each module's rank and alpha are written as read (:func:`~loralens.formats.writing.file_factors`).
kohya stems are the canonical path with "." written "_", under ``lora_unet_`` and
``lora_te_`` (``lora_te1_`` / ``lora_te2_`` with two text encoders); a stem is written only
if it reads back to the same module (diffusers, ComfyUI and loralens read these).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from loralens import atomic
from loralens.errors import InputError, SettingsError
from loralens.formats.canonical import KOHYA_STEM, Part, canonical_parts
from loralens.formats.diffusers import ADAPTER_METADATA_KEY
from loralens.formats.writing import (
    by_component,
    check_not_file_names,
    conv_factors,
    file_factors,
    layer_kind,
    peft_config,
    peft_layer_tensors,
)
from loralens.lora import LoRA, LoRALayer

_KOHYA_PREFIXES = {
    "unet": "lora_unet_",
    "text_encoder_2": "lora_te2_",
    "text_encoder_3": "lora_te3_",
}


def _write(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    from safetensors.torch import save

    if path.suffix != ".safetensors":
        raise SettingsError(f"{path}: a single-file LoRA is written as .safetensors")
    atomic.write_file_atomic(path, save(tensors, metadata={"format": "pt", **metadata}))
    return path


def kohya_stem(layer: LoRALayer, te_prefix: str) -> str:
    """The kohya module stem of ``layer``, refused unless it reads back to the same module."""
    component = layer.meta.get("component")
    if layer.meta.get("canonical") is False:
        key = str(layer.meta.get("file_key", ""))
        if KOHYA_STEM.match(key):
            return key  # a kohya file's own stem that has no module path: written as read
    prefix = te_prefix if component == "text_encoder" else _KOHYA_PREFIXES.get(component or "")
    if prefix is None:
        why = (
            "kohya files of Flux name Black Forest Labs' fused modules, which loralens does "
            "not write"
            if component == "transformer"
            else "kohya files adapt Stable Diffusion pipelines (unet, text encoders)"
        )
        raise InputError(
            f"cannot write layer {layer.name!r} as kohya: {why}; write peft or diffusers"
        )
    stem = prefix + layer.name[len(component) + 1 :].replace(".", "_")
    back = canonical_parts(stem, "kohya", *layer.shape)
    if back != [Part(layer.name, None, component)]:
        raise InputError(
            f"cannot write layer {layer.name!r} as kohya: its stem {stem!r} would not read "
            "back as the same module"
        )
    return stem


def _dora_scale(layer: LoRALayer) -> torch.Tensor:
    """The magnitude as a ``dora_scale`` of the shape that says its convention."""
    mag = torch.as_tensor(layer.meta["magnitude"]).float()
    ones = [1] * (len(layer.meta["kernel_size"]) if layer_kind(layer) == "conv" else 0)
    convention = layer.meta.get("magnitude_convention", "per_output")
    if convention == "per_output":
        return mag.reshape(layer.out_features, 1, *ones).contiguous()
    if convention == "per_input":
        return mag.reshape(1, -1, *ones).contiguous()
    return mag.contiguous()  # unknown: as the file had it


def save_kohya(lora: LoRA, path: str | Path) -> Path:
    """Write ``lora`` as a kohya .safetensors file (``lora_down`` / ``lora_up`` / ``alpha``, DoRA
    ``dora_scale`` in its own convention)."""
    path = Path(path)
    has_te2 = any(la.meta.get("component") == "text_encoder_2" for la in lora.layers)
    te_prefix = "lora_te1_" if has_te2 else "lora_te_"
    tensors: dict[str, torch.Tensor] = {}
    for la in lora.layers:
        kind = layer_kind(la)
        if kind not in ("linear", "conv") or "lora_bias" in la.meta:
            what = "an embedding" if kind == "embedding" else "a lora_B bias"
            raise InputError(f"cannot write layer {la.name!r} as kohya: it has {what}")
        stem = kohya_stem(la, te_prefix)
        up, down, alpha = file_factors(la)
        if kind == "conv":
            down, up = conv_factors(la, up, down)
        tensors[f"{stem}.lora_down.weight"] = down.contiguous()
        tensors[f"{stem}.lora_up.weight"] = up.contiguous()
        tensors[f"{stem}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
        if "magnitude" in la.meta:
            tensors[f"{stem}.dora_scale"] = _dora_scale(la)
    return _write(tensors, path, {})


def save_diffusers(lora: LoRA, path: str | Path) -> Path:
    """Write ``lora`` as a diffusers .safetensors file, as ``save_lora_weights`` writes it:
    PEFT-named factors under component prefixes and each component's LoraConfig in the header's
    ``lora_adapter_metadata``, which ``load_lora_weights`` reads."""
    check_not_file_names(lora.layers, "a diffusers file")
    groups = by_component(lora.layers)
    if None in groups:
        raise InputError(
            f"cannot write a diffusers file: layer {groups[None][0].name!r} is in no diffusion "
            "pipeline component (unet, text_encoder, transformer, ...); write peft instead"
        )
    tensors: dict[str, torch.Tensor] = {}
    configs: dict[str, object] = {}
    for component, layers in groups.items():
        names = [la.name[len(component) + 1 :] for la in layers]
        config = peft_config(layers, names)
        for la in layers:
            tensors.update(peft_layer_tensors(la, la.name, lora_bias=config["lora_bias"]))
        configs.update({f"{component}.{k}": v for k, v in config.items()})
    metadata = {ADAPTER_METADATA_KEY: json.dumps(configs, indent=2, sort_keys=True)}
    return _write(tensors, Path(path), metadata)
