"""A labels CSV: one row per adapter, named in its ``adapter`` column, then label columns.

The rules, each enforced with an error naming the file: the adapters are named by the column
called ``adapter``, or by the first column when none is; a name is a relative path inside the
adapters folder, made canonical (``000000``, ``./000000`` and ``000000/`` are one adapter) and
refused when absolute or holding ``..``; each adapter is listed once; two labels that would be
stored under one column name (``rank`` beside ``rank_label``) are refused.
"""

from __future__ import annotations

import io
import os
import posixpath
from pathlib import PurePosixPath
from typing import Any

import pandas as pd

from loralens.atomic import open_regular
from loralens.store.format import StoreError, check_label_names

#: The column that names the adapters (else the first column does).
ADAPTER_COLUMN = "adapter"


def adapter_name(name: Any) -> str:
    """The canonical form of an adapter's name: a relative path inside the adapters folder,
    without ``./`` or a trailing ``/``. Empty, absolute and ``..`` names are refused (nothing
    outside the adapters folder is ever read)."""
    text = str(name)
    if not text.strip() or "\0" in text:
        raise StoreError(f"adapter name {text!r} is empty or not a file name")
    path = PurePosixPath(text)
    if path.is_absolute() or ".." in path.parts:
        raise StoreError(
            f"adapter name {text!r} points outside the adapters folder (absolute or '..'); "
            "names are paths inside the folder"
        )
    return posixpath.normpath(text)


def labels_frame(frame: pd.DataFrame, where: str) -> pd.DataFrame:
    """``frame`` with its adapter column first, named ``adapter``, holding canonical names,
    each adapter once (``where`` names the source in errors)."""
    if len(frame.columns) == 0 or frame.empty:
        raise StoreError(f"{where}: no rows (expected one row per adapter)")
    col = ADAPTER_COLUMN if ADAPTER_COLUMN in frame.columns else frame.columns[0]
    frame = frame.rename(columns={col: ADAPTER_COLUMN})
    frame = frame[[ADAPTER_COLUMN, *(c for c in frame.columns if c != ADAPTER_COLUMN)]]
    names = []
    for i, raw in enumerate(frame[ADAPTER_COLUMN].tolist()):
        if raw is None or (isinstance(raw, float) and raw != raw) or str(raw) == "":
            raise StoreError(f"{where}: row {i + 1} has no adapter name")
        try:
            names.append(adapter_name(raw))
        except StoreError as e:
            raise StoreError(f"{where}: row {i + 1}: {e}") from None
    spellings: dict[str, list[str]] = {}
    for raw, name in zip(frame[ADAPTER_COLUMN].tolist(), names):
        spellings.setdefault(name, []).append(str(raw))
    twice = {name: s for name, s in spellings.items() if len(s) > 1}
    if twice:
        name, s = next(iter(twice.items()))
        raise StoreError(
            f"{where}: adapters listed twice ({len(twice)}), e.g. {', '.join(map(repr, s))} "
            f"all name {name!r}; list each adapter once"
        )
    try:
        check_label_names([str(c) for c in frame.columns[1:]])
    except StoreError as e:
        raise StoreError(f"{where}: {e}") from None
    frame = frame.copy()
    frame[ADAPTER_COLUMN] = names
    return frame.reset_index(drop=True)


def read_labels(path: str | os.PathLike) -> pd.DataFrame:
    """A labels CSV (see the module's rules) as a frame whose first column is ``adapter``."""
    try:
        with open_regular(path) as f:
            raw = f.read()
    except OSError as e:
        raise StoreError(str(e)) from None  # names the file and why (missing, a pipe...)
    if not raw.strip():
        raise StoreError(
            f"{path}: empty (expected a header line such as 'adapter,<label>,...' and one "
            "row per adapter)"
        )
    try:
        header = pd.read_csv(io.BytesIO(raw), nrows=0).columns
        col = ADAPTER_COLUMN if ADAPTER_COLUMN in header else header[0]
        frame = pd.read_csv(io.BytesIO(raw), converters={col: str})  # "000017" stays a name
    except (ValueError, IndexError, pd.errors.ParserError) as e:
        raise StoreError(f"{path}: not a readable CSV ({e})") from None
    return labels_frame(frame, str(path))
