"""loralens: learning on LoRAs. Read LoRA adapters as data, predict properties of the finetuned model."""

from loralens.families import guess_base_model, matching_families
from loralens.features import spectral_stats
from loralens.formats import (
    LoRAFormatError,
    convert,
    detect_format,
    load_lora,
    model_family,
    save_diffusers,
    save_kohya,
    save_lora,
)
from loralens.inspection import inspect_adapter, inspect_adapters
from loralens.lora import LayerSpec, LoRA, LoRABatch, LoRALayer, collate
from loralens.models import MODEL_NAMES, build_model, model_cost
from loralens.resize import resize
from loralens.symmetry import (
    assert_gl_invariant,
    assert_o_invariant,
    gl_invariance_error,
    gl_transform,
    o_transform,
)
from loralens.zoo import build_small_zoo, build_zoo, build_zoo_ray, get_preset, merge_zoos

__version__ = "0.1.0"

__all__ = [
    "MODEL_NAMES",
    "LayerSpec",
    "LoRA",
    "LoRABatch",
    "LoRAFormatError",
    "LoRALayer",
    "__version__",
    "assert_gl_invariant",
    "assert_o_invariant",
    "build_model",
    "build_small_zoo",
    "build_zoo",
    "build_zoo_ray",
    "collate",
    "convert",
    "detect_format",
    "get_preset",
    "gl_invariance_error",
    "gl_transform",
    "guess_base_model",
    "inspect_adapter",
    "inspect_adapters",
    "load_lora",
    "matching_families",
    "merge_zoos",
    "model_cost",
    "model_family",
    "o_transform",
    "resize",
    "save_diffusers",
    "save_kohya",
    "save_lora",
    "spectral_stats",
]
