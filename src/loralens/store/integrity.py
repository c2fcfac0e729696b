"""What a store must satisfy to be read: the checks run when it is opened and in full.

Always, on open (cheap): ``index.parquet`` parses and has the store's columns with sound types,
every shard it points at is present with a sound header that agrees with ``store.json``
(version, layers, dtype), and every row lies inside its shard's tensor with the length its
ranks need. Where ``store.json`` records checksums (stores written since they were): each
file's size and ``index.parquet``'s sha256 on open, each shard's sha256 before it is read.
Every failure is a :class:`StoreError` naming the file.
"""

from __future__ import annotations

import hashlib
import io
import json
import mmap
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from loralens.atomic import file_sha256, open_regular
from loralens.store.format import (
    INDEX,
    INFO,
    Shard,
    StoreError,
    checksum_of,
    info_layers,
    is_rank_major,
    os_message,
)

#: Index columns a store cannot be read without.
REQUIRED_COLUMNS = ("id", "_shard", "_key", "_row", "_ranks")
_SCAN_BYTES = 64 * 2**20


def checksum(data: bytes | mmap.mmap) -> dict[str, Any]:
    """The {bytes, sha256} checksum entry of ``data`` (bytes or a mapped file)."""
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def file_checksum(path: Path) -> dict[str, Any]:
    """The {bytes, sha256} checksum entry of the file at ``path``, read in chunks."""
    size, digest = file_sha256(path)
    return {"bytes": size, "sha256": digest}


def check_checksum(
    path: Path,
    recorded: Mapping[str, Any] | None,
    *,
    data: bytes | mmap.mmap | None = None,
    size_only: bool = False,
) -> None:
    """Compare the file at ``path`` (or its contents ``data``) with its checksum entry: its
    size, then (unless ``size_only``) its sha256; a :class:`StoreError` naming it otherwise."""
    if recorded is None:
        return
    size = len(data) if data is not None else os.stat(path).st_size
    if size != recorded["bytes"]:
        raise StoreError(
            f"{path}: {size} bytes, but {recorded['bytes']} were written "
            "(truncated or changed since; see `loralens store verify`)"
        )
    if size_only:
        return
    got = checksum(data) if data is not None else file_checksum(path)
    if got["sha256"] != recorded["sha256"]:
        raise StoreError(
            f"{path}: contents differ from the sha256 recorded in {INFO} when it was written "
            "(corrupted or edited since; see `loralens store verify`)"
        )


def read_index(
    path: Path, info: Mapping[str, Any], *, check_hash: bool, dir_fd: int | None = None
) -> pd.DataFrame:
    """``index.parquet`` of the store at ``path`` (opened as the directory ``dir_fd`` if
    given), compared with its recorded checksum first when ``check_hash`` (the file is small:
    one read serves both)."""
    index_path = path / INDEX
    try:
        with open_regular(INDEX if dir_fd is not None else index_path, dir_fd=dir_fd) as f:
            raw = f.read()
    except OSError as e:
        raise StoreError(os_message(index_path, e)) from None
    if check_hash:
        check_checksum(index_path, checksum_of(info, INDEX), data=raw)
    try:
        index = pd.read_parquet(io.BytesIO(raw))
    except Exception as e:  # any failure to parse this file is a malformed store
        raise StoreError(f"{index_path}: not a readable parquet index ({e})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in index.columns]
    if missing:
        raise StoreError(f"{index_path}: no column(s) {missing}")
    return index.reset_index(drop=True)


@dataclass
class Rows:
    """Where every LoRA of a store lies: (N, L) ranks, and shard number, tensor, row in it."""

    ranks: np.ndarray
    shard: np.ndarray
    key: np.ndarray
    row: np.ndarray


def index_rows(index_path: Path, index: pd.DataFrame, num_layers: int) -> Rows:
    """The index's placement columns as arrays, checked for types and values."""
    n = len(index)
    out = []
    for c in ("_shard", "_row"):
        col = index[c]
        if not pd.api.types.is_integer_dtype(col) or (n and int(col.min()) < 0):
            raise StoreError(f"{index_path}: column {c} must hold non-negative integers")
        out.append(col.to_numpy(np.int64))
    ranks = [np.asarray(r) for r in index["_ranks"]]
    try:
        ok = all(r.shape == (num_layers,) and r.dtype.kind in "iu" for r in ranks)
        arr = np.stack(ranks).astype(np.int64) if n else np.zeros((0, num_layers), np.int64)
    except (TypeError, ValueError):
        ok = False
    if not ok or (n and arr.min(initial=0) < 0):
        bad = next((i for i, r in enumerate(ranks) if np.shape(r) != (num_layers,)), 0)
        raise StoreError(
            f"{index_path}: column _ranks must hold {num_layers} non-negative integers per row "
            f"(row {bad} holds {index['_ranks'].iloc[bad]!r})"
        )
    ids = index["id"].astype(str)
    if ids.duplicated().any():
        raise StoreError(f"{index_path}: id {ids[ids.duplicated()].iloc[0]!r} appears twice")
    if "rank" in index.columns and n and num_layers:
        wrong = np.flatnonzero(index["rank"].to_numpy() != arr.max(axis=1))
        if len(wrong):
            raise StoreError(
                f"{index_path}: row {wrong[0]} (id {ids.iloc[wrong[0]]!r}): rank "
                f"{index['rank'].iloc[wrong[0]]} is not its largest layer rank (_ranks)"
            )
    return Rows(arr, out[0], index["_key"].astype(str).to_numpy(), out[1])


def check_shard_header(path: Path, info: Mapping[str, Any], header: Shard) -> None:
    """A shard's header must agree with ``store.json``: layer names, dtype, and row layout
    version (which decides how rows are read; its change is caught here)."""
    info_path, name = path / INFO, header.path.name
    names, _ = info_layers(info)
    meta = header.metadata
    if "layers" in meta and str(meta["layers"]) != json.dumps(list(names)):
        raise StoreError(f"{info_path}: its layer names differ from those of {name}")
    dtype = np.dtype(info["dtype"])
    for tname, (tdtype, _, _) in header.tensors.items():
        if tdtype != dtype:
            raise StoreError(f"{info_path}: says {dtype} but tensor {tname} of {name} is {tdtype}")
    written = str(meta.get("version", ""))
    store = str(info.get("version", 1))
    # a checksummed shard was written by this code, which records the store's own version;
    # earlier code recorded "2" for shards it appended to version-1 stores, so there only a
    # version-1 shard in a version-2 store is a contradiction
    mine = checksum_of(info, name) is not None
    if written and written != store and (mine or (written == "1" and is_rank_major(info))):
        raise StoreError(
            f"{info_path}: says version {store} but {name} was written as version {written} "
            "(rows would be read in the wrong layout; store.json changed?)"
        )


def check_rows(
    index_path: Path,
    rows: Rows,
    ids: pd.Series,
    headers: Mapping[int, Shard],
    shapes: Sequence[tuple[int, int]],
) -> None:
    """Every row must point at a row of a 2-D tensor of its shard whose length its ranks need,
    and no two rows at the same one."""
    if not len(ids):
        return
    need = rows.ranks @ np.asarray([o + i for o, i in shapes], dtype=np.int64).reshape(-1)
    place = pd.DataFrame({"s": rows.shard, "k": rows.key, "r": rows.row})
    twice = np.flatnonzero(place.duplicated().to_numpy())
    if len(twice):
        raise StoreError(f"{index_path}: row {twice[0]} points at the data of an earlier row")
    for (s, k), pos in place.groupby(["s", "k"]).indices.items():
        header = headers[int(s)]
        entry = header.tensors.get(k)
        shape = entry[1] if entry is not None else None
        where = f"{index_path}: row {pos[0]} (id {ids.iloc[pos[0]]!r})"
        if shape is None or len(shape) != 2:
            raise StoreError(f"{where} points at tensor {k}, not a 2-D tensor of {header.path}")
        beyond = pos[rows.row[pos] >= shape[0]]
        if len(beyond):
            raise StoreError(
                f"{index_path}: row {beyond[0]} (id {ids.iloc[beyond[0]]!r}): _row "
                f"{rows.row[beyond[0]]} is beyond the {shape[0]} rows of {k} in {header.path.name}"
            )
        wrong = pos[need[pos] != shape[1]]
        if len(wrong):
            raise StoreError(
                f"{index_path}: row {wrong[0]} (id {ids.iloc[wrong[0]]!r}): _ranks "
                f"{rows.ranks[wrong[0]].tolist()} need {need[wrong[0]]} values, but rows of "
                f"{k} in {header.path.name} hold {shape[1]}"
            )


def first_nonfinite(arr: np.ndarray) -> int | None:
    """The first row of a 2-D array that holds NaN or inf (None if none), read in chunks."""
    if arr.size == 0:
        return None
    step = max(1, _SCAN_BYTES // max(1, arr.shape[1] * arr.itemsize))
    for start in range(0, arr.shape[0], step):
        ok = np.isfinite(arr[start : start + step]).all(axis=1)
        if not ok.all():
            return start + int(np.argmin(ok))
    return None


def shard_numbers(path: Path) -> list[int]:
    """Numbers of the ``weights-NNNNN.safetensors`` files in a store directory."""
    out = []
    for name in os.listdir(path):
        stem = name[len("weights-") : -len(".safetensors")]
        if name.startswith("weights-") and name.endswith(".safetensors") and stem.isdigit():
            out.append(int(stem))
    return sorted(out)
