"""diffusers single-file LoRAs (``save_lora_weights``, ``pytorch_lora_weights.safetensors``).

Keys: ``unet.<module>.lora.down.weight`` / ``.lora.up.weight`` (older files; attention
processor style ``attn1.processor.to_q_lora.down.weight`` is mapped to ``attn1.to_q``), or
PEFT-style ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` (current diffusers). The scale
comes from ``<module>.alpha`` keys, else from the ``lora_adapter_metadata`` that
``save_lora_weights`` writes into the safetensors header (per component: ``unet.lora_alpha``,
``unet.r``, ...), else it is 1 (alpha = rank), which is how diffusers itself loads such files.
Layer names keep the component prefix (``unet.``, ``text_encoder.``, ``transformer.``).
The safetensors header metadata is kept in ``lora.metadata["safetensors_metadata"]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loralens.formats.config import check_config, parse_json
from loralens.formats.layers import FileLayers
from loralens.formats.single_file import open_single_file

ADAPTER_METADATA_KEY = "lora_adapter_metadata"
#: Key prefixes of the pipeline components diffusers saves LoRAs for.
COMPONENTS = (
    "unet.",
    "text_encoder.",
    "text_encoder_2.",
    "text_encoder_3.",
    "transformer.",
    "prior.",
)


def component_configs(st_meta: dict[str, str], path: Path) -> dict[str, dict[str, Any]]:
    """diffusers' per-component LoraConfig dicts from the safetensors header, if any."""
    raw = st_meta.get(ADAPTER_METADATA_KEY)
    if not raw:
        return {}
    flat = parse_json(raw, path, f"JSON in header metadata {ADAPTER_METADATA_KEY!r}")
    if not isinstance(flat, dict):
        return {}
    configs: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        component, _, field = key.partition(".")
        if field:
            configs.setdefault(component, {})[field] = value
    return {c: check_config(cfg, path) for c, cfg in configs.items()}


def open_diffusers(path: Path, *, allow_nonfinite: bool = False) -> FileLayers:
    """Open a diffusers-style .safetensors (or weights-only .bin) file."""
    return open_single_file(
        path, "diffusers", component_configs=component_configs, allow_nonfinite=allow_nonfinite
    )
