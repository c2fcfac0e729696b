"""Writing a packed store atomically: a new store, or new LoRAs appended to an existing one.

Every write, under an exclusive lock on ``.<name>.lock`` beside the store, builds the whole
new store in a temporary sibling directory ``.<name>.tmp-<random>-<pid>`` (an append
hard-links the existing shards into it and adds its own), records every file's size and
sha256 in ``store.json``, fsyncs it and swaps it in (:func:`loralens.atomic.swap_in`): a
reader sees the old store or the new one, never none and never a mix. A failed write leaves
the store as it was; one killed outright leaves a temporary directory that the next writer
of the store removes.

Rows are written as they come, a block of one layer's factors at a time, to a scratch file in
that directory, and copied from it into each shard when the shard is full (its header needs
every row's place first): adding an adapter from an open reader holds one of its layers, never
the adapter, and rows waiting for their shard are on disk, not in memory.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
import pandas as pd

from loralens.atomic import (
    LockBeside,
    fsync_dir,
    owned_name,
    remove_orphans,
    restore_interrupted_swap,
    swap_in,
    write_file_atomic,
)
from loralens.lora import LayerSpec, LoRA
from loralens.store.format import (
    CHECKSUMS,
    DEFAULT_SHARD_BYTES,
    FORMAT,
    INDEX,
    INFO,
    INTERNAL_COLUMNS,
    NP_DTYPES,
    RESERVED,
    ROW_LAYOUT,
    SHARD_PATTERN,
    VERSION,
    StoreError,
    StoreExistsError,
    check_label_names,
    checksum_of,
    factor_blocks,
    is_rank_major,
    label_column,
    shapes_key,
    write_safetensors,
)
from loralens.store.integrity import checksum, shard_numbers
from loralens.store.reader import LoRAStore

if TYPE_CHECKING:
    from loralens.formats import LoRAReader

#: The scratch file rows wait in until their shard is written (inside the temporary directory).
SCRATCH = ".rows"
#: Bytes copied from the scratch file into a shard at a time.
COPY_BYTES = 4 * 2**20


def _begin(path: Path) -> tuple[LockBeside, Path]:
    """Lock the store at ``path`` for writing, undo what killed writers left behind (an
    interrupted swap: the old store is put back; their temporary directories), and make this
    writer's temporary directory."""
    tmp, trash = f".{path.name}.tmp-", f".{path.name}.old-"
    lock = LockBeside(path).acquire()
    try:
        restore_interrupted_swap(path, trash)
        remove_orphans(path.parent, (tmp, trash))
        workdir = path.parent / owned_name(tmp)
        workdir.mkdir()
    except BaseException:
        lock.release()
        raise
    return lock, workdir


def _link(src: Path, dst: Path) -> None:
    """``dst`` as a second name of the (never rewritten) file ``src``; a copy where the file
    system has no hard links."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def refuse_existing(path: Path) -> None:
    """Refuse (StoreExistsError) to create a store where a store or other files already are."""
    if not path.exists():
        return
    if (path / INFO).exists():
        raise StoreExistsError(f"{path} is already a store (use --append or --overwrite)")
    if not path.is_dir() or any(path.iterdir()):
        raise StoreExistsError(f"{path} exists and is not an empty directory")


class StoreWriter:
    """Write LoRAs into a new store (:meth:`create`) or append to one (:meth:`append_to`).

    >>> with StoreWriter.create("out.store", dtype="float16", made_by={"command": "pack"}) as w:
    ...     w.add(lora, id="a1", source="adapters/a1", labels={"eval_loss": 2.1})  # doctest: +SKIP

    Nothing is visible at ``path`` until the ``with`` block ends without an error; on an error
    every temporary file is removed and an existing store is left untouched. The writer holds
    the store's lock from :meth:`create` / :meth:`append_to` until :meth:`commit` or
    :meth:`abort` (other writers of the same store wait). ``made_by`` is recorded in
    ``store.json``'s history entry for this write and may be extended until then.
    """

    def __init__(
        self,
        path: Path,
        lock: LockBeside,
        workdir: Path,
        existing: LoRAStore | None,
        *,
        dtype: str,
        shard_bytes: int,
        made_by: Mapping[str, Any] | None,
    ):
        """Use :meth:`create`, :meth:`append_to` or :meth:`open`; they check ``path`` first."""
        self.path = path
        self.dtype = dtype
        self.shard_bytes = int(shard_bytes)
        self.made_by = dict(made_by or {})
        self._lock = lock
        self._workdir = workdir
        self._existing = existing
        self._np_dtype = NP_DTYPES[dtype]
        self._names: list[str] | None = None
        self._shapes: list[tuple[int, int]] | None = None
        self._version = VERSION
        self._next_shard = 0
        self._ids: set[str] = set()
        self._checksums: dict[str, dict[str, Any]] = {}
        if existing is not None:
            self._names, self._shapes = list(existing.names), list(existing.shapes)
            self._version = 2 if is_rank_major(existing.info) else 1
            self._next_shard = max(shard_numbers(path), default=-1) + 1
            self._ids = set(existing.ids)
        self._records: list[dict[str, Any]] = []
        self._scratch: BinaryIO | None = None
        self._scratch_bytes = 0

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
        return cls._start(path, "create", overwrite, dtype, shard_bytes, made_by)

    @classmethod
    def append_to(
        cls,
        path: str | os.PathLike,
        *,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        made_by: Mapping[str, Any] | None = None,
    ) -> StoreWriter:
        """A writer that adds LoRAs to the store at ``path``, in its own dtype and row layout."""
        return cls._start(path, "append", False, "float32", shard_bytes, made_by)

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
        mode = "either" if append else "create"
        return cls._start(path, mode, overwrite, dtype, shard_bytes, made_by)

    @classmethod
    def _start(cls, path, mode, overwrite, dtype, shard_bytes, made_by) -> StoreWriter:
        """Lock ``path``, then decide under the lock (another writer may have just finished)
        between appending and creating, as ``mode`` (create, append, either) allows."""
        path = Path(path)
        if mode == "append" and not path.parent.is_dir():
            raise StoreError(f"{path} is not a loralens store (no {INFO} / {INDEX})")
        if mode != "append" and dtype not in NP_DTYPES:
            raise StoreError(f"dtype must be one of {sorted(NP_DTYPES)}, got {dtype!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        lock, workdir = _begin(path)
        try:
            existing = None
            if mode == "append" or (mode == "either" and (path / INFO).exists()):
                existing = LoRAStore(path, verify="quick")
                dtype = existing.info["dtype"]
                for shard in existing.shard_files:
                    _link(shard, workdir / shard.name)
            elif not overwrite:
                refuse_existing(path)
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            lock.release()
            raise
        return cls(
            path, lock, workdir, existing, dtype=dtype, shard_bytes=shard_bytes, made_by=made_by
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

    def mismatch(self, lora: LoRA | LoRAReader) -> str:
        """Why ``lora`` (or an open reader's layers) does not fit this store's layer layout ('' when
        it fits); from layer names and shapes alone, so no values are read."""
        if self._names is None:
            return ""
        return _layout(self._names, self._shapes).describe_mismatch(
            _layout(lora.names, lora.shapes)
        )

    def add(
        self,
        lora: LoRA | LoRAReader,
        *,
        id: str,
        source: str = "",
        labels: Mapping[str, Any] | None = None,
    ) -> None:
        """Add one LoRA, or the layers of an open :class:`~loralens.formats.LoRAReader` (read
        here one at a time), under a new ``id`` with its label values (refused: a duplicate id,
        layers that do not fit, NaN or inf factors, two labels stored under one name). An error
        from the reader leaves nothing of the LoRA behind."""
        id = str(id)
        if id in self._ids:
            raise StoreError(f"duplicate id {id!r}")
        labels = dict(labels or {})
        check_label_names(list(labels))
        if self._names is None:
            self.set_layout(lora.names, lora.shapes)
        problem = self.mismatch(lora)
        if problem:
            raise StoreError(f"{id}: layers do not fit the store: {problem}")
        scratch = self._open_scratch()
        start = scratch.tell()
        ranks: list[int] = []
        try:
            for layer in lora:
                ranks.append(layer.rank)
                for f in (layer.U, layer.V):
                    for block in factor_blocks(f, self._np_dtype, self._version >= 2):
                        if not np.isfinite(block).all():
                            raise StoreError(f"{id}: NaN or inf in its factors (in {self.dtype})")
                        scratch.write(block.data)
                del layer  # before the next layer is read
        except BaseException:
            scratch.seek(start)
            scratch.truncate()
            raise
        self._scratch_bytes += scratch.tell() - start
        self._ids.add(id)
        self._records.append(
            {
                "id": id,
                "source": str(source),
                "rank": max(ranks) if ranks else 0,
                "_ranks": list(ranks),
                "_pending": (tuple(ranks), start, scratch.tell() - start),
                "_labels": labels,
            }
        )
        if self._scratch_bytes >= self.shard_bytes:
            self._flush()

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    # ------------------------------------------------------------------ internals
    def _open_scratch(self) -> BinaryIO:
        if self._scratch is None:
            self._scratch = open(self._workdir / SCRATCH, "w+b")  # noqa: SIM115 (closed on commit/abort)
        return self._scratch

    def _close_scratch(self) -> None:
        if self._scratch is not None:
            self._scratch.close()
            self._scratch = None
            (self._workdir / SCRATCH).unlink(missing_ok=True)

    def _flush(self) -> None:
        """Write the rows waiting in the scratch file as the next shard: rows of equal ranks
        share a tensor ``g<k>``, in the order they were added."""
        pending = [rec for rec in self._records if "_pending" in rec]
        if not pending:
            return
        shard = self._next_shard
        self._next_shard += 1
        groups: dict[tuple[int, ...], list[dict[str, Any]]] = {}
        for rec in pending:
            groups.setdefault(rec["_pending"][0], []).append(rec)
        tensors, spans = {}, []
        for k, recs in enumerate(groups.values()):
            row_length = recs[0]["_pending"][2] // np.dtype(self._np_dtype).itemsize
            tensors[f"g{k}"] = (self._np_dtype, (len(recs), row_length))
            for row, rec in enumerate(recs):
                spans.append(rec["_pending"][1:])
                rec.update(_shard=shard, _key=f"g{k}", _row=row)
                del rec["_pending"]
        name = SHARD_PATTERN.format(shard)
        meta = {"format": FORMAT, "version": self._version, "layers": json.dumps(self._names)}
        scratch = self._open_scratch()
        data = _copied(scratch, spans)
        self._checksums[name] = write_safetensors(self._workdir / name, tensors, data, meta)
        scratch.seek(0)
        scratch.truncate()
        self._scratch_bytes = 0

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

    def _info(self, index: pd.DataFrame, index_bytes: bytes) -> dict[str, Any]:
        """``store.json`` after this write: the existing one with a history entry added, and
        the checksums of every file."""
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
            sums = {}
        else:
            info = dict(self._existing.info)
            info["history"] = [*info.get("history", []), history_entry]
            kept = (p.name for p in self._existing.shard_files)
            sums = {n: s for n in kept if (s := checksum_of(info, n)) is not None}
        info["num_loras"] = len(index)
        info["label_columns"] = [c for c in index.columns if c not in RESERVED]
        info[CHECKSUMS] = {INDEX: checksum(index_bytes), **sums, **self._checksums}
        return info

    def commit(self) -> LoRAStore:
        """Make everything added visible at ``path`` in one atomic step; returns the store."""
        try:
            self._flush()
            self._close_scratch()
            if not self._records and not self.appending:
                raise StoreError("nothing to write: no LoRA was added")
            index = self._index_frame()
            try:
                index_bytes = index.to_parquet(None, index=False)
            except Exception as e:  # e.g. a label column of numbers and text mixed
                raise StoreError(f"{self.path}: cannot write its index: {e}") from None
            info = self._info(index, index_bytes)
            write_file_atomic(self._workdir / INDEX, index_bytes)
            write_file_atomic(self._workdir / INFO, (json.dumps(info, indent=2) + "\n").encode())
            fsync_dir(self._workdir)
            old = swap_in(self._workdir, self.path, f".{self.path.name}.old-")
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            self.abort()
            raise
        self._lock.release()
        return LoRAStore(self.path)

    def abort(self) -> None:
        """Remove everything this writer wrote; an existing store is left as it was."""
        if self._scratch is not None:
            self._scratch.close()
        shutil.rmtree(self._workdir, ignore_errors=True)
        self._lock.release()

    def __del__(self) -> None:
        if self._lock.held:  # dropped without commit or abort: never keep the lock
            self.abort()


def _layout(names: Sequence[str], shapes: Sequence[Sequence[int]]) -> LayerSpec:
    """A layer layout (names, delta-W shapes) as a spec to compare; ranks do not matter here."""
    return LayerSpec(tuple(names), tuple((int(o), int(i)) for o, i in shapes), ())


def _copied(file: BinaryIO, spans: Sequence[tuple[int, int]]) -> Iterator[bytes]:
    """The bytes of ``file`` at each (offset, length) span in turn, a chunk at a time."""
    for offset, length in spans:
        file.seek(offset)
        while length > 0:
            chunk = file.read(min(length, COPY_BYTES))
            if not chunk:
                raise StoreError(f"{file.name}: rows waiting for their shard were cut short")
            length -= len(chunk)
            yield chunk


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
