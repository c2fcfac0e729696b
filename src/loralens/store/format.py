"""The on-disk format of a packed store: file names, columns, the row layout, safetensors shards.

Layout of a store directory::

    store.json                  format version, layer names and shapes, dtype, how it was made
    index.parquet               one row per LoRA: id, source, rank, shapes_key, label columns,
                                and where its weights are (_shard, _key, _row, _ranks)
    weights-00000.safetensors   U and V of every layer, contiguous per LoRA

Inside a shard, LoRAs with the same per-layer ranks share one 2-D tensor ``g<k>`` of shape
(count, row_length); a row is one LoRA: for each layer in order, U^T (r x out) then V^T
(r x in), row-major ("rank-major" factors, format version 2; version-1 stores hold U and V
row-major and are still read and appended to as such).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loralens.errors import OutputExistsError
from loralens.lora import LoRA

FORMAT = "loralens-store"
VERSION = 2  # 2: rank-major factors; 1: row-major (read and appended to as such)
INDEX = "index.parquet"
INFO = "store.json"
SHARD_PATTERN = "weights-{:05d}.safetensors"
SHARD_GLOB = "weights-*.safetensors"
DEFAULT_SHARD_BYTES = 512 * 2**20
ROW_LAYOUT = (
    "per shard, LoRAs of equal ranks share a 2-D tensor g<k>; a row is "
    "[U_0^T (r x out), V_0^T (r x in), U_1^T, V_1^T, ...] flattened row-major"
)

#: Columns the store owns; every other index column is a label.
DESIGN_COLUMNS = ("id", "source", "rank", "shapes_key")
INTERNAL_COLUMNS = ("_shard", "_key", "_row", "_ranks")
RESERVED = DESIGN_COLUMNS + INTERNAL_COLUMNS

NP_DTYPES = {"float32": np.float32, "float16": np.float16}
_ST_DTYPES = {"F32": np.float32, "F16": np.float16}
_ST_NAMES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}


class StoreError(ValueError):
    """A store could not be written or read as asked; the message says why."""


class StoreExistsError(StoreError, OutputExistsError):
    """The store folder already exists (or holds other files) and was not to be replaced."""


def shapes_key(names: Sequence[str], shapes: Sequence[Sequence[int]]) -> str:
    """A short stable hash of a layer layout (names and delta-W shapes, not ranks)."""
    text = json.dumps([[n, [int(x) for x in s]] for n, s in zip(names, shapes)])
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def label_column(name: str) -> str:
    """Label columns never shadow the store's own columns ("rank" -> "rank_label")."""
    return f"{name}_label" if name in RESERVED else str(name)


def read_info(path: Path) -> dict[str, Any]:
    """``store.json`` of the store at ``path``, refused unless it is a format this code reads."""
    info_path, index_path = path / INFO, path / INDEX
    if not info_path.is_file() or not index_path.is_file():
        raise StoreError(f"{path} is not a loralens store (no {INFO} / {INDEX})")
    info = json.loads(info_path.read_text())
    if info.get("format") != FORMAT or int(info.get("version", 0)) > VERSION:
        raise StoreError(f"{path}: unsupported store format {info.get('format')!r}")
    return info


def info_layers(info: Mapping[str, Any]) -> tuple[list[str], list[tuple[int, int]]]:
    """Layer names and delta-W shapes (out, in) recorded in ``store.json``."""
    names = [la["name"] for la in info["layers"]]
    shapes = [(int(la["out"]), int(la["in"])) for la in info["layers"]]
    return names, shapes


def is_rank_major(info: Mapping[str, Any]) -> bool:
    """Whether rows hold U^T, V^T (version 2) rather than U, V (version 1)."""
    return int(info.get("version", 1)) >= 2


def flatten_row(lora: LoRA, dtype: np.dtype, rank_major: bool) -> np.ndarray:
    """One LoRA as a store row: every layer's U then V, flattened (transposed if rank-major)."""
    parts = []
    for layer in lora.layers:
        for f in (layer.U, layer.V):
            f = f.detach().to(torch.float32).cpu()
            parts.append((f.T if rank_major else f).numpy().reshape(-1))
    return np.concatenate(parts).astype(dtype, copy=False)


def row_offsets(
    shapes: Sequence[tuple[int, int]], ranks: Sequence[int]
) -> list[tuple[int, int, int, int]]:
    """Per layer (u_start, v_start, v_end, r) offsets inside a row with these ranks."""
    out, pos = [], 0
    for (o, i), r in zip(shapes, ranks):
        r = int(r)
        out.append((pos, pos + o * r, pos + o * r + i * r, r))
        pos += (o + i) * r
    return out


def factor_view(flat: torch.Tensor, n: int, r: int, rank_major: bool) -> torch.Tensor:
    """(B, n, r) factors from (B, n * r) rows stored rank-major (U^T) or row-major (U)."""
    B = flat.shape[0]  # explicit: a rank-0 factor has no elements to infer it from
    return flat.view(B, r, n).mT if rank_major else flat.view(B, n, r)


def write_safetensors(path: Path, tensors: Mapping[str, np.ndarray], metadata: dict) -> None:
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


def map_safetensors(path: Path) -> dict[str, np.ndarray]:
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
