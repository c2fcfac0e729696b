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

from loralens.lora import LayerSpec, LoRA, LoRABatch, factor_zeros
from loralens.store.format import (
    INDEX,
    RESERVED,
    SHARD_GLOB,
    SHARD_PATTERN,
    StoreError,
    factor_view,
    info_layers,
    is_rank_major,
    map_safetensors,
    read_info,
    row_offsets,
)


class LoRAStore:
    """A packed store opened for reading. ``len(store)`` LoRAs, random access by row.

    >>> store = LoRAStore("zoo.store")            # doctest: +SKIP
    >>> lora = store[0]                            # one ll.LoRA
    >>> batch = store.batch([0, 5, 9])             # ll.LoRABatch, mixed ranks zero-padded
    >>> for rows, batch in store.iter_batches(64, shuffle=True, seed=0): ...
    """

    def __init__(self, path: str | os.PathLike, *, dtype: torch.dtype = torch.float32):
        self.path = Path(path)
        self.info: dict[str, Any] = read_info(self.path)
        self.index: pd.DataFrame = pd.read_parquet(self.path / INDEX).reset_index(drop=True)
        self._rank_major = is_rank_major(self.info)
        self.names, self.shapes = info_layers(self.info)
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
        return sum(p.stat().st_size for p in self.path.glob(SHARD_GLOB))

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
        """The row of the LoRA with this id."""
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
            maps = self._maps[shard] = map_safetensors(self.path / SHARD_PATTERN.format(shard))
        return maps[key]

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
