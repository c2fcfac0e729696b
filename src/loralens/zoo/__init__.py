"""Zoos of real LoRA finetunes: the generic builder (`builder`) and its presets (`presets/`)."""

from loralens.zoo.builder import (
    ZooConflictError,
    build_small_zoo,
    build_zoo,
    merge_zoos,
    read_manifest,
    zoo_summary,
)
from loralens.zoo.preset import Preset, get_preset, preset_names, register_preset

__all__ = [
    "Preset",
    "ZooConflictError",
    "build_small_zoo",
    "build_zoo",
    "get_preset",
    "merge_zoos",
    "preset_names",
    "read_manifest",
    "register_preset",
    "zoo_summary",
]
