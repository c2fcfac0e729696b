"""loralens: learning on LoRAs. Read LoRA adapters as data, predict properties of the finetuned model."""

from loralens.canonical import canonical_form
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

#: Public names whose modules load pandas and the store: imported on first use only.
_LAZY = {
    "embed": "loralens.learn.embed",
    "build_index": "loralens.learn.search",
    "load_index": "loralens.learn.search",
    "search": "loralens.learn.search",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'loralens' has no attribute {name!r}")


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
    "build_index",
    "build_model",
    "build_small_zoo",
    "build_zoo",
    "canonical_form",
    "collate",
    "detect_format",
    "embed",
    "get_preset",
    "gl_invariance_error",
    "gl_transform",
    "load_index",
    "load_lora",
    "merge_zoos",
    "model_cost",
    "o_transform",
    "save_lora",
    "search",
]
