"""loralens: learning on LoRAs. Read LoRA adapters as data, predict properties of the finetuned model.

The public names below are imported on first use (``ll.load_lora`` loads the readers, and torch,
then), so ``import loralens`` and the command line's ``--help`` and ``--version`` load nothing
heavy."""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: Every public name -> the module it lives in, imported when the name is first used.
_PUBLIC = {
    "CanonicalCache": "loralens.canonical_form",
    "canonical_form": "loralens.canonical_form",
    "LoRALensWarning": "loralens.errors",
    "guess_base_model": "loralens.families",
    "matching_families": "loralens.families",
    "spectral_stats": "loralens.features",
    "LoRAFormatError": "loralens.formats",
    "LoRAReader": "loralens.formats",
    "convert": "loralens.formats",
    "detect_format": "loralens.formats",
    "load_lora": "loralens.formats",
    "model_family": "loralens.formats",
    "open_lora": "loralens.formats",
    "save_diffusers": "loralens.formats",
    "save_kohya": "loralens.formats",
    "save_lora": "loralens.formats",
    "inspect_adapter": "loralens.inspection",
    "inspect_adapters": "loralens.inspection",
    "LayerSpec": "loralens.lora",
    "LoRA": "loralens.lora",
    "LoRABatch": "loralens.lora",
    "LoRALayer": "loralens.lora",
    "collate": "loralens.lora",
    "MODEL_NAMES": "loralens.models",
    "build_model": "loralens.models",
    "model_cost": "loralens.models",
    "resize": "loralens.resize",
    "assert_gl_invariant": "loralens.symmetry",
    "assert_o_invariant": "loralens.symmetry",
    "gl_invariance_error": "loralens.symmetry",
    "gl_transform": "loralens.symmetry",
    "lift_width": "loralens.symmetry",
    "o_transform": "loralens.symmetry",
    "build_small_zoo": "loralens.zoo",
    "build_zoo": "loralens.zoo",
    "build_zoo_ray": "loralens.zoo",
    "get_preset": "loralens.zoo",
    "merge_zoos": "loralens.zoo",
    "embed": "loralens.search.embed",
    "build_index": "loralens.search.index",
    "load_index": "loralens.search.index",
    "search": "loralens.search.index",
}


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'loralens' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    """``loralens.search`` is a public function and the name of a subpackage: importing the
    subpackage sets the package's attribute to it, which would make ``ll.search`` a module
    wherever anything imported ``loralens.search.*`` first. The attribute stays the function
    (the subpackage is still ``sys.modules["loralens.search"]`` for every import)."""

    @property
    def search(self) -> Any:
        from loralens.search.index import search

        return search

    @search.setter
    def search(self, value: Any) -> None:
        pass


sys.modules[__name__].__class__ = _Package


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})


if TYPE_CHECKING:  # what type checkers and IDEs see: the same names, imported eagerly
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
    from loralens.search.embed import embed
    from loralens.search.index import build_index, load_index, search
    from loralens.symmetry import (
        assert_gl_invariant,
        assert_o_invariant,
        gl_invariance_error,
        gl_transform,
        lift_width,
        o_transform,
    )
    from loralens.zoo import build_small_zoo, build_zoo, build_zoo_ray, get_preset, merge_zoos

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
