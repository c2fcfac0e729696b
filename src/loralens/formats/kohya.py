"""Single-file LoRAs from the Stable Diffusion world: kohya-ss and diffusers key styles.

kohya: ``lora_unet_<path_with_underscores>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``
(``lora_te_``, ``lora_te1_``, ``lora_te2_`` for text encoders). The scale is alpha / rank, and
an alpha of 0 or a missing alpha means alpha = rank (scale 1). Layer names are the kohya module
stems (``lora_unet_down_blocks_0_..._to_q``), since underscores cannot be turned back into
module paths without the model. This is kohya's own rule (``scale = alpha / lora_dim`` per
module); it agrees with diffusers' ``fuse_lora`` whenever the file has one alpha for all modules
(as kohya's trainer writes it). With different alphas per module, diffusers 0.42 applies a
shared alpha to attention modules instead of each module's own (tested in
tests/test_formats_diffusers.py with a single alpha).

diffusers: ``unet.<module>.lora.down.weight`` / ``.lora.up.weight`` (older files; attention
processor style ``attn1.processor.to_q_lora.down.weight`` is mapped to ``attn1.to_q``), or
PEFT-style ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` (current diffusers). The scale
comes from ``<module>.alpha`` keys, else from the ``lora_adapter_metadata`` that
``save_lora_weights`` writes into the safetensors header (per component: ``unet.lora_alpha``,
``unet.r``, ...), else it is 1 (alpha = rank), which is how diffusers itself loads such files.
Layer names keep the component prefix (``unet.``, ``text_encoder.``, ``transformer.``).
The safetensors header metadata (e.g. ``ss_network_dim``) is kept in
``lora.metadata["safetensors_metadata"]``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loralens.formats._build import ModuleParts, alpha_scale, build_layers, parse_keys
from loralens.formats._io import read_tensor_file
from loralens.formats.errors import LoRAFormatError
from loralens.formats.peft import check_config, config_scale
from loralens.lora import LoRA

ADAPTER_METADATA_KEY = "lora_adapter_metadata"


def _component_configs(st_meta: dict[str, str], path: Path) -> dict[str, dict[str, Any]]:
    """diffusers' per-component LoraConfig dicts from the safetensors header, if any."""
    raw = st_meta.get(ADAPTER_METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError as e:
        raise LoRAFormatError(
            path, f"invalid JSON in header metadata {ADAPTER_METADATA_KEY!r}: {e}"
        ) from e
    if not isinstance(flat, dict):
        return {}
    configs: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        component, _, field = key.partition(".")
        if field:
            configs.setdefault(component, {})[field] = value
    return {c: check_config(cfg, path) for c, cfg in configs.items()}


def load_single_file(path: Path, fmt: str, *, allow_nonfinite: bool = False) -> LoRA:
    """Read a kohya- or diffusers-style .safetensors (or weights-only .bin) file."""
    tensors, st_meta = read_tensor_file(path)
    modules, unparsed = parse_keys(tensors, path)
    if unparsed:
        shown = ", ".join(repr(k) for k in unparsed[:5])
        raise LoRAFormatError(
            path,
            f"{len(unparsed)} key(s) are not LoRA factors or alphas: {shown}"
            f"{' ...' if len(unparsed) > 5 else ''}",
        )
    configs = _component_configs(st_meta, path) if fmt == "diffusers" else {}

    def scale_for(name: str, rank: int, parts: ModuleParts):
        component, _, inner = name.partition(".")
        if "alpha" not in parts.tensors and component in configs:
            scale, r = config_scale(configs[component], inner)
            return scale, r, {}
        return alpha_scale(path, name, rank, parts), None, {}

    layers = build_layers(modules, path, scale_for, allow_nonfinite=allow_nonfinite)
    if not layers:
        raise LoRAFormatError(path, "holds no LoRA factors")
    metadata: dict[str, Any] = {
        "format": fmt,
        "source": str(path),
        "safetensors_metadata": st_meta,
    }
    if configs:
        metadata["adapter_configs"] = configs
    base = st_meta.get("ss_sd_model_name") or st_meta.get("ss_base_model_version")
    if base:
        metadata["base_model"] = base
    return LoRA(layers=layers, metadata=metadata)
