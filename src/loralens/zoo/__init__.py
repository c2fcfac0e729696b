"""Zoos of real LoRA finetunes: the generic builder (`builder`), the same build as Ray tasks
(`ray_build`), its folder format (`folder`), shard merging (`merge`) and the presets (`preset`,
`presets/`, `digits/`)."""

from loralens.zoo.builder import build_small_zoo, build_zoo
from loralens.zoo.folder import ZooConflictError, read_manifest
from loralens.zoo.merge import merge_zoos
from loralens.zoo.preset import Preset, get_preset, preset_names, register_preset
from loralens.zoo.ray_build import build_zoo_ray

__all__ = [
    "Preset",
    "ZooConflictError",
    "build_small_zoo",
    "build_zoo",
    "build_zoo_ray",
    "get_preset",
    "merge_zoos",
    "preset_names",
    "read_manifest",
    "register_preset",
]
