"""loralens: learning on LoRAs. Read LoRA adapters as data, predict properties of the finetuned model."""

from loralens.features import spectral_stats
from loralens.formats import LoRAFormatError, detect_format, load_lora, save_lora
from loralens.lora import LayerSpec, LoRA, LoRABatch, LoRALayer, collate
from loralens.models import MODEL_NAMES, build_model, model_cost
from loralens.symmetry import (
    assert_gl_invariant,
    assert_o_invariant,
    gl_invariance_error,
    gl_transform,
    o_transform,
)
from loralens.zoo import build_small_zoo, build_zoo, get_preset, merge_zoos

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
    "collate",
    "detect_format",
    "get_preset",
    "gl_invariance_error",
    "gl_transform",
    "load_lora",
    "merge_zoos",
    "model_cost",
    "o_transform",
    "save_lora",
    "spectral_stats",
]
