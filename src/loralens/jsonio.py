"""Strict JSON out of numbers that may be NaN, inf or numpy types: what every file and every
``--json`` output of loralens is written through (NaN/inf become null, never bare NaN)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np


def json_safe(v: Any) -> Any:
    """``v`` with NaN/inf floats as None, numpy scalars and arrays as Python numbers and lists
    (dicts, lists and tuples recursed): what ``json.dumps(..., allow_nan=False)`` takes."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    if isinstance(v, (np.floating, np.integer, np.bool_, np.ndarray)):
        return json_safe(v.tolist())
    return v


def dumps(value: Any) -> str:
    """``value`` as strict, indented JSON."""
    return json.dumps(json_safe(value), indent=2, allow_nan=False)


def write_json(path: str | os.PathLike, value: Any) -> None:
    """``value`` as strict JSON (NaN/inf as null) in ``path``."""
    Path(path).write_text(dumps(value) + "\n")
