"""The packed store: many LoRAs of one layer layout in a directory, memory-mapped, batched fast.

Layout of a store directory::

    store.json                  format version, layer names and shapes, dtype, how it was made
    index.parquet               one row per LoRA: id, source, rank, shapes_key, label columns,
                                and where its weights are (_shard, _key, _row, _ranks)
    weights-00000.safetensors   U and V of every layer, contiguous per LoRA

Inside a shard, LoRAs with the same per-layer ranks share one 2-D tensor ``g<k>`` of shape
(count, row_length); a row is one LoRA: for each layer in order, U^T (r x out) then V^T
(r x in), row-major ("rank-major" factors, format version 2; version-1 stores hold U and V
row-major and are still read). Rank-major is the layout the skinny products of GL-net and the
featurizers run fastest on (``ll.LoRABatch``). A batch of rows from one group is a single numpy gather from the memory map, and
each layer's U and V are views into it, so iterating a store costs a memory copy per batch,
not a file parse per adapter. Mixed ranks are zero-padded per batch (exact: padding changes no
U @ V.T).

Writes are atomic: a new store is written into a temporary sibling directory, fsynced and
renamed into place; an append writes new shards under temporary names, renames them, then
replaces ``index.parquet`` (the commit point) and ``store.json`` by rename. A failed write
leaves the store as it was (at most an unreferenced shard, which readers ignore).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from loralens.atomic import fsync_dir, write_file_atomic
from loralens.lora import LayerSpec, LoRA, LoRABatch, factor_zeros, spec_of

FORMAT = "loralens-store"
VERSION = 2  # 2: rank-major factors; 1: row-major (read and appended to as such)
INDEX = "index.parquet"
INFO = "store.json"
SHARD_PATTERN = "weights-{:05d}.safetensors"
DEFAULT_SHARD_BYTES = 512 * 2**20

#: Columns the store owns; every other index column is a label.
DESIGN_COLUMNS = ("id", "source", "rank", "shapes_key")
INTERNAL_COLUMNS = ("_shard", "_key", "_row", "_ranks")
RESERVED = DESIGN_COLUMNS + INTERNAL_COLUMNS

_NP_DTYPES = {"float32": np.float32, "float16": np.float16}
_ST_DTYPES = {"F32": np.float32, "F16": np.float16}
_ST_NAMES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}


class StoreError(ValueError):
    """A store could not be written or read as asked; the message says why."""


def shapes_key(names: Sequence[str], shapes: Sequence[Sequence[int]]) -> str:
    """A short stable hash of a layer layout (names and delta-W shapes, not ranks)."""
    text = json.dumps([[n, [int(x) for x in s]] for n, s in zip(names, shapes)])
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _write_safetensors(path: Path, tensors: Mapping[str, np.ndarray], metadata: dict) -> None:
    """Write a safetensors file (the documented format: u64 header length, JSON header, data)."""
    header: dict[str, Any] = {"__metadata__": {k: str(v) for k, v in metadata.items()}}
    offset = 0
    for name, arr in tensors.items():
        nbytes = arr.nbytes
        header[name] = {
            "dtype": _ST_NAMES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data section
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for arr in tensors.values():
            f.write(np.ascontiguousarray(arr).tobytes())
        f.flush()
        os.fsync(f.fileno())


def _map_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Memory-map every tensor of a safetensors file as a read-only numpy array."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > 100 * 2**20:
            raise StoreError(f"{path}: implausible safetensors header ({n} bytes)")
        header = json.loads(f.read(n))
    size = path.stat().st_size
    start = 8 + n
    out = {}
    for name, h in header.items():
        if name == "__metadata__":
            continue
        dtype = _ST_DTYPES.get(h["dtype"])
        if dtype is None:
            raise StoreError(f"{path}: tensor {name} has unsupported dtype {h['dtype']}")
        b, e = h["data_offsets"]
        shape = tuple(int(x) for x in h["shape"])
        if start + e > size or e - b != int(np.prod(shape)) * np.dtype(dtype).itemsize:
            raise StoreError(f"{path}: tensor {name} lies outside the file (truncated shard?)")
        if e == b:
            out[name] = np.zeros(shape, dtype=dtype)
        else:
            out[name] = np.memmap(path, dtype=dtype, mode="r", offset=start + b, shape=shape)
    return out


def _flatten(lora: LoRA, dtype: np.dtype, rank_major: bool) -> np.ndarray:
    parts = []
    for layer in lora.layers:
        for f in (layer.U, layer.V):
            f = f.detach().to(torch.float32).cpu()
            parts.append((f.T if rank_major else f).numpy().reshape(-1))
    return np.concatenate(parts).astype(dtype, copy=False)


def _factor_view(flat: torch.Tensor, n: int, r: int, rank_major: bool) -> torch.Tensor:
    """(B, n, r) factors from (B, n * r) rows stored rank-major (U^T) or row-major (U)."""
    B = flat.shape[0]  # explicit: a rank-0 factor has no elements to infer it from
    return flat.view(B, r, n).mT if rank_major else flat.view(B, n, r)


class LoRAStore:
    """A packed store opened for reading. ``len(store)`` LoRAs, random access by row.

    >>> store = LoRAStore("zoo.store")            # doctest: +SKIP
    >>> lora = store[0]                            # one ll.LoRA
    >>> batch = store.batch([0, 5, 9])             # ll.LoRABatch, mixed ranks zero-padded
    >>> for rows, batch in store.iter_batches(64, shuffle=True, seed=0): ...
    """

    def __init__(self, path: str | os.PathLike, *, dtype: torch.dtype = torch.float32):
        self.path = Path(path)
        info_path, index_path = self.path / INFO, self.path / INDEX
        if not info_path.is_file() or not index_path.is_file():
            raise StoreError(f"{self.path} is not a loralens store (no {INFO} / {INDEX})")
        self.info: dict[str, Any] = json.loads(info_path.read_text())
        if self.info.get("format") != FORMAT or int(self.info.get("version", 0)) > VERSION:
            raise StoreError(f"{self.path}: unsupported store format {self.info.get('format')!r}")
        self.index: pd.DataFrame = pd.read_parquet(index_path).reset_index(drop=True)
        self._rank_major = int(self.info.get("version", 1)) >= 2
        self.names: list[str] = [la["name"] for la in self.info["layers"]]
        self.shapes: list[tuple[int, int]] = [
            (int(la["out"]), int(la["in"])) for la in self.info["layers"]
        ]
        self.dtype = dtype
        self._np_out = np.float32 if dtype == torch.float32 else None
        n = len(self.index)
        self._ranks = (
            np.stack([np.asarray(r, dtype=np.int64) for r in self.index["_ranks"]])
            if n
            else np.zeros((0, len(self.names)), dtype=np.int64)
        )
        self._shard = self.index["_shard"].to_numpy(np.int64)
        self._row = self.index["_row"].to_numpy(np.int64)
        self._key = self.index["_key"].astype(str).to_numpy()
        self._maps: dict[int, dict[str, np.ndarray]] = {}
        self._id_to_row: dict[str, int] | None = None

    # ----------------------------------------------------------------- description
    def __len__(self) -> int:
        return len(self.index)

    def __repr__(self) -> str:
        return (
            f"LoRAStore({str(self.path)!r}, {len(self)} LoRAs, {len(self.names)} layers, "
            f"ranks {sorted(set(self._ranks.max(axis=1).tolist())) if len(self) else []}, "
            f"labels {self.label_columns})"
        )

    @property
    def ids(self) -> list[str]:
        return self.index["id"].astype(str).tolist()

    @property
    def ranks(self) -> np.ndarray:
        """(N, L) true rank of every LoRA in every layer."""
        return self._ranks

    @property
    def label_columns(self) -> list[str]:
        return [c for c in self.index.columns if c not in RESERVED]

    @property
    def spec(self) -> LayerSpec:
        """The layer spec of a batch of the whole store (ranks = largest per layer)."""
        ranks = self._ranks.max(axis=0).tolist() if len(self) else [0] * len(self.names)
        return LayerSpec(tuple(self.names), tuple(self.shapes), tuple(int(r) for r in ranks))

    @property
    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.glob("weights-*.safetensors"))

    def labels(self, columns: str | Sequence[str], rows: Sequence[int] | None = None) -> np.ndarray:
        """(N, len(columns)) float array of label columns (NaN where missing)."""
        cols = [columns] if isinstance(columns, str) else list(columns)
        missing = [c for c in cols if c not in self.index.columns]
        if missing:
            raise StoreError(
                f"{self.path}: no column(s) {missing}; label columns are {self.label_columns}"
            )
        frame = self.index[cols] if rows is None else self.index[cols].iloc[list(rows)]
        return frame.apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)

    def row_of(self, id: str) -> int:
        if self._id_to_row is None:
            self._id_to_row = {k: i for i, k in enumerate(self.ids)}
        try:
            return self._id_to_row[str(id)]
        except KeyError:
            raise KeyError(f"no LoRA with id {id!r} in {self.path}") from None

    # ----------------------------------------------------------------- reading
    def _group(self, shard: int, key: str) -> np.ndarray:
        maps = self._maps.get(shard)
        if maps is None:
            maps = self._maps[shard] = _map_safetensors(self.path / SHARD_PATTERN.format(shard))
        return maps[key]

    def _layout(self, ranks: Sequence[int]) -> list[tuple[int, int, int, int]]:
        """Per layer (u_start, v_start, v_end, r) offsets inside a row with these ranks."""
        out, pos = [], 0
        for (o, i), r in zip(self.shapes, ranks):
            r = int(r)
            out.append((pos, pos + o * r, pos + o * r + i * r, r))
            pos += (o + i) * r
        return out

    def _gather(self, rows: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Group ``rows`` by (shard, group tensor) -> [(positions in ``rows``, (n, D) data)]."""
        groups: dict[tuple[int, str], list[int]] = {}
        for pos, (s, k) in enumerate(zip(self._shard[rows].tolist(), self._key[rows].tolist())):
            groups.setdefault((s, k), []).append(pos)
        out = []
        for (s, k), positions in groups.items():
            pos = np.asarray(positions, dtype=np.int64)
            local = self._row[rows[pos]]
            arr = self._group(s, k)
            if len(local) > 1 and np.all(np.diff(local) == 1):
                data = np.array(arr[local[0] : local[-1] + 1])  # one contiguous read
            else:
                data = arr[local]  # numpy gather from the memory map (a copy)
            if self._np_out is not None and data.dtype != self._np_out:
                data = data.astype(self._np_out)
            out.append((pos, data))
        return out

    def batch(
        self, rows: Sequence[int] | np.ndarray, *, pad_ranks: Sequence[int] | None = None
    ) -> LoRABatch:
        """The LoRAs at ``rows`` as one LoRABatch, each layer zero-padded to its largest rank
        (or to ``pad_ranks`` where that is larger, e.g. the ranks a model was trained on)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(rows) == 0:
            raise StoreError("batch() needs at least one row")
        if rows.min() < 0 or rows.max() >= len(self):
            raise IndexError(f"row out of range for a store of {len(self)} LoRAs")
        ranks = self._ranks[rows]
        width = ranks.max(axis=0)
        if pad_ranks is not None:
            width = np.maximum(width, np.asarray(pad_ranks, dtype=np.int64))
        parts = self._gather(rows)
        B = len(rows)
        U: list[torch.Tensor] = []
        V: list[torch.Tensor] = []
        uniform = len(parts) == 1 and bool(np.all(ranks == width[None, :]))
        if uniform:
            ((_, data),) = parts
            t = torch.from_numpy(data)
            for (o, i), (us, vs, ve, r) in zip(self.shapes, self._layout(width)):
                U.append(_factor_view(t[:, us:vs], o, r, self._rank_major))
                V.append(_factor_view(t[:, vs:ve], i, r, self._rank_major))
        else:
            out_dtype = torch.from_numpy(parts[0][1][:0]).dtype  # every part has one dtype
            for (o, i), w in zip(self.shapes, width.tolist()):
                U.append(factor_zeros(B, o, int(w), dtype=out_dtype))
                V.append(factor_zeros(B, i, int(w), dtype=out_dtype))
            for pos, data in parts:
                t = torch.from_numpy(data)
                p = torch.from_numpy(pos)
                layout = self._layout(ranks[pos[0]])
                for li, ((o, i), (us, vs, ve, r)) in enumerate(zip(self.shapes, layout)):
                    if r == 0:
                        continue
                    U[li][p, :, :r] = _factor_view(t[:, us:vs], o, r, self._rank_major)
                    V[li][p, :, :r] = _factor_view(t[:, vs:ve], i, r, self._rank_major)
        if self.dtype != U[0].dtype:
            U = [u.to(self.dtype) for u in U]
            V = [v.to(self.dtype) for v in V]
        return LoRABatch(names=list(self.names), U=U, V=V, ranks=torch.from_numpy(ranks.copy()))

    def __getitem__(self, row: int) -> LoRA:
        """One LoRA (its true ranks, no padding), with id/source/labels in its metadata."""
        row = int(row)
        if row < 0:
            row += len(self)
        lora = self.batch([row]).unbatch()[0]
        rec = self.index.iloc[row]
        lora.metadata.update(
            id=str(rec["id"]),
            source=str(rec["source"]),
            labels={c: rec[c] for c in self.label_columns},
        )
        return lora

    def get(self, id: str) -> LoRA:
        return self[self.row_of(id)]

    def iter_batches(
        self,
        batch_size: int = 64,
        *,
        rows: Sequence[int] | np.ndarray | None = None,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        pad_ranks: Sequence[int] | None = None,
    ) -> Iterator[tuple[np.ndarray, LoRABatch]]:
        """Yield (row indices, LoRABatch) over ``rows`` (default: all), in order or shuffled."""
        rows = np.arange(len(self)) if rows is None else np.asarray(rows, dtype=np.int64)
        if shuffle:
            rows = rows[np.random.default_rng(seed).permutation(len(rows))]
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            if drop_last and len(chunk) < batch_size:
                break
            yield chunk, self.batch(chunk, pad_ranks=pad_ranks)


# --------------------------------------------------------------------------- writing


class StoreWriter:
    """Write LoRAs into a new store, or append to an existing one, atomically.

    >>> with StoreWriter("out.store", dtype="float16", made_by={"command": "pack"}) as w:
    ...     w.add(lora, id="a1", source="adapters/a1", labels={"eval_loss": 2.1})  # doctest: +SKIP

    Nothing is visible at ``path`` until the ``with`` block ends without an error; on an error
    every temporary file is removed and an existing store is left untouched.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        dtype: str = "float32",
        append: bool = False,
        overwrite: bool = False,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        made_by: Mapping[str, Any] | None = None,
    ):
        self.path = Path(path)
        self.append = append and (self.path / INFO).exists()
        if self.path.exists() and not self.append and not overwrite:
            if (self.path / INFO).exists():
                raise StoreError(f"{self.path} is already a store (use append or overwrite)")
            if any(self.path.iterdir()) if self.path.is_dir() else True:
                raise StoreError(f"{self.path} exists and is not an empty directory")
        self.overwrite = overwrite
        self.shard_bytes = int(shard_bytes)
        self.made_by = dict(made_by or {})
        self._lock_fd: int | None = None
        self._records: list[dict[str, Any]] = []
        self._buffer: dict[tuple[int, ...], list[np.ndarray]] = {}
        self._buffer_bytes = 0
        self._written_shards: list[tuple[Path, Path]] = []  # (temp path, final path)
        self._ids: set[str] = set()
        if self.append:
            info = json.loads((self.path / INFO).read_text())
            self.dtype = info["dtype"]
            self.names = [la["name"] for la in info["layers"]]
            self.shapes = [(int(la["out"]), int(la["in"])) for la in info["layers"]]
            self._old_index = pd.read_parquet(self.path / INDEX)
            self._ids = set(self._old_index["id"].astype(str))
            existing = [int(p.name[8:13]) for p in self.path.glob("weights-*.safetensors")]
            self._next_shard = max(existing, default=-1) + 1
            self._info = info
            self._rank_major = int(info.get("version", 1)) >= 2
            self._workdir = self.path
        else:
            if dtype not in _NP_DTYPES:
                raise StoreError(f"dtype must be one of {sorted(_NP_DTYPES)}, got {dtype!r}")
            self.dtype = dtype
            self.names = None
            self.shapes = None
            self._old_index = None
            self._next_shard = 0
            self._info = None
            self._rank_major = True
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._workdir = Path(
                tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-", dir=self.path.parent)
            )
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(self._workdir, 0o777 & ~umask)  # mkdtemp makes it private (0700)
        self._np_dtype = _NP_DTYPES[self.dtype]

    # ------------------------------------------------------------------ API
    def mismatch(self, lora: LoRA) -> str:
        """Why ``lora`` does not fit this store's layer layout ('' when it fits)."""
        if self.names is None:
            return ""
        theirs = spec_of(lora)
        mine = LayerSpec(tuple(self.names), tuple(self.shapes), theirs.ranks)
        return mine.describe_mismatch(theirs)

    def add(
        self,
        lora: LoRA,
        *,
        id: str,
        source: str = "",
        labels: Mapping[str, Any] | None = None,
    ) -> None:
        id = str(id)
        if id in self._ids:
            raise StoreError(f"duplicate id {id!r}")
        if self.names is None:
            self.names = list(lora.names)
            self.shapes = [tuple(s) for s in lora.shapes]
        problem = self.mismatch(lora)
        if problem:
            raise StoreError(f"{id}: layers do not fit the store: {problem}")
        ranks = tuple(int(r) for r in lora.ranks)
        row = _flatten(lora, self._np_dtype, self._rank_major)
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
        if self.append:
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
        meta = {"format": FORMAT, "version": VERSION, "layers": json.dumps(self.names)}
        _write_safetensors(tmp, tensors, meta)
        self._written_shards.append((tmp, final))
        self._buffer = {}
        self._buffer_bytes = 0

    def _index_frame(self) -> pd.DataFrame:
        key = shapes_key(self.names or [], self.shapes or [])
        rows = []
        for rec in self._records:
            row = {c: rec[c] for c in ("id", "source", "rank")}
            row["shapes_key"] = key
            for c in INTERNAL_COLUMNS:
                row[c] = rec[c]
            for name, value in rec["_labels"].items():
                row[_label_name(name)] = value
            rows.append(row)
        new = pd.DataFrame(rows)
        if self._old_index is not None:
            new = pd.concat([self._old_index, new], ignore_index=True)
        for c in ("_shard", "_row", "rank"):
            new[c] = new[c].astype("int64")
        return new

    def commit(self) -> LoRAStore:
        if self._records and self._buffer:
            self._flush()
        if not self._records and not self.append:
            self.abort()
            raise StoreError("nothing to write: no LoRA was added")
        index = self._index_frame()
        layers = [
            {"name": n, "out": int(o), "in": int(i)} for n, (o, i) in zip(self.names, self.shapes)
        ]
        history_entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "added": len(self._records),
            **self.made_by,
        }
        if self._info is None:
            info = {
                "format": FORMAT,
                "version": VERSION,
                "dtype": self.dtype,
                "layers": layers,
                "shapes_key": shapes_key(self.names, self.shapes),
                "layout": "per shard, LoRAs of equal ranks share a 2-D tensor g<k>; a row is "
                "[U_0^T (r x out), V_0^T (r x in), U_1^T, V_1^T, ...] flattened row-major",
                "history": [history_entry],
            }
        else:
            info = dict(self._info)
            info["history"] = [*info.get("history", []), history_entry]
        info["num_loras"] = len(index)
        info["label_columns"] = [c for c in index.columns if c not in RESERVED]
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
        if not self.append:
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
        return LoRAStore(self.path)

    def abort(self) -> None:
        """Remove everything this writer wrote; an existing store is left as it was."""
        for tmp, _ in self._written_shards:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        self._written_shards = []
        if not self.append:
            shutil.rmtree(self._workdir, ignore_errors=True)


def _label_name(name: str) -> str:
    """Label columns never shadow the store's own columns ("rank" -> "rank_label")."""
    return f"{name}_label" if name in RESERVED else str(name)


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
    with StoreWriter(
        path,
        dtype=dtype,
        append=append,
        overwrite=overwrite,
        made_by=made_by,
        shard_bytes=shard_bytes,
    ) as w:
        for id, lora, labels in items:
            w.add(lora, id=id, source=str(lora.metadata.get("source", "")), labels=labels)
    return LoRAStore(path)


# --------------------------------------------------------------------------- packing


class PackError(StoreError):
    """Some adapters were refused; ``refused`` lists (adapter, reason). Nothing was written."""

    def __init__(self, message: str, refused: list[tuple[str, str]]):
        super().__init__(message)
        self.refused = refused


def _adapter_entries(adapters_dir: Path) -> list[str]:
    """Names of the adapters in a folder: sub-folders and .safetensors/.bin/.pt files."""
    out = []
    for p in sorted(adapters_dir.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir() or p.suffix in (".safetensors", ".bin", ".pt", ".pth"):
            out.append(p.name)
    return out


def _resolve_adapter(adapters_dir: Path, name: str) -> Path | None:
    p = adapters_dir / name
    if p.exists():
        return p
    for ext in (".safetensors", ".bin", ".pt", ".pth"):
        if (adapters_dir / f"{name}{ext}").exists():
            return adapters_dir / f"{name}{ext}"
    return None


def read_labels(path: str | os.PathLike) -> pd.DataFrame:
    """A labels CSV whose first column names the adapters (``adapter``), one row each."""
    frame = pd.read_csv(path, converters={0: str})  # "000017" stays a name, not 17
    if frame.empty or len(frame.columns) == 0:
        raise StoreError(f"{path}: no rows")
    first = frame.columns[0]
    frame = frame.rename(columns={first: "adapter"})
    frame["adapter"] = frame["adapter"].astype(str)
    dupes = frame["adapter"][frame["adapter"].duplicated()].tolist()
    if dupes:
        raise StoreError(f"{path}: adapters listed twice: {dupes[:5]}")
    return frame


def pack(
    adapters_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    labels: str | os.PathLike | pd.DataFrame | None = None,
    dtype: str = "float32",
    append: bool = False,
    overwrite: bool = False,
    skip_bad: bool = False,
    load: Any = None,
    progress: Any = None,
    made_by: Mapping[str, Any] | None = None,
) -> tuple[LoRAStore, list[tuple[str, str]]]:
    """Pack a folder of adapters (any supported format) plus labels into a store at ``out``.

    ``labels`` is a CSV (or frame) whose first column names adapters (sub-folder or file name,
    extension optional); only listed adapters are packed. Without labels every adapter in the
    folder is packed. ``adapters_dir`` may also be a zoo folder holding ``adapters/`` and
    ``labels.csv``. The layer layout is the store's own when appending, else the most common
    one among the first adapters. Adapters that cannot be read or whose layers do not fit are
    refused: with ``skip_bad`` they are left out and returned as (name, reason); otherwise a
    :class:`PackError` lists them all and nothing is written. ``progress(i, n, name)`` is
    called after each adapter.
    """
    from loralens.formats import load_lora

    load = load or load_lora
    root = Path(adapters_dir)
    zoo_info = None
    if (root / "adapters").is_dir() and (root / "labels.csv").is_file():
        if labels is None:
            labels = root / "labels.csv"
        if (root / "zoo.json").is_file():
            with contextlib.suppress(ValueError):
                zoo_info = json.loads((root / "zoo.json").read_text())
        root = root / "adapters"
    if not root.is_dir():
        raise StoreError(f"{root} is not a folder of adapters")
    if labels is None:
        frame = pd.DataFrame({"adapter": _adapter_entries(root)})
    elif isinstance(labels, pd.DataFrame):
        frame = labels.rename(columns={labels.columns[0]: "adapter"})
    else:
        frame = read_labels(labels)
    if frame.empty:
        raise StoreError(f"no adapters to pack in {root}")
    label_cols = [c for c in frame.columns if c != "adapter"]
    records = frame.to_dict("records")

    refused: list[tuple[str, str]] = []
    loaded: dict[int, LoRA | None] = {}

    def _load(k: int) -> LoRA | None:
        if k in loaded:
            return loaded.pop(k)
        name = str(records[k]["adapter"])
        path = _resolve_adapter(root, name)
        if path is None:
            refused.append((name, "not found"))
            return None
        try:
            lora = load(path)
        except Exception as e:  # hostile or broken files are refused, never fatal
            refused.append((name, f"unreadable: {e}"))
            return None
        lora.metadata.setdefault("source", str(path))
        return lora

    meta = {
        "command": "pack",
        "adapters": str(root),
        "labels": str(labels) if labels is not None else None,
    }
    meta.update(made_by or {})
    writer = StoreWriter(out, dtype=dtype, append=append, overwrite=overwrite, made_by=meta)
    if zoo_info is not None and writer._info is None:
        writer.made_by["zoo"] = zoo_info
    if writer.names is None:  # pick the layout: most common among the first readable adapters
        counts: dict[tuple, int] = {}
        for k in range(min(16, len(records))):
            lora = loaded[k] = _load(k)  # kept (or its refusal) for the main pass
            if lora is not None:
                key = (tuple(lora.names), tuple(lora.shapes))
                counts[key] = counts.get(key, 0) + 1
        if counts:
            names, shapes = max(counts, key=lambda key: counts[key])
            writer.names, writer.shapes = list(names), [tuple(s) for s in shapes]
    with writer:
        for k, rec in enumerate(records):
            name = str(rec["adapter"])
            lora = _load(k)
            if lora is not None:
                problem = writer.mismatch(lora)
                if problem:
                    refused.append((name, f"layers do not fit the others: {problem}"))
                else:
                    writer.add(
                        lora,
                        id=name,
                        source=str(lora.metadata.get("source", "")),
                        labels={c: rec[c] for c in label_cols},
                    )
            if progress is not None:
                progress(k + 1, len(records), name)
        if refused and not skip_bad:
            raise PackError(
                f"{len(refused)} of {len(records)} adapters refused; nothing was written "
                "(pass skip_bad / --skip-bad to pack the rest)",
                refused,
            )
        if not writer._records and not append:
            raise PackError("no adapter could be packed", refused)
    return LoRAStore(out), refused


__all__ = [
    "LoRAStore",
    "PackError",
    "StoreError",
    "StoreWriter",
    "pack",
    "read_labels",
    "shapes_key",
    "write_store",
]
