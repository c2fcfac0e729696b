"""PEFT adapter folders: adapter_config.json + adapter_model.safetensors (or .bin), read and written.

Reading folds PEFT's own scale into U: ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` with
``use_rslora``), with ``rank_pattern`` / ``alpha_pattern`` resolved per module exactly as PEFT
resolves them. ``delta_weights()`` then equals what ``merge_and_unload`` adds to each base weight
(transposed for fan_in_fan_out modules such as GPT-2's Conv1D, whose stored weight is in x out;
conv kernels flattened to out x in*kh*kw; embeddings as num_embeddings x dim). For DoRA layers
U V^T is the low-rank directional update; the magnitude vector is kept in
``layer.meta["magnitude"]`` (DoRA's merge rescales columns, so it adds more than U V^T).
With ``lora_bias=True`` the bias PEFT adds to the base bias on merge (lora_B's bias times the
scale) is kept in ``layer.meta["lora_bias"]``.

Other ``layer.meta`` keys set by every reader: ``kind`` ("linear", "conv", "embedding"),
``scale`` (the factor folded into U), ``dtype`` (storage dtype; factors are always float32),
``fan_in_fan_out`` (linear layers), ``kernel_size`` and ``in_channels`` (conv layers).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from loralens.errors import InputError, LoRALensWarning
from loralens.formats.config import ConfigScale, read_config
from loralens.formats.errors import LoRAFormatError
from loralens.formats.keys import FULL_WEIGHT_KEY, ModuleParts, parse_keys, refuse_unknown
from loralens.formats.layers import FileLayers, PendingLayer, alpha_scale, opened, plan_layers
from loralens.formats.tensor_file import TensorFile
from loralens.formats.writing import (
    by_component,
    check_not_file_names,
    peft_config,
    peft_layer_tensors,
)
from loralens.lora import LoRA

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."
# full (non-LoRA) tensors PEFT may save next to the LoRA factors: resized embeddings, heads
_SAVED_FULL_LAYERS = {"embed_tokens", "lm_head", "wte", "embed_in", "embed_out", "shared"}


def has_config(folder: Path) -> bool:
    """Whether ``folder`` holds something named adapter_config.json (reading it checks the kind)."""
    return (folder / CONFIG_NAME).exists()


def is_peft_dir(path: Path) -> bool:
    return path.is_dir() and has_config(path)


def weights_file(folder: Path) -> Path:
    for name in WEIGHT_NAMES:
        if (folder / name).exists():
            return folder / name
    raise LoRAFormatError(
        folder,
        f"PEFT adapter folder has {CONFIG_NAME} but no weights: expected "
        f"{' or '.join(WEIGHT_NAMES)}",
    )


def _allowed_extra(key: str, cfg: dict[str, Any] | None) -> bool:
    """Full tensors PEFT legitimately saves beside the LoRA factors."""
    k = key[len(PREFIX) :] if key.startswith(PREFIX) else key
    segments = k.split(".")
    if ".base_layer." in f".{k}" or "trainable_tokens_delta" in segments:
        return True
    if len(segments) >= 2 and segments[-2] in _SAVED_FULL_LAYERS:
        return True
    to_save = (cfg or {}).get("modules_to_save") or []
    return any(f".{m}." in f".{k}" for m in to_save)


def parse_peft_tensors(
    file: TensorFile, cfg: dict[str, Any] | None, config_path: Path | None, *, allow_nonfinite: bool
) -> tuple[list[PendingLayer], list[str], list[str]]:
    """Planned layers of a PEFT-style state dict; ``cfg`` (read from ``config_path``) None means
    no config (alpha keys or scale 1). Returns (layers, names of saved full tensors that are not
    LoRA factors, names of modules whose scale was assumed 1 for want of a config or alpha).
    """
    path = file.path
    modules, unparsed = parse_keys(file.keys, path, strip_prefix=PREFIX)
    extras = [k for k in unparsed if _allowed_extra(k, cfg) or FULL_WEIGHT_KEY.match(k)]
    unknown = [k for k in unparsed if k not in extras]
    refuse_unknown(
        unknown, path, "LoRA factors (lora_A/lora_B/lora_embedding_A/B/lora_magnitude_vector)"
    )
    config_scale = ConfigScale(cfg, config_path or path) if cfg is not None else None
    assumed: list[str] = []

    def scale_for(name: str, rank: int, parts: ModuleParts, alpha: float | None):
        if config_scale is None:
            if alpha is None:
                assumed.append(name)
            return alpha_scale(rank, alpha), None
        if alpha is not None:
            raise LoRAFormatError(path, f"unexpected key {parts.keys['alpha']!r} in a PEFT adapter")
        return config_scale(name)

    fan = bool((cfg or {}).get("fan_in_fan_out", False))
    layers = plan_layers(
        modules, file, scale_for, allow_nonfinite=allow_nonfinite, fan_in_fan_out=fan
    )
    return layers, extras, assumed


def open_peft(
    path: Path, *, allow_nonfinite: bool = False, weights: Path | None = None
) -> FileLayers:
    """Open a PEFT adapter folder (or its weights file, with the config beside it)."""
    folder = path if path.is_dir() else path.parent
    cfg = read_config(folder / CONFIG_NAME)
    weights = weights or weights_file(folder)
    with opened(weights) as file:
        layers, extras, _ = parse_peft_tensors(
            file, cfg, folder / CONFIG_NAME, allow_nonfinite=allow_nonfinite
        )
        if not layers:
            raise LoRAFormatError(weights, "holds no LoRA factors (no lora_A/lora_B keys)")
    return FileLayers(file, layers, peft_metadata(path, cfg, file.metadata, extras))


def open_peft_weights_only(path: Path, *, allow_nonfinite: bool = False) -> FileLayers:
    """A PEFT-style weights file with no adapter_config.json beside it.

    Modules with an ``alpha`` key get alpha / r. For the others lora_alpha is unknown without
    the config: their scale is taken as 1 (alpha = r, the convention diffusers uses for such
    files), a warning says so, ``metadata["scale_assumed"]`` is True and
    ``metadata["scale_assumed_modules"]`` lists them.
    """
    with opened(path) as file:
        layers, extras, assumed = parse_peft_tensors(
            file, None, None, allow_nonfinite=allow_nonfinite
        )
        if not layers:
            raise LoRAFormatError(path, "holds no LoRA factors (no lora_A/lora_B keys)")
    metadata: dict[str, Any] = {
        "format": "peft",
        "source": str(path),
        "safetensors_metadata": file.metadata,
    }
    if assumed:
        warnings.warn(
            f"{path}: no {CONFIG_NAME} beside this file and no alpha key for "
            f"{len(assumed)} module(s), so their lora_alpha is unknown; assuming scale 1 "
            "(alpha = r)",
            LoRALensWarning,
            stacklevel=4,
        )
        metadata["scale_assumed"] = True
        metadata["scale_assumed_modules"] = assumed
    if extras:
        metadata["non_lora_keys"] = extras
    return FileLayers(file, layers, metadata)


# ----------------------------------------------------------------------------- writing


def save_peft(
    lora: LoRA, folder: str | Path, *, base_model_name_or_path: str | None = None
) -> Path:
    """Write ``lora`` as a PEFT adapter folder that ``PeftModel.from_pretrained`` loads exactly.

    Layer names must be module paths: the canonical names ``load_lora`` gives (a pipeline
    component's prefix such as ``unet.`` is dropped, since a PEFT adapter is one model's), or
    names of your own model. Layers whose file names could not be mapped, and layers of several
    pipeline components, are refused. Each module's rank and alpha are written as read (the
    commonest in ``r`` / ``lora_alpha``, others in ``rank_pattern`` / ``alpha_pattern`` keyed
    by the escaped full module name), so alpha / r folds back to the scale. ``layer.meta``
    decides how each layer is written: ``kind`` "linear" (default), "conv" (with
    ``kernel_size``) or "embedding"; ``fan_in_fan_out``; DoRA ``magnitude`` (PEFT's convention
    only: see :func:`~loralens.formats.writing.peft_magnitude`); ``lora_bias``.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    if not lora.layers:
        raise InputError("cannot save a LoRA with no layers")
    check_not_file_names(lora.layers, "a PEFT adapter")
    groups = by_component(lora.layers)
    if len(groups) > 1:
        parts = ", ".join(sorted(str(c or "other") for c in groups))
        raise InputError(
            f"cannot write one PEFT adapter for several models (layers of {parts}): a PEFT "
            "folder adapts one model; write a diffusers file (convert --to diffusers) instead"
        )
    ((component, layers),) = groups.items()
    names = [la.name.removeprefix(f"{component}.") for la in layers]
    config = peft_config(layers, names)
    tensors: dict[str, torch.Tensor] = {}
    for la, name in zip(layers, names):
        tensors.update(peft_layer_tensors(la, PREFIX + name, lora_bias=config["lora_bias"]))
    base = base_model_name_or_path
    if base is None:
        base = lora.metadata.get("base_model")
    config["base_model_name_or_path"] = base
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


def peft_metadata(path: Any, cfg: dict[str, Any], st_meta: Any, extras: Any) -> dict[str, Any]:
    """The LoRA metadata every PEFT reader records."""
    metadata: dict[str, Any] = {
        "format": "peft",
        "source": str(path),
        "base_model": cfg.get("base_model_name_or_path"),
        "target_modules": cfg.get("target_modules"),
        "peft_config": cfg,
        "safetensors_metadata": st_meta,
    }
    if extras:
        metadata["non_lora_keys"] = extras
    return metadata
