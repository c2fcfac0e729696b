"""A run directory read as untrusted input: ``config.json`` is checked field by field and the
checkpoint's safetensors header is compared with the model that config describes (built on the
meta device) before a single weight is allocated. Every problem is one :class:`RunError` line
naming the file; checkpoints are safetensors only (nothing is unpickled).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loralens.errors import RunError, RunNotFoundError
from loralens.jsonio import read_json_object
from loralens.learn.fitting.tasks import CLASSIFICATION, REGRESSION, Task
from loralens.lora import LayerSpec
from loralens.models.base import MAX_WIDTH
from loralens.models.registry import MODEL_NAMES, check_hparams, saved_key, state_shapes

CHECKPOINT = "model.safetensors"
CONFIG = "config.json"
METRICS = "metrics.json"
FORMAT = "loralens-run"
VERSION = 1

#: Bounds on what a config may describe (far above any real run).
MAX_CONFIG_BYTES = 16 * 2**20
MAX_LAYERS = 100_000
MAX_DIM = 2**24
MAX_OUT = 100_000


@dataclass
class RunConfig:
    """What ``config.json`` says, checked: the model to rebuild and the task."""

    name: str
    spec: LayerSpec
    out_dim: int
    hparams: dict[str, Any]
    task: Task
    raw: dict[str, Any]


def _regular_file(path: Path) -> None:
    if not path.exists():
        raise RunNotFoundError(f"{path.parent} is not a loralens run (no {path.name})")
    if not path.is_file():  # a FIFO or a device would block or never end
        raise RunError(f"{path}: not a regular file")


def _is_int(v: Any, lo: int, hi: int) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and lo <= v <= hi


def read_config(path: Path) -> RunConfig:
    """``config.json`` of a run, parsed and checked (types, ranges, known model and
    hyperparameters, task scaling); :class:`RunError` naming ``path`` otherwise."""

    def bad(what: str) -> RunError:
        return RunError(f"{path}: {what}")

    _regular_file(path)
    cfg = read_json_object(path, error=RunError, max_bytes=MAX_CONFIG_BYTES)
    if cfg.get("format", FORMAT) != FORMAT:
        raise bad(f"format is {cfg.get('format')!r:.60}, not {FORMAT!r}")
    if cfg.get("version", VERSION) != VERSION:
        raise bad(f"version {cfg.get('version')!r:.60}; this loralens reads version {VERSION}")
    model, task = cfg.get("model"), cfg.get("task")
    if not isinstance(model, dict) or not isinstance(task, dict):
        raise bad('needs the objects "model" and "task"')
    name = model.get("name")
    if name not in MODEL_NAMES:
        raise bad(f"unknown model {name!r:.60}; this loralens has {', '.join(MODEL_NAMES)}")
    out_dim = model.get("out_dim")
    if not _is_int(out_dim, 1, MAX_OUT):
        raise bad(f"model.out_dim must be an integer in [1, {MAX_OUT}], got {out_dim!r:.60}")
    spec = _spec(model.get("spec"), bad)
    hparams = model.get("hparams")
    try:
        check_hparams(name, hparams)
    except ValueError as e:
        raise bad(str(e)) from None
    return RunConfig(name, spec, int(out_dim), hparams, _task(task, int(out_dim), bad), cfg)


def _spec(d: Any, bad: Any) -> LayerSpec:
    if not isinstance(d, dict) or not all(
        isinstance(d.get(k), list) for k in ("names", "shapes", "ranks")
    ):
        raise bad("model.spec needs the lists names, shapes and ranks")
    names, shapes, ranks = d["names"], d["shapes"], d["ranks"]
    n = len(names)
    if not 1 <= n <= MAX_LAYERS or len(shapes) != n or len(ranks) != n:
        raise bad(f"model.spec: {n} names, {len(shapes)} shapes, {len(ranks)} ranks")
    if not all(isinstance(x, str) for x in names) or len(set(names)) != n:
        raise bad("model.spec.names must be distinct strings")
    if not all(
        isinstance(s, list) and len(s) == 2 and all(_is_int(x, 1, MAX_DIM) for x in s)
        for s in shapes
    ):
        raise bad(f"model.spec.shapes must be [out, in] pairs of integers in [1, {MAX_DIM}]")
    if not all(_is_int(r, 0, MAX_WIDTH) for r in ranks):
        raise bad(f"model.spec.ranks must be integers in [0, {MAX_WIDTH}]")
    return LayerSpec.from_dict(d)


def _task(d: dict[str, Any], out_dim: int, bad: Any) -> Task:
    if d.get("kind") not in (REGRESSION, CLASSIFICATION):
        raise bad(
            f"task.kind must be {REGRESSION!r} or {CLASSIFICATION!r}, got {d.get('kind')!r:.60}"
        )
    targets, mean, std = d.get("targets"), d.get("mean"), d.get("std")
    if not isinstance(targets, list) or len(targets) != out_dim:
        raise bad(f"task.targets must list {out_dim} column name(s) (model.out_dim)")
    if not all(isinstance(t, str) for t in targets):
        raise bad("task.targets must be strings")
    for key, values, lo in (("mean", mean, -math.inf), ("std", std, 0.0)):
        if not (
            isinstance(values, list)
            and len(values) == out_dim
            and all(_finite(v) and v > lo for v in values)
        ):
            limit = "positive" if lo == 0 else "finite"
            raise bad(f"task.{key} must list {out_dim} {limit} number(s)")
    low, high = d.get("low", []), d.get("high", [])
    if low or high:  # the clipping range, absent in runs saved before it
        pairs = list(zip(low, high)) if isinstance(low, list) and isinstance(high, list) else []
        if not (
            len(pairs) == out_dim == len(low) == len(high)
            and all(_finite(a) and _finite(b) and a <= b for a, b in pairs)
        ):
            raise bad(f"task.low and task.high must list {out_dim} finite number(s), low <= high")
    return Task.from_dict(d)


def _finite(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def load_checkpoint(path: Path, config: RunConfig) -> dict[str, torch.Tensor]:
    """The state dict in ``path``, once its safetensors header (read alone) matches, name by name
    and shape by shape, the model ``config`` describes; refused otherwise with the parameter."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    _regular_file(path)
    try:
        want = state_shapes(config.name, config.spec, config.out_dim, config.hparams)
    except ValueError as e:  # e.g. ranks for another number of layers, a model too large
        raise RunError(f"{path.parent / CONFIG}: {e}") from None
    try:
        with safe_open(path, framework="pt") as f:  # the header only: nothing is read yet
            have = {
                saved_key(config.name, k): tuple(f.get_slice(k).get_shape())
                for k in f.keys()  # noqa: SIM118
            }
    except (SafetensorError, OSError, ValueError) as e:
        raise RunError(f"{path}: not a readable safetensors file ({e})") from None
    missing = [k for k in want if k not in have]
    extra = [k for k in have if k not in want]
    if missing or extra:
        what = f"lacks {missing[:3]}" if missing else f"has unexpected {extra[:3]}"
        raise RunError(
            f"{path}: the checkpoint {what} (parameters of the {config.name} model in {CONFIG})"
        )
    for k, t in want.items():
        if have[k] != tuple(t.shape):
            raise RunError(
                f"{path}: parameter {k!r} has shape {list(have[k])}, the {config.name} model in "
                f"{CONFIG} needs {list(t.shape)}"
            )
    try:
        state = {saved_key(config.name, k): t for k, t in load_file(path).items()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise RunError(f"{path}: {e}") from None
    for k, t in state.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise RunError(f"{path}: parameter {k!r} holds NaN/inf values")
    return state


__all__ = [
    "CHECKPOINT",
    "CONFIG",
    "METRICS",
    "RunConfig",
    "load_checkpoint",
    "read_config",
]
