"""loralens: learning on LoRAs. Read LoRA adapters as data, predict properties of the finetuned model."""

from loralens.canonical_form import CanonicalCache, canonical_form
from loralens.errors import LoRALensWarning
from loralens.families import guess_base_model, matching_families
from loralens.features import spectral_stats
from loralens.formats import (
    LoRAFormatError,
    LoRAReader,
    convert,
    detect_format,
    load_lora,
    model_family,
    open_lora,
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
    lift_width,
    o_transform,
)
from loralens.zoo import build_small_zoo, build_zoo, build_zoo_ray, get_preset, merge_zoos

__version__ = "0.1.0"

#: Public names whose modules load pandas and the store: imported on first use only.
_LAZY = {
    "embed": "loralens.search.embed",
    "build_index": "loralens.search.index",
    "load_index": "loralens.search.index",
    "search": "loralens.search.index",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'loralens' has no attribute {name!r}")


__all__ = [
    "MODEL_NAMES",
    "CanonicalCache",
    "LayerSpec",
    "LoRA",
    "LoRABatch",
    "LoRAFormatError",
    "LoRALayer",
    "LoRALensWarning",
    "LoRAReader",
    "__version__",
    "assert_gl_invariant",
    "assert_o_invariant",
    "build_index",
    "build_model",
    "build_small_zoo",
    "build_zoo",
    "build_zoo_ray",
    "canonical_form",
    "collate",
    "convert",
    "detect_format",
    "embed",
    "get_preset",
    "gl_invariance_error",
    "gl_transform",
    "guess_base_model",
    "inspect_adapter",
    "inspect_adapters",
    "lift_width",
    "load_index",
    "load_lora",
    "matching_families",
    "merge_zoos",
    "model_cost",
    "model_family",
    "o_transform",
    "open_lora",
    "resize",
    "save_diffusers",
    "save_kohya",
    "save_lora",
    "search",
    "spectral_stats",
]
