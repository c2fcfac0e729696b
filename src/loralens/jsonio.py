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


def dumps(value: Any, *, compact: bool = False) -> str:
    """``value`` as strict JSON, indented (or ``compact``: no spaces, for large records)."""
    layout: dict[str, Any] = {"separators": (",", ":")} if compact else {"indent": 2}
    return json.dumps(json_safe(value), allow_nan=False, **layout)


def write_json(path: str | os.PathLike, value: Any) -> None:
    """``value`` as strict JSON (NaN/inf as null) in ``path``, replacing the file there whole
    (:func:`loralens.atomic.write_file_atomic`: a link at ``path`` is replaced, not followed)."""
    from loralens.atomic import write_file_atomic

    write_file_atomic(path, dumps(value) + "\n", replace=True)


#: Largest JSON sidecar read (a run's config, a calibration, an index manifest): far above any
#: real one, so a link to /dev/zero or a planted giant file is refused, not read into memory.
MAX_JSON_BYTES = 16 * 2**20


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def read_json_object(
    path: str | os.PathLike,
    *,
    error: type[Exception] | None = None,
    max_bytes: int = MAX_JSON_BYTES,
    max_containers: int | None = None,
    dir_fd: int | None = None,
    follow: bool = True,
) -> dict[str, Any]:
    """A JSON object from ``path``, read as untrusted input: a regular file (never a pipe or a
    device, so nothing blocks; with ``follow=False`` never a link) of at most ``max_bytes``,
    strict JSON (no NaN/Infinity, no recursion blow-up), with at most ``max_containers``
    arrays and objects when given (counted before parsing: each costs ~60 bytes of memory for
    its 2 of text); anything else is ``error`` (default ``InputError``) naming ``path``. With
    ``dir_fd``, its file name is opened in that folder."""
    from loralens.atomic import SpecialFileError, open_regular
    from loralens.errors import InputError

    error = error or InputError
    name = Path(path).name if dir_fd is not None else path
    try:
        with open_regular(name, dir_fd=dir_fd, follow=follow) as f:
            data = f.read(max_bytes + 1)
    except SpecialFileError as e:
        raise error(f"{path}: {e.kind}, not a regular file") from None
    except FileNotFoundError:
        raise error(f"{path}: no such file") from None
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror or e})") from None
    if len(data) > max_bytes:
        raise error(f"{path}: larger than {max_bytes // 2**20} MiB; not a loralens file")
    if max_containers is not None and data.count(b"[") + data.count(b"{") > max_containers:
        raise error(f"{path}: more than {max_containers} arrays and objects; not a loralens file")
    try:
        obj = json.loads(data, parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError too
        raise error(f"{path}: not valid JSON ({str(e)[:200] or type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise error(f"{path}: not a JSON object")
    return obj
