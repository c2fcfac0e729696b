"""Writing a packed store atomically: a new store, or new LoRAs appended to an existing one.

A new store is written into a temporary sibling directory, fsynced and renamed into place; an
append writes new shards under temporary names, renames them, then replaces ``index.parquet``
(the commit point) and ``store.json`` by rename. A failed write leaves the store as it was (at
most an unreferenced shard, which readers ignore).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from loralens.atomic import fsync_dir, write_file_atomic
from loralens.lora import LayerSpec, LoRA, spec_of
from loralens.store.format import (
    DEFAULT_SHARD_BYTES,
    FORMAT,
    INDEX,
    INFO,
    INTERNAL_COLUMNS,
    NP_DTYPES,
    RESERVED,
    ROW_LAYOUT,
    SHARD_GLOB,
    SHARD_PATTERN,
    VERSION,
    StoreError,
    StoreExistsError,
    flatten_row,
    info_layers,
    is_rank_major,
    label_column,
    read_info,
    shapes_key,
    write_safetensors,
)
from loralens.store.reader import LoRAStore


@dataclass
class _Existing:
    """The store an append extends: its ``store.json``, its index, its next shard number."""

    info: dict[str, Any]
    index: pd.DataFrame
    next_shard: int


class StoreWriter:
    """Write LoRAs into a new store (:meth:`create`) or append to one (:meth:`append_to`).

    >>> with StoreWriter.create("out.store", dtype="float16", made_by={"command": "pack"}) as w:
    ...     w.add(lora, id="a1", source="adapters/a1", labels={"eval_loss": 2.1})  # doctest: +SKIP

    Nothing is visible at ``path`` until the ``with`` block ends without an error; on an error
    every temporary file is removed and an existing store is left untouched. ``made_by`` is
    recorded in ``store.json``'s history entry for this write and may be extended until then.
    """

    def __init__(
        self,
        path: Path,
        workdir: Path,
        existing: _Existing | None,
        *,
        dtype: str,
        overwrite: bool,
        shard_bytes: int,
        made_by: Mapping[str, Any] | None,
    ):
        """Use :meth:`create`, :meth:`append_to` or :meth:`open`; they check ``path`` first."""
        self.path = path
        self.dtype = dtype
        self.overwrite = overwrite
        self.shard_bytes = int(shard_bytes)
        self.made_by = dict(made_by or {})
        self._workdir = workdir
        self._existing = existing
        self._np_dtype = NP_DTYPES[dtype]
        self._names: list[str] | None = None
        self._shapes: list[tuple[int, int]] | None = None
        self._rank_major = True
        self._next_shard = 0
        self._ids: set[str] = set()
        if existing is not None:
            self._names, self._shapes = info_layers(existing.info)
            self._rank_major = is_rank_major(existing.info)
            self._next_shard = existing.next_shard
            self._ids = set(existing.index["id"].astype(str))
        self._lock_fd: int | None = None
        self._records: list[dict[str, Any]] = []
        self._buffer: dict[tuple[int, ...], list[np.ndarray]] = {}
        self._buffer_bytes = 0
        self._written_shards: list[tuple[Path, Path]] = []  # (temp path, final path)

    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        *,
        dtype: str = "float32",
        overwrite: bool = False,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        made_by: Mapping[str, Any] | None = None,
    ) -> StoreWriter:
        """A writer of a new store at ``path`` (an existing one is replaced only with ``overwrite``)."""
        path = Path(path)
        if path.exists() and not overwrite:
            if (path / INFO).exists():
                raise StoreExistsError(f"{path} is already a store (use --append or --overwrite)")
            if not path.is_dir() or any(path.iterdir()):
                raise StoreExistsError(f"{path} exists and is not an empty directory")
        if dtype not in NP_DTYPES:
            raise StoreError(f"dtype must be one of {sorted(NP_DTYPES)}, got {dtype!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(workdir, 0o777 & ~umask)  # mkdtemp makes it private (0700)
        return cls(
            path,
            workdir,
            None,
            dtype=dtype,
            overwrite=overwrite,
            shard_bytes=shard_bytes,
            made_by=made_by,
        )

    @classmethod
    def append_to(
        cls,
        path: str | os.PathLike,
        *,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        made_by: Mapping[str, Any] | None = None,
    ) -> StoreWriter:
        """A writer that adds LoRAs to the store at ``path``, in its own dtype and row layout."""
        path = Path(path)
        info = read_info(path)
        shards = [int(p.name[len("weights-") :].split(".")[0]) for p in path.glob(SHARD_GLOB)]
        existing = _Existing(info, pd.read_parquet(path / INDEX), max(shards, default=-1) + 1)
        return cls(
            path,
            path,
            existing,
            dtype=info["dtype"],
            overwrite=False,
            shard_bytes=shard_bytes,
            made_by=made_by,
        )

    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        *,
        append: bool = False,
        overwrite: bool = False,
        dtype: str = "float32",
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        made_by: Mapping[str, Any] | None = None,
    ) -> StoreWriter:
        """:meth:`append_to` when ``append`` and ``path`` holds a store, else :meth:`create`."""
        if append and (Path(path) / INFO).exists():
            return cls.append_to(path, shard_bytes=shard_bytes, made_by=made_by)
        return cls.create(
            path, dtype=dtype, overwrite=overwrite, shard_bytes=shard_bytes, made_by=made_by
        )

    # ------------------------------------------------------------------ API
    @property
    def appending(self) -> bool:
        """Whether this writer extends an existing store (rather than writing a new one)."""
        return self._existing is not None

    @property
    def names(self) -> list[str] | None:
        """The store's layer names; None until :meth:`set_layout` or the first :meth:`add`."""
        return self._names

    @property
    def shapes(self) -> list[tuple[int, int]] | None:
        """The store's delta-W shapes (out, in), per layer; None until the layout is set."""
        return self._shapes

    def set_layout(self, names: Sequence[str], shapes: Sequence[Sequence[int]]) -> None:
        """Fix the layer layout every LoRA must fit (else it comes from the first LoRA added)."""
        if self._names is not None:
            raise StoreError(f"{self.path}: the layer layout is already fixed")
        self._names = list(names)
        self._shapes = [(int(o), int(i)) for o, i in shapes]

    def __len__(self) -> int:
        """LoRAs added by this writer so far."""
        return len(self._records)

    def mismatch(self, lora: LoRA) -> str:
        """Why ``lora`` does not fit this store's layer layout ('' when it fits)."""
        if self._names is None:
            return ""
        theirs = spec_of(lora)
        mine = LayerSpec(tuple(self._names), tuple(self._shapes), theirs.ranks)
        return mine.describe_mismatch(theirs)

    def add(
        self,
        lora: LoRA,
        *,
        id: str,
        source: str = "",
        labels: Mapping[str, Any] | None = None,
    ) -> None:
        """Add one LoRA under a new ``id`` with its label values."""
        id = str(id)
        if id in self._ids:
            raise StoreError(f"duplicate id {id!r}")
        if self._names is None:
            self.set_layout(lora.names, lora.shapes)
        problem = self.mismatch(lora)
        if problem:
            raise StoreError(f"{id}: layers do not fit the store: {problem}")
        ranks = tuple(int(r) for r in lora.ranks)
        row = flatten_row(lora, self._np_dtype, self._rank_major)
        self._buffer.setdefault(ranks, []).append(row)
        self._buffer_bytes += row.nbytes
        self._ids.add(id)
        rec = {
            "id": id,
            "source": str(source),
            "rank": max(ranks) if ranks else 0,
            "_ranks": list(ranks),
            "_buffer_ranks": ranks,
            "_buffer_pos": len(self._buffer[ranks]) - 1,
            "_labels": dict(labels or {}),
        }
        self._records.append(rec)
        if self._buffer_bytes >= self.shard_bytes:
            self._flush()

    def __enter__(self) -> StoreWriter:
        if self.appending:
            self._lock_fd = os.open(self.path / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.commit()
            else:
                self.abort()
        finally:
            if self._lock_fd is not None:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                os.close(self._lock_fd)
                self._lock_fd = None

    # ------------------------------------------------------------------ internals
    def _flush(self) -> None:
        if not self._buffer:
            return
        shard = self._next_shard
        self._next_shard += 1
        tensors, keymap = {}, {}
        for k, (ranks, rows) in enumerate(self._buffer.items()):
            tensors[f"g{k}"] = np.stack(rows)
            keymap[ranks] = f"g{k}"
        for rec in self._records:
            if "_buffer_ranks" in rec and "_shard" not in rec:
                rec["_shard"] = shard
                rec["_key"] = keymap[rec["_buffer_ranks"]]
                rec["_row"] = rec["_buffer_pos"]
                del rec["_buffer_ranks"], rec["_buffer_pos"]
        final = self._workdir / SHARD_PATTERN.format(shard)
        tmp = self._workdir / f".{final.name}.tmp-{os.getpid()}"
        meta = {"format": FORMAT, "version": VERSION, "layers": json.dumps(self._names)}
        write_safetensors(tmp, tensors, meta)
        self._written_shards.append((tmp, final))
        self._buffer = {}
        self._buffer_bytes = 0

    def _index_frame(self) -> pd.DataFrame:
        key = shapes_key(self._names or [], self._shapes or [])
        rows = []
        for rec in self._records:
            row = {c: rec[c] for c in ("id", "source", "rank")}
            row["shapes_key"] = key
            for c in INTERNAL_COLUMNS:
                row[c] = rec[c]
            for name, value in rec["_labels"].items():
                row[label_column(name)] = value
            rows.append(row)
        new = pd.DataFrame(rows)
        if self._existing is not None:
            new = pd.concat([self._existing.index, new], ignore_index=True)
        for c in ("_shard", "_row", "rank"):
            new[c] = new[c].astype("int64")
        return new

    def _info(self, index: pd.DataFrame) -> dict[str, Any]:
        """``store.json`` after this write: the existing one with a history entry added."""
        history_entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "added": len(self._records),
            **self.made_by,
        }
        if self._existing is None:
            info = {
                "format": FORMAT,
                "version": VERSION,
                "dtype": self.dtype,
                "layers": [
                    {"name": n, "out": int(o), "in": int(i)}
                    for n, (o, i) in zip(self._names, self._shapes)
                ],
                "shapes_key": shapes_key(self._names, self._shapes),
                "layout": ROW_LAYOUT,
                "history": [history_entry],
            }
        else:
            info = dict(self._existing.info)
            info["history"] = [*info.get("history", []), history_entry]
        info["num_loras"] = len(index)
        info["label_columns"] = [c for c in index.columns if c not in RESERVED]
        return info

    def commit(self) -> LoRAStore:
        """Make everything added visible at ``path`` in one atomic step; returns the store."""
        if self._records and self._buffer:
            self._flush()
        if not self._records and not self.appending:
            self.abort()
            raise StoreError("nothing to write: no LoRA was added")
        index = self._index_frame()
        info = self._info(index)
        # shards first (unreferenced until the index says otherwise), then the index, then info
        for tmp, final in self._written_shards:
            os.replace(tmp, final)
        idx_tmp = self._workdir / f".{INDEX}.tmp-{os.getpid()}"
        index.to_parquet(idx_tmp, index=False)
        with open(idx_tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(idx_tmp, self._workdir / INDEX)
        write_file_atomic(self._workdir / INFO, (json.dumps(info, indent=2) + "\n").encode())
        fsync_dir(self._workdir)
        if not self.appending:
            self._move_into_place()
        return LoRAStore(self.path)

    def _move_into_place(self) -> None:
        """Rename the finished new store onto ``path`` (replacing an old one if allowed)."""
        if self.path.exists():
            if self.overwrite:
                trash = self.path.with_name(f".{self.path.name}.old-{os.getpid()}")
                os.replace(self.path, trash)
                os.replace(self._workdir, self.path)
                shutil.rmtree(trash, ignore_errors=True)
            else:  # an empty directory we were allowed to fill
                self.path.rmdir()
                os.replace(self._workdir, self.path)
        else:
            os.replace(self._workdir, self.path)
        fsync_dir(self.path.parent)

    def abort(self) -> None:
        """Remove everything this writer wrote; an existing store is left as it was."""
        for tmp, _ in self._written_shards:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        self._written_shards = []
        if not self.appending:
            shutil.rmtree(self._workdir, ignore_errors=True)


def write_store(
    path: str | os.PathLike,
    items: Iterable[tuple[str, LoRA, Mapping[str, Any]]],
    *,
    dtype: str = "float32",
    append: bool = False,
    overwrite: bool = False,
    made_by: Mapping[str, Any] | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> LoRAStore:
    """Write (id, LoRA, labels) items as a store in one atomic step; returns the opened store."""
    with StoreWriter.open(
        path,
        append=append,
        overwrite=overwrite,
        dtype=dtype,
        made_by=made_by,
        shard_bytes=shard_bytes,
    ) as w:
        for id, lora, labels in items:
            w.add(lora, id=id, source=str(lora.metadata.get("source", "")), labels=labels)
    return LoRAStore(path)
