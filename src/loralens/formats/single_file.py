"""Single-file LoRAs (kohya, diffusers, ComfyUI, XLabs, LyCORIS): every key is a LoRA factor, a
LyCORIS factor, an alpha, or a full weight difference listed as such.

The reading these formats share: pair the factors by module path, take each module's scale from
its ``alpha`` key (alpha / rank; alpha 0 or missing means scale 1) or, where it has none, from
the PEFT-style config of its component (``unet``, ``text_encoder``, ...) if the file carries one.
Full weight differences (``.diff``, ``.diff_b`` of norms and biases, ...) are not low rank: they
are listed in ``lora.metadata["non_lora_keys"]``, never dropped silently.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from loralens.formats.config import ConfigScale
from loralens.formats.errors import LoRAFormatError
from loralens.formats.keys import FULL_WEIGHT_KEY, ModuleParts, parse_keys, refuse_unknown
from loralens.formats.layers import FileLayers, alpha_scale, opened, plan_layers

#: Reads per-component PEFT configs from a file's safetensors header metadata.
ConfigReader = Callable[[dict[str, str], Path], dict[str, dict[str, Any]]]


def open_single_file(
    path: Path,
    fmt: str,
    *,
    component_configs: ConfigReader | None = None,
    allow_nonfinite: bool = False,
) -> FileLayers:
    """Open a .safetensors (or weights-only .bin) file of LoRA factors and alphas as ``fmt``.

    ``component_configs`` (diffusers) reads per-component configs from the header metadata;
    they give the scale of modules without an alpha key.
    """
    with opened(path) as file:
        st_meta = file.metadata
        modules, unparsed = parse_keys(file.keys, path)
        extras = [k for k in unparsed if FULL_WEIGHT_KEY.match(k)]
        refuse_unknown(
            [k for k in unparsed if not FULL_WEIGHT_KEY.match(k)], path, "LoRA factors or alphas"
        )
        configs = component_configs(st_meta, path) if component_configs else {}
        scales = {c: ConfigScale(cfg, path) for c, cfg in configs.items()}

        def scale_for(name: str, rank: int, parts: ModuleParts, alpha: float | None):
            component, _, inner = name.partition(".")
            if alpha is None and component in scales:
                return scales[component](inner)
            return alpha_scale(rank, alpha), None

        layers = plan_layers(modules, file, scale_for, allow_nonfinite=allow_nonfinite)
        if not layers:
            raise LoRAFormatError(path, "holds no LoRA factors")
    metadata: dict[str, Any] = {
        "format": fmt,
        "source": str(path),
        "safetensors_metadata": st_meta,
    }
    if configs:
        metadata["adapter_configs"] = configs
    if extras:
        metadata["non_lora_keys"] = extras
    base = st_meta.get("ss_sd_model_name") or st_meta.get("ss_base_model_version")
    if base:
        metadata["base_model"] = base
    return FileLayers(file, layers, metadata)
