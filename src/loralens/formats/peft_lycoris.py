"""PEFT LoHa and LoKr adapter folders (``LoHaConfig`` / ``LoKrConfig``: adapter_config.json with
``peft_type`` LOHA / LOKR, ``hada_*`` / ``lokr_*`` keys under ``base_model.model.``).

The factors are read exactly as low rank by :mod:`loralens.formats.lycoris`; the scale is PEFT's
(``LycorisLayer.update_layer``): ``alpha / r`` per module, with ``r`` and ``alpha`` from the
config's ``rank_pattern`` / ``alpha_pattern`` (resolved as for LoRA) and its ``r`` / ``alpha``.
Unlike LyCORIS files, PEFT scales a LoKr module with both halves full by ``alpha / r`` too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loralens.formats.config import check_config, read_json_config
from loralens.formats.errors import LoRAFormatError
from loralens.formats.layers import FileLayers, opened
from loralens.formats.peft import (
    CONFIG_NAME,
    has_config,
    parse_peft_tensors,
    peft_metadata,
    weights_file,
)
from loralens.formats.tensor_file import TensorFile

#: PEFT's peft_type -> the LyCORIS algorithm its keys hold
PEFT_LYCORIS_TYPES = {"LOHA": "loha", "LOKR": "lokr"}


def peft_lycoris_algorithm(folder: Path) -> str | None:
    """ "loha" or "lokr" when ``folder``'s adapter_config.json says peft_type LOHA / LOKR."""
    if not has_config(folder):
        return None
    cfg = read_json_config(folder / CONFIG_NAME)
    kind = str(cfg.get("peft_type", "")).upper() if isinstance(cfg, dict) else ""
    return PEFT_LYCORIS_TYPES.get(kind)


def _scale_config(cfg: dict[str, Any], path: Path) -> dict[str, Any]:
    """The LoRA-shaped view of a LoHa/LoKr config that PEFT's scale rule reads (``alpha`` is
    LoRA's ``lora_alpha``), checked value by value like a LoRA config."""
    view = {
        k: cfg[k]
        for k in (
            "r",
            "rank_pattern",
            "alpha_pattern",
            "modules_to_save",
            "base_model_name_or_path",
        )
        if k in cfg
    }
    view["lora_alpha"] = cfg.get("alpha", 8)  # LoHaConfig / LoKrConfig default
    try:
        return check_config({**view, "peft_type": "LORA"}, path)
    except LoRAFormatError as e:  # name the config's own key
        raise LoRAFormatError(path, e.problem.replace("lora_alpha", "alpha")) from None


def _refuse_conv1d_full_lokr(file: TensorFile) -> None:
    """PEFT merges a full 3-D ``lokr_w2`` (a Conv1d layer) by ``torch.kron`` of a 2-D w1 with
    it, which mixes w1's columns into the output channels (LyCORIS unsqueezes w1 first): what
    PEFT adds is not the LyCORIS delta loralens reads, so such a file is refused."""
    for key in file.keys:
        if key.endswith(".lokr_w2") and len(file.shape(key)) == 3:
            raise LoRAFormatError(
                file.path,
                f"{key!r} is a full 3-D LoKr factor (a Conv1d layer): PEFT merges it in a "
                "layout other than LyCORIS's, so loralens does not read it",
            )


def open_peft_lycoris(path: Path, *, allow_nonfinite: bool = False) -> FileLayers:
    """Open a PEFT LoHa/LoKr adapter folder (or its weights file, the config beside it)."""
    folder = path if path.is_dir() else path.parent
    config_path = folder / CONFIG_NAME
    cfg = read_json_config(config_path)
    algo = PEFT_LYCORIS_TYPES[str(cfg["peft_type"]).upper()]
    weights = path if path.is_file() else weights_file(folder)
    with opened(weights) as file:
        _refuse_conv1d_full_lokr(file)
        layers, extras, _ = parse_peft_tensors(
            file, _scale_config(cfg, config_path), config_path, allow_nonfinite=allow_nonfinite
        )
        if not layers:
            raise LoRAFormatError(weights, f"holds no {cfg['peft_type']} factors")
        for layer in layers:
            if layer.lycoris != algo:
                raise LoRAFormatError(
                    weights,
                    f"module {layer.name!r} is not a {algo} layer "
                    f"({layer.lycoris or 'plain LoRA'}), but {CONFIG_NAME} says "
                    f"peft_type {cfg['peft_type']}",
                )
    return FileLayers(file, layers, peft_metadata(path, cfg, file.metadata, extras))
