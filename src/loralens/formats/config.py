"""PEFT adapter configs (``adapter_config.json``, or diffusers' per-component copies in a
safetensors header): reading, checking every value loralens uses, and each module's scale.

Every value that reaches a number loralens computes is checked here, so a config can only give
finite, positive scales and integer ranks: ``r`` and ``rank_pattern`` values are positive
integers (PEFT builds layers of that width), ``lora_alpha`` and ``alpha_pattern`` values are
positive finite numbers, flags are booleans, and pattern keys are usable
(:mod:`loralens.formats.patterns`). JSON's non-standard NaN/Infinity and numbers too large for a
float are refused wherever they appear.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from loralens.formats.errors import LoRAFormatError
from loralens.formats.patterns import Budget, PatternTable, check_pattern_key
from loralens.formats.tensor_file import open_regular

#: Largest adapter_config.json read (real ones are kilobytes; a rank_pattern for 10k layers ~1 MB).
MAX_CONFIG_BYTES = 64 * 2**20
_FLAGS = ("use_rslora", "fan_in_fan_out", "use_dora", "lora_bias")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is too large")
    return value


def parse_json(text: str | bytes, path: Path, what: str = "JSON") -> Any:
    """``json.loads`` that raises ``LoRAFormatError`` (naming ``path``) for anything it cannot read
    exactly: invalid or too deeply nested JSON, NaN/Infinity, numbers beyond float range."""
    try:
        return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError as e:
        raise LoRAFormatError(path, f"invalid {what}: nested too deeply") from e
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise LoRAFormatError(path, f"invalid {what}: {e}") from e


def read_config(path: Path) -> dict[str, Any]:
    """Read and check an adapter_config.json (a regular file of at most MAX_CONFIG_BYTES)."""
    return check_config(read_json_config(path), path)


def read_json_config(path: Path) -> Any:
    """The JSON value in a config file (a regular file of at most MAX_CONFIG_BYTES), unchecked."""
    with open_regular(path) as f:
        data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise LoRAFormatError(path, f"over {MAX_CONFIG_BYTES >> 20} MiB: not an adapter config")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LoRAFormatError(path, f"invalid JSON: not UTF-8 ({e})") from e
    return parse_json(text, path)


def _number(v: Any, what: str, path: Path, *, integer: bool) -> None:
    kind = "a positive integer" if integer else "a positive number"
    ok = not isinstance(v, bool) and isinstance(v, int if integer else (int, float))
    if ok:
        try:
            ok = math.isfinite(float(v)) and v > 0
        except OverflowError:
            ok = False
    if not ok:
        raise LoRAFormatError(path, f"{what} must be {kind}, got {str(v)[:80]}")


def check_config(cfg: Any, path: Path) -> dict[str, Any]:
    """The config with PEFT's defaults filled in (r 8, lora_alpha 8), every used value checked."""
    if not isinstance(cfg, dict):
        raise LoRAFormatError(path, f"expected a JSON object, got {type(cfg).__name__}")
    peft_type = cfg.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise LoRAFormatError(
            path,
            f"peft_type is {str(peft_type)[:80]!r}: loralens reads LoRA adapters "
            "(peft_type LORA) only",
        )
    cfg = dict(cfg)
    cfg.setdefault("r", 8)  # PEFT's LoraConfig defaults
    cfg.setdefault("lora_alpha", 8)
    _number(cfg["r"], "r", path, integer=True)
    _number(cfg["lora_alpha"], "lora_alpha", path, integer=False)
    for key in ("rank_pattern", "alpha_pattern"):
        v = cfg.get(key) or {}
        if not isinstance(v, dict):
            raise LoRAFormatError(
                path, f"{key} must be an object (module -> value), got {str(v)[:80]}"
            )
        for k, x in v.items():
            _number(x, f"{key}[{k[:200]!r}]", path, integer=key == "rank_pattern")
            check_pattern_key(k, key, path)
        cfg[key] = v
    for key in _FLAGS:
        if cfg.get(key) is not None and not isinstance(cfg[key], bool):
            raise LoRAFormatError(path, f"{key} must be true or false, got {str(cfg[key])[:80]}")
    to_save = cfg.get("modules_to_save")
    if to_save is not None and not (
        isinstance(to_save, list) and all(isinstance(m, str) for m in to_save)
    ):
        raise LoRAFormatError(path, f"modules_to_save must be a list of names, got {to_save!r:.80}")
    base = cfg.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        raise LoRAFormatError(path, f"base_model_name_or_path must be a string, got {base!r:.80}")
    return cfg


class ConfigScale:
    """(scale, r) PEFT uses for each module of one checked config, patterns in bounded time."""

    def __init__(self, cfg: dict[str, Any], path: Path) -> None:
        budget = Budget()
        self.cfg = cfg
        self.ranks = PatternTable(cfg.get("rank_pattern") or {}, "rank_pattern", path, budget)
        self.alphas = PatternTable(cfg.get("alpha_pattern") or {}, "alpha_pattern", path, budget)

    def __call__(self, name: str) -> tuple[float, int]:
        """``name`` is the module's path inside the base model."""
        r = self.ranks.get(name, self.cfg["r"])
        alpha = self.alphas.get(name, self.cfg["lora_alpha"])
        scale = alpha / math.sqrt(r) if self.cfg.get("use_rslora") else alpha / r
        return float(scale), int(r)
