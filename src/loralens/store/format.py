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
import itertools
import json
import math
import mmap
import os
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loralens.atomic import SpecialFileError, open_regular
from loralens.errors import InputError, OutputExistsError
from loralens.lora import row_blocks

FORMAT = "loralens-store"
VERSION = 2  # 2: rank-major factors; 1: row-major (read and appended to as such)
INDEX = "index.parquet"
INFO = "store.json"
CHECKSUMS = "checksums"  # in store.json: file name -> {bytes, sha256}, recorded when written
SHARD_PATTERN = "weights-{:05d}.safetensors"
SHARD_GLOB = "weights-*.safetensors"
DEFAULT_SHARD_BYTES = 512 * 2**20
MAX_HEADER_BYTES = 100 * 2**20
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


class StoreError(InputError):
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


def check_label_names(names: Sequence[str]) -> None:
    """Refuse labels that :func:`label_column` would store under one name (``rank`` beside
    ``rank_label``): one of them would lose its values."""
    seen: dict[str, str] = {}
    for name in map(str, names):
        col = label_column(name)
        if col in seen:
            raise StoreError(
                f"label columns {seen[col]!r} and {name!r} would both be stored as {col!r} "
                f"(a label named like a store column ({', '.join(RESERVED)}) gets the suffix "
                "'_label'); rename one of them"
            )
        seen[col] = name


def read_info(path: Path, *, dir_fd: int | None = None) -> dict[str, Any]:
    """``store.json`` of the store at ``path`` (opened as the directory ``dir_fd`` if given),
    checked to be a store description this code reads (a :class:`StoreError` naming the file
    otherwise)."""
    info_path = path / INFO
    for name in (INFO, INDEX):
        try:
            os.stat(
                name if dir_fd is not None else path / name, dir_fd=dir_fd, follow_symlinks=False
            )
        except FileNotFoundError:
            raise StoreError(f"{path} is not a loralens store (no {INFO} / {INDEX})") from None
    try:
        with open_regular(INFO if dir_fd is not None else info_path, dir_fd=dir_fd) as f:
            info = json.loads(f.read())
    except OSError as e:
        raise StoreError(os_message(info_path, e)) from None
    except (ValueError, RecursionError) as e:
        raise StoreError(f"{info_path}: not a readable store description ({e})") from None
    if not isinstance(info, dict):
        raise StoreError(f"{info_path}: not a store description (not a JSON object)")
    if info.get("format") != FORMAT:
        raise StoreError(f"{info_path}: unsupported store format {info.get('format')!r}")
    version = info.get("version", 1)
    if type(version) is not int or not 1 <= version <= VERSION:
        raise StoreError(f"{info_path}: unsupported store format version {version!r}")
    if info.get("dtype") not in NP_DTYPES:
        raise StoreError(f"{info_path}: dtype must be one of {sorted(NP_DTYPES)}")
    layers = info.get("layers")
    if not isinstance(layers, list) or not all(_is_layer(la) for la in layers):
        raise StoreError(f"{info_path}: 'layers' must list {{name, out, in}} of every layer")
    sums = info.get(CHECKSUMS, {})
    if not isinstance(sums, dict) or not all(_is_checksum(v) for v in sums.values()):
        raise StoreError(f"{info_path}: '{CHECKSUMS}' must map file names to {{bytes, sha256}}")
    return info


def os_message(path: Path, e: OSError) -> str:
    """One line naming ``path`` and why it could not be read."""
    if isinstance(e, SpecialFileError):
        return f"{path} is {e.kind}, not a regular file"
    return f"{path}: {e.strerror or e}"


def _get(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, dict) else None


def _is_count(x: Any) -> bool:
    return type(x) is int and x >= 0


def _is_layer(la: Any) -> bool:
    return (
        isinstance(la, dict)
        and isinstance(la.get("name"), str)
        and _is_count(la.get("out"))
        and _is_count(la.get("in"))
    )


def _is_checksum(entry: Any) -> bool:
    digest = _get(entry, "sha256")
    return (
        _is_count(_get(entry, "bytes"))
        and isinstance(digest, str)
        and len(digest) == 64
        and all(c in "0123456789abcdef" for c in digest)
    )


def checksum_of(info: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    """The {bytes, sha256} ``store.json`` records for file ``name`` (None for stores written
    before checksums were recorded, or for shards such a store held before an append)."""
    return info.get(CHECKSUMS, {}).get(name)


def info_layers(info: Mapping[str, Any]) -> tuple[list[str], list[tuple[int, int]]]:
    """Layer names and delta-W shapes (out, in) recorded in ``store.json``."""
    names = [la["name"] for la in info["layers"]]
    shapes = [(int(la["out"]), int(la["in"])) for la in info["layers"]]
    return names, shapes


def is_rank_major(info: Mapping[str, Any]) -> bool:
    """Whether rows hold U^T, V^T (version 2) rather than U, V (version 1)."""
    return int(info.get("version", 1)) >= 2


def factor_blocks(f: torch.Tensor, dtype: np.dtype, rank_major: bool) -> Iterator[np.ndarray]:
    """One (n x r) factor as a row stores it: U^T (r x n) if rank-major, else U, row-major, in
    ``dtype`` (through float32), as contiguous blocks of rows in order: never a whole copy."""
    f = f.detach()
    for block in row_blocks(f.T if rank_major else f):
        yield np.ascontiguousarray(block.to(torch.float32).cpu().numpy(), dtype=dtype)


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


def write_safetensors(
    path: Path,
    tensors: Mapping[str, tuple[np.dtype, tuple[int, ...]]],
    data: Iterable[bytes | memoryview],
    metadata: dict,
) -> dict[str, Any]:
    """Write a safetensors file (the documented format: u64 header length, JSON header, data)
    of ``tensors`` (name -> dtype, shape) whose bytes, in that order, ``data`` gives a chunk at
    a time; returns its checksum entry {bytes, sha256}, hashed as it is written."""
    header: dict[str, Any] = {"__metadata__": {k: str(v) for k, v in metadata.items()}}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {
            "dtype": _ST_NAMES[np.dtype(dtype)],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data section
    digest, size = hashlib.sha256(), 0
    with open(path, "wb") as f:
        for chunk in itertools.chain((struct.pack("<Q", len(raw)), raw), data):
            f.write(chunk)
            digest.update(chunk)
            size += memoryview(chunk).nbytes
        f.flush()
        os.fsync(f.fileno())
    if size != 8 + len(raw) + offset:
        raise ValueError(f"{path}: {size - 8 - len(raw)} data bytes for tensors of {offset}")
    return {"bytes": size, "sha256": digest.hexdigest()}


@dataclass
class Shard:
    """A shard opened for reading: its parsed header, checked, and the whole file mapped."""

    path: Path
    size: int
    start: int
    tensors: dict[str, tuple[np.dtype, tuple[int, ...], int]]  # name -> (dtype, shape, offset)
    metadata: dict[str, Any]
    data: mmap.mmap

    def arrays(self) -> dict[str, np.ndarray]:
        """Every tensor as a read-only numpy view of the mapped file."""
        out = {}
        for name, (dtype, shape, b) in self.tensors.items():
            if math.prod(shape) == 0:
                out[name] = np.zeros(shape, dtype=dtype)
            else:
                out[name] = np.ndarray(shape, dtype, buffer=self.data, offset=self.start + b)
        return out


def open_shard(path: Path, *, dir_fd: int | None = None) -> Shard:
    """Open a shard (by its name in the directory ``dir_fd`` if given), check its header
    (every tensor of a supported dtype lies inside the file) and map it; a
    :class:`StoreError` naming the shard otherwise: missing, empty, truncated, malformed."""
    try:
        with open_regular(path.name if dir_fd is not None else path, dir_fd=dir_fd) as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) < 8:
                raise StoreError(f"{path}: {size} bytes, too short to be a safetensors shard")
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise StoreError(f"{path}: implausible safetensors header ({n} bytes)")
            header = json.loads(f.read(n))
            data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except StoreError:
        raise
    except FileNotFoundError:
        raise StoreError(f"{path}: missing (the index has rows in it)") from None
    except OSError as e:
        raise StoreError(os_message(path, e)) from None
    except (ValueError, RecursionError) as e:
        raise StoreError(f"{path}: not a readable safetensors shard ({e})") from None
    if not isinstance(header, dict):
        raise StoreError(f"{path}: the safetensors header is not a JSON object")
    meta = header.pop("__metadata__", {})
    out = {}
    for name, h in header.items():
        out[name] = _tensor_entry(path, name, h, size - 8 - n)
    return Shard(path, size, 8 + n, out, meta if isinstance(meta, dict) else {}, data)


def _tensor_entry(path: Path, name: str, h: Any, data_bytes: int) -> tuple:
    dtype = _ST_DTYPES.get(_get(h, "dtype"))
    if dtype is None:
        raise StoreError(f"{path}: tensor {name} has unsupported dtype {_get(h, 'dtype')!r}")
    shape, offsets = _get(h, "shape"), _get(h, "data_offsets")
    if not (
        isinstance(shape, list)
        and all(_is_count(x) for x in shape)
        and isinstance(offsets, list)
        and len(offsets) == 2
        and all(_is_count(x) for x in offsets)
    ):
        raise StoreError(f"{path}: tensor {name} has a malformed shape or data_offsets")
    b, e = offsets
    if e > data_bytes or e - b != math.prod(shape) * np.dtype(dtype).itemsize:
        raise StoreError(f"{path}: tensor {name} lies outside the file (truncated shard?)")
    return np.dtype(dtype), tuple(shape), b
