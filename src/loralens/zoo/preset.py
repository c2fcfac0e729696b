"""The preset interface: what a zoo preset provides to the generic builder (`loralens.zoo.builder`).

A *preset* knows one kind of finetune (a base model, its data, how to train and label a LoRA);
the builder knows nothing about models. It owns the output folder, the manifest, resuming after
kill -9, sharding, merging, progress and the label summary. The contract:

1. ``preset = get_preset(name)`` gives a fresh, unprepared instance. ``preset.options(user)``
   turns the user's options (CLI ``--option key=value`` or ``build_zoo(..., options=...)``) into
   the complete, JSON-serializable options dict, defaults filled in; unknown keys raise
   ``ValueError``. These complete options go into the manifest and are compared on resume and
   merge.
2. ``preset.prepare(cache_dir, seed, options)`` pretrains (or loads from ``cache_dir``) the base
   model and anything else every LoRA shares (datasets, scorers). Deterministic from
   ``(seed, options)``. ``cache_dir`` is the cache *root*; use
   :func:`cache_path` ``(cache_dir, self.name, seed, key_options)`` for this preset's entry and
   :func:`loralens.cache.cache_entry` to write and verify it, so that two processes (shards)
   never see a half-written cache and nothing changed since it was written is ever loaded.
3. ``preset.save_base(dir)`` writes the base model into ``OUT/base`` such that
   ``PeftModel.from_pretrained(<base loaded from dir>, OUT/adapters/<id>)`` works (for
   transformers: ``model.save_pretrained(dir)``). The builder hashes the ``*.safetensors`` files
   there (the manifest's ``base_hash``).
4. ``preset.sample_config(seed, index, ranks)`` returns the hyperparameters of LoRA ``index`` as a
   flat JSON-serializable dict. It must depend only on ``(seed, index, ranks, options)``, never on
   which other LoRAs are built or in which order: this is what makes ``--num`` extend a zoo and
   shards agree. Use :func:`index_rng` for its random numbers. Every key becomes a label column.
5. ``preset.train(configs, out_dirs, on_done=None)`` finetunes the LoRAs (any number at once;
   ``preset.group_size`` says how many the builder should hand over per call; a preset that
   finetunes several LoRAs at once calls that number its ``slots``), saves each with
   PEFT's ``save_pretrained`` into ``out_dirs[k]`` (an empty temp folder the builder made) and
   returns one labels dict per config, in the order of ``configs``. The labels dict holds the
   measured labels (the config's hyperparameters are added by the builder; keys may repeat
   them). A preset may call ``on_done(k, labels)`` as soon as LoRA ``k`` is saved, so the builder
   commits it at once (kill -9 then loses less work); LoRAs not reported by ``on_done`` are
   committed when ``train`` returns.
6. ``preset.label_columns(options)`` lists the columns of labels.csv after ``adapter`` (the
   hyperparameters first, then measured labels), in a fixed order, before anything is trained.
   ``preset.binary_columns(options)`` names the 0/1 columns (reported as rates in the summary);
   ``preset.hyperparameter_columns(options)`` the numeric columns that are finetuning
   hyperparameters (what a hyperparameters-only baseline may learn from). The builder writes
   all three lists into zoo.json (``label_columns``, ``binary_columns``,
   ``hyperparameter_columns``).
7. ``preset.base_labels()`` gives the measured labels of the base model itself (no LoRA), printed
   beside the zoo's spread; ``{}`` if not meaningful. ``preset.manifest_info()`` adds free-form
   facts to zoo.json (architecture, dataset sizes, timings).

A preset prints its own progress (pretraining, say) only through ``self.log``; the builder
sets it to the build's log, which is silent under ``quiet``.

Cached artefacts live in entries written and verified by :func:`loralens.cache.cache_entry`:
``.safetensors`` and ``.json`` files only, checked against the sha256 recorded when written;
load transformers/diffusers models from them with ``from_pretrained(..., use_safetensors=True)``.

Register a preset with :func:`register_preset` (a decorator on the class) in a module under
``loralens/zoo/presets/``; ``get_preset(name)`` imports those modules lazily (on first use), so
importing ``loralens`` stays cheap. Keep heavy imports (diffusers, transformers) inside methods
or at the top of the preset module, never in ``loralens/zoo/__init__.py``.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from loralens.errors import SettingsError
from loralens.zoo.progress import log_stderr

OnDone = Callable[[int, dict[str, Any]], None]


class Preset(ABC):
    """Base class of zoo presets; see the module docstring for the contract."""

    #: registry name, used on the CLI (``--preset``) and in zoo.json
    name: str = ""
    #: how many LoRAs the builder hands to one ``train`` call
    group_size: int = 1
    #: whether ``train`` runs on a CUDA GPU when one is visible (``zoo build --ray-gpus`` asks
    #: Ray for GPUs only for such presets)
    uses_cuda: bool = False
    #: default options; ``options()`` fills these in and rejects unknown keys
    default_options: Mapping[str, Any] = {}
    #: where the preset prints progress lines; the builder sets the build's log (silent if quiet)
    log: Callable[[str], None] = staticmethod(log_stderr)

    def options(self, user: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The complete options: defaults overridden by ``user`` (values coerced to the default's type)."""
        user = dict(user or {})
        unknown = sorted(set(user) - set(self.default_options))
        if unknown:
            known = ", ".join(sorted(self.default_options)) or "(none)"
            raise SettingsError(
                f"preset {self.name!r}: unknown option(s) {unknown}; known: {known}"
            )
        out = dict(self.default_options)
        for key, value in user.items():
            out[key] = coerce_like(self.default_options[key], value, key)
        return out

    @abstractmethod
    def prepare(self, cache_dir: Path, seed: int, options: Mapping[str, Any]) -> None:
        """Pretrain or load (from ``cache_dir``) the base model and shared data."""

    @abstractmethod
    def save_base(self, out_dir: Path) -> None:
        """Write the base model so that PEFT can load the adapters onto it."""

    @abstractmethod
    def sample_config(self, seed: int, index: int, ranks: Sequence[int]) -> dict[str, Any]:
        """Hyperparameters of LoRA ``index``; a function of (seed, index, ranks, options) only."""

    @abstractmethod
    def train(
        self,
        configs: Sequence[dict[str, Any]],
        out_dirs: Sequence[Path],
        on_done: OnDone | None = None,
    ) -> list[dict[str, Any]]:
        """Finetune, save with PEFT into ``out_dirs[k]``, return one labels dict per config."""

    @abstractmethod
    def label_columns(self, options: Mapping[str, Any]) -> list[str]:
        """Columns of labels.csv after ``adapter``: hyperparameters, then measured labels."""

    def binary_columns(self, options: Mapping[str, Any]) -> list[str]:
        """The 0/1 columns among ``label_columns`` (summarized as rates)."""
        return []

    def hyperparameter_columns(self, options: Mapping[str, Any]) -> list[str]:
        """The numeric columns among ``label_columns`` that are finetuning hyperparameters;
        by default those of :data:`HPARAM_COLUMNS` (the recipe of :func:`sample_lora_hparams`)."""
        return [c for c in self.label_columns(options) if c in HPARAM_COLUMNS]

    def base_labels(self) -> dict[str, Any]:
        """Labels measured on the base model alone (no LoRA), for the summary."""
        return {}

    def manifest_info(self) -> dict[str, Any]:
        """Free-form facts about the preset's base model and data, stored in zoo.json."""
        return {}


_REGISTRY: dict[str, type[Preset]] = {}
_IMPORT_ERRORS: dict[str, str] = {}


def register_preset(cls: type[Preset]) -> type[Preset]:
    """Class decorator: make ``cls`` available as ``get_preset(cls.name)``."""
    if not cls.name:
        raise SettingsError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtins() -> None:
    """Import every module of ``loralens.zoo.presets``; each registers its presets."""
    import importlib
    import pkgutil

    from loralens.zoo import presets

    for info in pkgutil.iter_modules(presets.__path__):
        module = f"{presets.__name__}.{info.name}"
        try:
            importlib.import_module(module)
        except ImportError as err:  # a preset whose optional dependency is missing
            _IMPORT_ERRORS[module] = f"{type(err).__name__}: {err}"


def preset_names() -> list[str]:
    """Names of all registered presets."""
    _load_builtins()
    return sorted(_REGISTRY)


def get_preset(name: str) -> Preset:
    """A fresh (unprepared) instance of the preset registered as ``name``."""
    _load_builtins()
    if name not in _REGISTRY:
        broken = "".join(f"; {m} failed to import ({e})" for m, e in _IMPORT_ERRORS.items())
        raise SettingsError(
            f"unknown preset {name!r}; available: {', '.join(sorted(_REGISTRY))}{broken}"
        )
    return _REGISTRY[name]()


# ---------------------------------------------------------------------------------------------
# helpers for presets


def coerce_like(default: Any, value: Any, key: str = "") -> Any:
    """Coerce ``value`` (often a CLI string) to the type of ``default``."""
    if default is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, str):
            low = value.strip().lower()
            if low in {"1", "true", "yes", "on"}:
                return True
            if low in {"0", "false", "no", "off"}:
                return False
            raise SettingsError(f"option {key!r}: expected a boolean, got {value!r}")
        return bool(value)
    if isinstance(value, type(default)) and not isinstance(value, bool):
        return value
    try:
        if isinstance(default, int):
            return int(value)
        if isinstance(default, float):
            return float(value)
        if isinstance(default, str):
            return str(value)
        if isinstance(default, (list, tuple)) and isinstance(value, str):
            return [
                coerce_like(default[0], v, key) if default else v for v in value.split(",") if v
            ]
    except (TypeError, ValueError) as err:
        raise SettingsError(
            f"option {key!r}: cannot read {value!r} as {type(default).__name__}"
        ) from err
    return value


def stable_hash(obj: Any, n: int = 12) -> str:
    """A short hex hash of a JSON-serializable object, stable across runs and machines."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def index_rng(seed: int, index: int, salt: str = "") -> random.Random:
    """A ``random.Random`` that depends only on (seed, index, salt): use it in ``sample_config``."""
    digest = hashlib.sha256(f"{salt}|{seed}|{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


#: The label columns :func:`sample_lora_hparams` fills, in order.
HPARAM_COLUMNS = (
    "lr",
    "weight_decay",
    "epochs",
    "batch_size",
    "lora_dropout",
    "init_seed",
    "rank",
    "lora_alpha",
)


def sample_lora_hparams(
    rng: random.Random,
    opts: Mapping[str, Any],
    ranks: Sequence[int],
    epochs: Sequence[int],
    batch_sizes: Sequence[int],
) -> dict[str, Any]:
    """The paper's random finetuning recipe: lr log-uniform in [opts lr_min, lr_max], weight
    decay log-uniform in [1e-4, 1e-1], epochs, batch size, lora_dropout in [0, 0.1], init seed,
    rank from ``ranks``; lora_alpha = 2 * rank."""
    lo, hi = math.log10(opts["lr_min"]), math.log10(opts["lr_max"])
    cfg: dict[str, Any] = {
        "lr": 10 ** rng.uniform(lo, hi),
        "weight_decay": 10 ** rng.uniform(-4, -1),
        "epochs": rng.choice(epochs),
        "batch_size": rng.choice(batch_sizes),
        "lora_dropout": rng.uniform(0.0, 0.1),
        "init_seed": rng.randrange(2**31),
        "rank": rng.choice(sorted(ranks)),
    }
    cfg["lora_alpha"] = 2 * cfg["rank"]
    return cfg


def derive_seed(*parts: Any) -> int:
    """A 31-bit seed derived from any parts (for torch.Generator.manual_seed and friends)."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def cache_path(cache_dir: Path | str, name: str, seed: int, key_options: Mapping[str, Any]) -> Path:
    """The cache entry of preset ``name`` for (seed, options that shape the cached artefacts)."""
    return Path(cache_dir) / f"{name}-s{seed}-{stable_hash(dict(key_options))}"
