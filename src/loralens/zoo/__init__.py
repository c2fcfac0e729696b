"""Zoos of real LoRA finetunes: the generic builder (`builder`) and its presets (`presets/`)."""

from loralens.zoo.preset import Preset, get_preset, preset_names, register_preset

__all__ = ["Preset", "get_preset", "preset_names", "register_preset"]
