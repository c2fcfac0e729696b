"""Reading a packed store: random access by row, batches gathered from memory-mapped shards.

A batch of rows from one group tensor is a single numpy gather from the memory map, and each
layer's U and V are views into it, so iterating a store costs a memory copy per batch, not a
file parse per adapter. Rows of different ranks are zero-padded per batch (exact: padding
changes no U @ V.T).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from loralens.errors import SettingsError
from loralens.lora import LayerSpec, LoRA, LoRABatch, factor_zeros
from loralens.store.format import (
    INDEX,
    INFO,
    RESERVED,
    SHARD_PATTERN,
    Shard,
    StoreError,
    checksum_of,
    factor_view,
    info_layers,
    is_rank_major,
    open_shard,
    os_message,
    read_info,
    row_offsets,
)
from loralens.store.integrity import (
    check_checksum,
    check_rows,
    check_shard_header,
    first_nonfinite,
    index_rows,
    read_index,
)

#: How often opening is retried when a writer replaces the store meanwhile.
_OPEN_ATTEMPTS = 5


def _replaced(path: Path, dir_fd: int) -> bool:
    """Whether ``path`` no longer names the directory open as ``dir_fd``."""
    try:
        return not os.path.samestat(os.fstat(dir_fd), os.stat(path))
    except OSError:
        return True


class LoRAStore:
    """A packed store opened for reading. ``len(store)`` LoRAs, random access by row.

    >>> store = LoRAStore("zoo.store")            # doctest: +SKIP
    >>> lora = store[0]                            # one ll.LoRA
    >>> batch = store.batch([0, 5, 9])             # ll.LoRABatch, mixed ranks zero-padded
    >>> for rows, batch in store.iter_batches(64, shuffle=True, seed=0): ...

    Opening always checks the structure (see :mod:`loralens.store.integrity`) and every value
    read is checked finite (NaN or inf: a :class:`StoreError` naming the store and the row).
    ``verify`` says how far the checksums recorded in ``store.json`` are trusted:

    - ``True`` (default): sizes and ``index.parquet``'s sha256 on open, and each shard's
      sha256 (and all its values) the first time a row of it is read, so a store used
      whole (train, evaluate) is read once more in all, a store used in part pays for its part;
    - ``"quick"``: sizes and ``index.parquet``'s sha256 on open only;
    - ``False``: no checksum is compared.

    Stores written before checksums were recorded have none to compare (see
    :func:`~loralens.store.verify_store` for a full check that reports it).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        dtype: torch.dtype = torch.float32,
        verify: bool | str = True,
    ):
        if verify not in (True, False, "quick"):
            raise SettingsError(f"verify must be True, False or 'quick', not {verify!r}")
        self.path = Path(path)
        self.verify = verify
        self.dtype = dtype
        self._np_out = np.float32 if dtype == torch.float32 else None
        for attempt in range(_OPEN_ATTEMPTS):  # one directory handle: a consistent snapshot
            try:
                dir_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NONBLOCK)
            except (FileNotFoundError, NotADirectoryError):
                raise StoreError(
                    f"{self.path} is not a loralens store (no {INFO} / {INDEX})"
                ) from None
            except OSError as e:
                raise StoreError(os_message(self.path, e)) from None
            try:
                self._open(dir_fd)
                break
            except StoreError:
                if attempt + 1 == _OPEN_ATTEMPTS or not _replaced(self.path, dir_fd):
                    raise  # a writer swapped a new store in (and removed ours): open again
            finally:
                os.close(dir_fd)
        self._clean: set[int] = set()  # shards whose every value was checked finite
        self._arrays: dict[int, dict[str, np.ndarray]] = {}
        self._id_to_row: dict[str, int] | None = None

    def _open(self, dir_fd: int) -> None:
        """Read store.json, the index and every shard header (the shards mapped, not read)."""
        self.info: dict[str, Any] = read_info(self.path, dir_fd=dir_fd)
        check_hash = bool(self.verify)
        self.index: pd.DataFrame = read_index(
            self.path, self.info, check_hash=check_hash, dir_fd=dir_fd
        )
        self._rank_major = is_rank_major(self.info)
        self.names, self.shapes = info_layers(self.info)
        rows = index_rows(self.path / INDEX, self.index, len(self.names))
        self._ranks, self._shard, self._key, self._row = rows.ranks, rows.shard, rows.key, rows.row
        self._shards: dict[int, Shard] = {}
        for s in sorted(set(self._shard.tolist())):
            shard = open_shard(self.path / SHARD_PATTERN.format(s), dir_fd=dir_fd)
            if check_hash:
                recorded = checksum_of(self.info, shard.path.name)
                check_checksum(shard.path, recorded, data=shard.data, size_only=True)
            check_shard_header(self.path, self.info, shard)
            self._shards[s] = shard
        check_rows(self.path / INDEX, rows, self.index["id"], self._shards, self.shapes)

    def __reduce__(self) -> tuple:
        """Pickled as its path and options (mapped files do not pickle): unpickling opens the
        store again, e.g. in a spawned DataLoader worker."""
        return (_reopen, (str(self.path), self.dtype, self.verify))

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
    def shards(self) -> list[int]:
        """Numbers of the shards the store's rows lie in."""
        return sorted(self._shards)

    @property
    def shard_files(self) -> list[Path]:
        """The shard files the store's rows lie in."""
        return [h.path for h in self._shards.values()]

    @property
    def nbytes(self) -> int:
        """Bytes of the shards the store's rows lie in."""
        return sum(h.size for h in self._shards.values())

    def labels(self, columns: str | Sequence[str], rows: Sequence[int] | None = None) -> np.ndarray:
        """(N, len(columns)) float array of label columns (NaN where missing); a column holding
        text that is not a number is refused, naming the first such LoRA."""
        cols = [columns] if isinstance(columns, str) else list(columns)
        missing = [c for c in cols if c not in self.index.columns]
        if missing:
            raise StoreError(
                f"{self.path}: no column(s) {missing}; label columns are {self.label_columns}"
            )
        frame = self.index[cols] if rows is None else self.index[cols].iloc[list(rows)]
        values = frame.apply(pd.to_numeric, errors="coerce")
        text = values.isna() & frame.notna()  # there, but not a number
        if text.any().any():
            col = text.columns[text.any().to_numpy()][0]
            at = text.index[text[col].to_numpy()][0]
            raise StoreError(
                f"{self.path}: label column {col!r} is not numeric: LoRA "
                f"{str(self.index['id'].iloc[at])!r} has {frame[col].loc[at]!r} (labels must "
                "be numbers, or empty where unknown)"
            )
        return values.to_numpy(np.float64)

    def row_of(self, id: str) -> int:
        """The row of the LoRA with this id."""
        if self._id_to_row is None:
            self._id_to_row = {k: i for i, k in enumerate(self.ids)}
        try:
            return self._id_to_row[str(id)]
        except KeyError:
            raise KeyError(f"no LoRA with id {id!r} in {self.path}") from None

    # ----------------------------------------------------------------- reading
    def _group(self, shard: int, key: str) -> np.ndarray:
        arrays = self._arrays.get(shard)
        if arrays is None:
            if self.verify is True:
                self.check_shard(shard)
            arrays = self._arrays[shard] = self._shards[shard].arrays()
        return arrays[key]

    def check_shard(self, shard: int, *, check_hash: bool = True) -> None:
        """Compare shard ``shard`` with its recorded sha256 (where there is one, and when
        ``check_hash``) and check every value in it finite; raises naming the shard or row."""
        mapped = self._shards[shard]
        if check_hash:
            check_checksum(mapped.path, checksum_of(self.info, mapped.path.name), data=mapped.data)
        for key, arr in mapped.arrays().items():
            local = first_nonfinite(arr)
            if local is not None:
                mine = (self._shard == shard) & (self._key == key) & (self._row == local)
                rows = np.flatnonzero(mine)
                if len(rows):
                    raise self._nonfinite(int(rows[0]))
                raise StoreError(f"{mapped.path}: row {local} of tensor {key} holds NaN or inf")
        self._clean.add(shard)

    def _nonfinite(self, row: int) -> StoreError:
        shard = SHARD_PATTERN.format(self._shard[row])
        return StoreError(
            f"{self.path}: LoRA {str(self.index['id'].iloc[row])!r} (row {row}) holds NaN or "
            f"inf values (in {shard}; see `loralens store verify`)"
        )

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
            if s not in self._clean and not np.isfinite(data).all():
                raise self._nonfinite(int(rows[pos[np.argmin(np.isfinite(data).all(axis=1))]]))
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
        parts = self._gather(rows)
        U: list[torch.Tensor] = []
        V: list[torch.Tensor] = []
        if len(parts) == 1 and bool(np.all(ranks == width[None, :])):  # views, no copy
            ((_, data),) = parts
            t = torch.from_numpy(data)
            for (o, i), (us, vs, ve, r) in zip(self.shapes, row_offsets(self.shapes, width)):
                U.append(factor_view(t[:, us:vs], o, r, self._rank_major))
                V.append(factor_view(t[:, vs:ve], i, r, self._rank_major))
        else:  # rows of different ranks: each group copied into zeros at the batch's width
            out_dtype = torch.from_numpy(parts[0][1][:0]).dtype  # every part has one dtype
            for (o, i), w in zip(self.shapes, width.tolist()):
                U.append(factor_zeros(len(rows), o, int(w), dtype=out_dtype))
                V.append(factor_zeros(len(rows), i, int(w), dtype=out_dtype))
            for pos, data in parts:
                t = torch.from_numpy(data)
                p = torch.from_numpy(pos)
                offsets = row_offsets(self.shapes, ranks[pos[0]])
                for li, ((o, i), (us, vs, ve, r)) in enumerate(zip(self.shapes, offsets)):
                    if r == 0:
                        continue
                    U[li][p, :, :r] = factor_view(t[:, us:vs], o, r, self._rank_major)
                    V[li][p, :, :r] = factor_view(t[:, vs:ve], i, r, self._rank_major)
        if self.dtype != U[0].dtype:
            U = [u.to(self.dtype) for u in U]
            V = [v.to(self.dtype) for v in V]
        batch = LoRABatch(names=list(self.names), U=U, V=V, ranks=torch.from_numpy(ranks.copy()))
        if pad_ranks is not None:
            batch = batch.pad_to(np.maximum(width, np.asarray(pad_ranks, dtype=np.int64)))
        return batch

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

    def iter_batches(
        self,
        batch_size: int = 64,
        *,
        rows: Sequence[int] | np.ndarray | None = None,
        shuffle: bool = False,
        seed: int = 0,
        pad_ranks: Sequence[int] | None = None,
    ) -> Iterator[tuple[np.ndarray, LoRABatch]]:
        """Yield (row indices, LoRABatch) over ``rows`` (default: all), in order or shuffled."""
        rows = np.arange(len(self)) if rows is None else np.asarray(rows, dtype=np.int64)
        if shuffle:
            rows = rows[np.random.default_rng(seed).permutation(len(rows))]
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            yield chunk, self.batch(chunk, pad_ranks=pad_ranks)


def _reopen(path: str, dtype: torch.dtype, verify: bool | str) -> LoRAStore:
    return LoRAStore(path, dtype=dtype, verify=verify)
