"""An index folder's record, ``index.json``, and the files it vouches for, read as untrusted
input: the record is checked against its schema (known keys and version, unique ids that are
names inside the store, a store path that is a store, a layout and embedding that give its
dimension), and each file is read only if it is a regular file (never through a link) of the
size the record gives, then checked against the record's sha256 before it is parsed.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import numpy as np

from loralens.atomic import SpecialFileError, open_regular
from loralens.errors import InputError
from loralens.jsonio import dumps, json_safe, read_json_object
from loralens.search.embed import RUN, UNSUPERVISED

FORMAT, VERSION = "loralens-index", 2
INDEX_JSON, VECTORS, GRAPH = "index.json", "vectors.safetensors", "hnsw.bin"
FILES = (INDEX_JSON, VECTORS, GRAPH)
METRIC = "euclidean (standardized)"
#: Largest index.json read (compact: the ids and three label columns of ~400,000 LoRAs), and
#: the most arrays and objects in it (each layer's shape is one): parsing a hostile record
#: then takes at most ~0.5 GiB, 12 bytes of strings or numbers per byte of text.
MAX_RECORD_BYTES, MAX_CONTAINERS = 32 * 2**20, 2**20
#: Room in vectors.safetensors beyond its arrays' bytes: the safetensors header.
MAX_HEADER_BYTES = 4096
#: Largest embedding dimension an index may record.
MAX_DIM = 2**20

_KEYS = {
    "format",
    "version",
    "store",
    "embedding",
    "layout",
    "n",
    "dim",
    "metric",
    "backend",
    "ids",
    "labels",
    "files",
}
_HNSW_KEYS = {"hnsw", "recall_at_10_vs_exact"}
_EMBEDDING_KEYS = {UNSUPERVISED: {"kind", "k"}, RUN: {"kind", "run", "model", "checkpoint_sha256"}}
_SHA256 = re.compile(r"[0-9a-f]{64}")
_RESERVED_LABELS = {"adapter", "distance", "query"}


class SearchIndexError(InputError):
    """An index folder that cannot be read, or that does not fit the query."""


def _int(v: Any, lo: int, hi: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _name_in_store(v: Any) -> bool:
    """Whether ``v`` is an adapter name as a store holds it: a relative path inside the store's
    folder, in canonical form (no ``..``, not absolute, no ``./`` or doubled ``/``)."""
    if not isinstance(v, str) or not v.strip() or "\0" in v:
        return False
    p = PurePosixPath(v)
    return not p.is_absolute() and ".." not in p.parts and os.path.normpath(v) == v


def vectors_bytes(n: int, dim: int) -> tuple[int, int]:
    """The least and most bytes a vectors file of ``n`` x ``dim`` float32 vectors (and the mean
    and std, at most float64) may hold."""
    low = 4 * n * dim
    return low, low + 16 * dim + MAX_HEADER_BYTES


def record_problem(meta: dict[str, Any]) -> str:
    """What is wrong with an index record (empty when nothing): the first problem found."""
    if meta.get("format") != FORMAT:
        return f"not a loralens index (format {meta.get('format')!r}, expected {FORMAT!r})"
    version = meta.get("version")
    if version == 1:
        return (
            "made by an older loralens, before indexes recorded the sha256 of their vectors, "
            "so it cannot be checked: rebuild it with `loralens index`"
        )
    if version != VERSION:
        return f"version {version!r}, but this loralens reads version {VERSION} indexes"
    backend = meta.get("backend")
    keys = _KEYS | (_HNSW_KEYS if backend == "hnsw" else set())
    if unknown := sorted(set(meta) - keys):
        return f"unknown key(s) {unknown}"
    if missing := sorted(keys - set(meta)):
        return f"missing key(s) {missing}"
    n, dim = meta["n"], meta["dim"]
    for check in (_counts, _ids, _labels, _layout, _embedding, _store, _files, _backend):
        if problem := check(meta, n, dim):
            return problem
    return ""


def record_text(meta: dict[str, Any], where: str) -> str:
    """``meta`` as the text of an index.json, refused (naming ``where``) unless it can be read
    back: valid by the schema, within the size and container caps."""
    text = dumps(meta, compact=True) + "\n"
    problem = record_problem(json_safe(meta))
    if len(text.encode()) > MAX_RECORD_BYTES:
        problem = f"its ids and labels take more than {MAX_RECORD_BYTES // 2**20} MiB"
    elif text.count("[") + text.count("{") > MAX_CONTAINERS:
        problem = f"its record holds more than {MAX_CONTAINERS} arrays and objects"
    if problem:
        raise SearchIndexError(f"{where}: {problem}")
    return text


def _counts(meta: dict[str, Any], n: Any, dim: Any) -> str:
    if not _int(n, 1, MAX_RECORD_BYTES):
        return f"n is {n!r}, not a count of LoRAs"
    if not _int(dim, 1, MAX_DIM):
        return f"dim is {dim!r}, not a dimension (1 to {MAX_DIM})"
    if meta["metric"] != METRIC:
        return f"metric {meta['metric']!r}, expected {METRIC!r}"
    return ""


def _ids(meta: dict[str, Any], n: int, dim: int) -> str:
    ids = meta["ids"]
    if not isinstance(ids, list) or len(ids) != n:
        return f"ids is not a list of the {n} LoRAs' names"
    bad = [i for i in ids if not _name_in_store(i)][:1]
    if bad:
        return f"id {bad[0]!r} is not the name of an adapter inside the store"
    twice = [i for i, count in Counter(ids).items() if count > 1][:1]
    return f"id {twice[0]!r} appears more than once" if twice else ""


def _labels(meta: dict[str, Any], n: int, dim: int) -> str:
    labels = meta["labels"]
    if not isinstance(labels, dict):
        return "labels is not an object of label columns"
    for name, column in labels.items():
        if name in _RESERVED_LABELS or not name:
            return f"label column {name!r} is a name search results use for themselves"
        if not isinstance(column, list) or len(column) != n:
            return f"label column {name!r} is not a list of {n} values"
        if not all(v is None or isinstance(v, (str, int, float)) for v in column):
            return f"label column {name!r} holds values that are not numbers or text"
    return ""


def _layout(meta: dict[str, Any], n: int, dim: int) -> str:
    layout = meta["layout"]
    if not isinstance(layout, dict) or set(layout) != {"names", "shapes"}:
        return "layout is not {names, shapes}"
    names, shapes = layout["names"], layout["shapes"]
    if not isinstance(names, list) or not names or not all(isinstance(x, str) for x in names):
        return "layout names are not a list of layer names"
    if len(set(names)) != len(names):
        return "layout names a layer twice"
    if not isinstance(shapes, list) or len(shapes) != len(names):
        return "layout shapes are not one (out, in) per layer"
    if not all(
        isinstance(s, list) and len(s) == 2 and all(_int(d, 1, 2**31) for d in s) for s in shapes
    ):
        return "layout shapes are not pairs of positive sizes"
    return ""


def _embedding(meta: dict[str, Any], n: int, dim: int) -> str:
    emb = meta["embedding"]
    kind = emb.get("kind") if isinstance(emb, dict) else None
    if kind not in _EMBEDDING_KEYS or set(emb) != _EMBEDDING_KEYS[kind]:
        return f"embedding is not one of {sorted(_EMBEDDING_KEYS)} with its keys"
    if kind == UNSUPERVISED:
        shapes = meta["layout"]["shapes"]
        k = emb["k"]
        if not _int(k, 1, max(min(s) for s in shapes)):
            return f"embedding k is {k!r}, not a rank of its layout"
        if dim != len(shapes) * (k + 1):
            return f"dim is {dim}, but {len(shapes)} layers of k={k} give {len(shapes) * (k + 1)}"
        return ""
    if not isinstance(emb["run"], str) or not os.path.isabs(emb["run"]):
        return f"embedding run {emb['run']!r} is not an absolute path"
    if not isinstance(emb["model"], str):
        return "embedding model is not a model name"
    if not isinstance(emb["checkpoint_sha256"], str) or not _SHA256.fullmatch(
        emb["checkpoint_sha256"]
    ):
        return "embedding checkpoint_sha256 is not a sha256"
    return ""


def _store(meta: dict[str, Any], n: int, dim: int) -> str:
    store = meta["store"]
    if not isinstance(store, str) or not os.path.isabs(store) or os.path.normpath(store) != store:
        return f"store {store!r} is not an absolute path"
    if os.path.lexists(store) and not os.path.isfile(os.path.join(store, "store.json")):
        return f"store {store} is not a loralens store (no store.json)"
    return ""


def _file_entry(entry: Any, low: int, high: int) -> bool:
    return (
        isinstance(entry, dict)
        and set(entry) == {"bytes", "sha256"}
        and _int(entry["bytes"], low, high)
        and isinstance(entry["sha256"], str)
        and bool(_SHA256.fullmatch(entry["sha256"]))
    )


def _files(meta: dict[str, Any], n: int, dim: int) -> str:
    files = meta["files"]
    graph = meta["backend"] == "hnsw"
    names = {VECTORS, GRAPH} if graph else {VECTORS}
    if not isinstance(files, dict) or set(files) != names:
        return f"files does not list {sorted(names)}"
    if not _file_entry(files[VECTORS], *vectors_bytes(n, dim)):
        return f"files' {VECTORS} is not {{bytes, sha256}} for {n} x {dim} vectors"
    if graph and not _file_entry(files[GRAPH], 1, 2**62):
        return f"files' {GRAPH} is not {{bytes, sha256}}"
    return ""


def _backend(meta: dict[str, Any], n: int, dim: int) -> str:
    if meta["backend"] == "exact":
        return ""
    if meta["backend"] != "hnsw":
        return f"backend {meta['backend']!r}, expected 'exact' or 'hnsw'"
    hnsw, recall = meta["hnsw"], meta["recall_at_10_vs_exact"]
    if not isinstance(hnsw, dict) or set(hnsw) != {"M", "ef_construction", "ef"}:
        return "hnsw is not {M, ef_construction, ef}"
    if not all(_int(v, 1, 4096) for v in hnsw.values()):
        return "hnsw settings are not small positive integers"
    if not isinstance(recall, (int, float)) or not 0 <= recall <= 1:
        return f"recall_at_10_vs_exact is {recall!r}, not a share"
    return ""


# ---------------------------------------------------------------------------------------------
# the folder's files, each read by the record


@contextmanager
def index_folder(path: Path) -> Iterator[int]:
    """The index folder ``path`` open as a directory (its files are opened relative to it, so
    a swap of the folder's name cannot mix two indexes)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SearchIndexError(f"{path}: no such index folder") from None
    except NotADirectoryError:
        raise SearchIndexError(f"{path}: not a loralens index (not a folder)") from None
    except OSError as e:
        raise SearchIndexError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        yield fd
    finally:
        os.close(fd)


def read_record(path: Path, dir_fd: int) -> dict[str, Any]:
    """The checked record of the index folder ``path`` (open as ``dir_fd``)."""
    where = path / INDEX_JSON
    meta = read_json_object(
        where,
        error=SearchIndexError,
        max_bytes=MAX_RECORD_BYTES,
        max_containers=MAX_CONTAINERS,
        dir_fd=dir_fd,
        follow=False,
    )
    if problem := record_problem(meta):
        raise SearchIndexError(f"{where}: {problem}")
    return meta


@contextmanager
def _sized(path: Path, dir_fd: int, name: str, meta: dict[str, Any]) -> Iterator[BinaryIO]:
    """The file ``name`` of the index folder ``path``, open, if it is a regular file (not a
    link) of the size the record gives."""
    where, recorded = path / name, meta["files"][name]["bytes"]
    try:
        f = open_regular(name, dir_fd=dir_fd, follow=False)
    except SpecialFileError as e:
        raise SearchIndexError(f"{where}: {e.kind}, not a regular file") from None
    except FileNotFoundError:
        raise SearchIndexError(f"{where}: missing") from None
    except OSError as e:
        raise SearchIndexError(f"{where}: cannot be read ({e.strerror or e})") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        if size != recorded:
            raise SearchIndexError(f"{where}: {size} bytes, but {INDEX_JSON} records {recorded}")
        yield f


def _same_sha256(where: Path, digest: Any, meta: dict[str, Any]) -> None:
    if digest.hexdigest() != meta["files"][where.name]["sha256"]:
        raise SearchIndexError(
            f"{where}: its sha256 differs from the one {INDEX_JSON} records (damaged or "
            "changed since the index was built: rebuild it with `loralens index`)"
        )


def read_checked(path: Path, dir_fd: int, name: str, meta: dict[str, Any]) -> bytes:
    """The bytes of the file ``name`` of the index folder ``path``: a regular file (not a
    link) of the size and sha256 the record gives."""
    with _sized(path, dir_fd, name, meta) as f:
        data = f.read()
    _same_sha256(path / name, hashlib.sha256(data), meta)
    return data


@contextmanager
def checked_file(path: Path, dir_fd: int, name: str, meta: dict[str, Any]) -> Iterator[BinaryIO]:
    """:func:`read_checked` for a file too large to hold twice: checked in chunks, then given
    open (see :func:`opened_name`)."""
    with _sized(path, dir_fd, name, meta) as f:
        digest = hashlib.sha256()
        while chunk := f.read(8 * 2**20):
            digest.update(chunk)
        _same_sha256(path / name, digest, meta)
        f.seek(0)
        yield f


def read_vectors(path: Path, dir_fd: int, meta: dict[str, Any]) -> dict[str, np.ndarray]:
    """The checked arrays of the index's vectors file: ``vectors`` (n, dim) float32, and the
    ``mean`` and ``std`` (dim,) that standardize queries, all finite, std positive."""
    from safetensors.numpy import load

    where, n, dim = path / VECTORS, meta["n"], meta["dim"]
    data = read_checked(path, dir_fd, VECTORS, meta)
    try:
        arrays = load(data)
    except Exception as e:  # whatever the safetensors parser raises on a damaged file
        raise SearchIndexError(f"{where}: not a safetensors file ({e})") from None
    shapes = {"vectors": (n, dim), "mean": (dim,), "std": (dim,)}
    if set(arrays) != set(shapes):
        raise SearchIndexError(f"{where}: holds {sorted(arrays)}, expected {sorted(shapes)}")
    for key, shape in shapes.items():
        a = arrays[key]
        if a.shape != shape or a.dtype.kind != "f":
            raise SearchIndexError(
                f"{where}: {key} is {a.dtype} {a.shape}, expected float {shape} "
                f"(the n and dim of {INDEX_JSON})"
            )
        if not np.isfinite(a).all():
            raise SearchIndexError(f"{where}: {key} holds NaN/inf values")
    if not (arrays["std"] > 0).all() or arrays["vectors"].dtype != np.float32:
        raise SearchIndexError(f"{where}: std is not positive, or vectors are not float32")
    return arrays


def opened_name(f: BinaryIO, where: Path) -> str:
    """A name under which a library can open the checked file ``f`` itself (its open
    descriptor on Linux, so that the name cannot be swapped after the check)."""
    proc = f"/proc/self/fd/{f.fileno()}"
    return proc if os.path.exists(proc) else str(where)


def is_index_folder(path: Path) -> bool:
    """Whether ``path`` is a folder holding only an index's files, its record of this format
    (any version): what ``loralens index --overwrite`` may replace."""
    try:
        entries = os.listdir(path)
        if INDEX_JSON not in entries or not set(entries) <= set(FILES):
            return False
        meta = read_json_object(
            path / INDEX_JSON,
            max_bytes=MAX_RECORD_BYTES,
            max_containers=MAX_CONTAINERS,
            follow=False,
        )
    except (OSError, InputError):
        return False
    regular = all(os.path.isfile(path / e) and not os.path.islink(path / e) for e in entries)
    return regular and meta.get("format") == FORMAT


__all__ = [
    "FILES",
    "FORMAT",
    "GRAPH",
    "INDEX_JSON",
    "MAX_RECORD_BYTES",
    "METRIC",
    "VECTORS",
    "VERSION",
    "SearchIndexError",
    "checked_file",
    "index_folder",
    "is_index_folder",
    "opened_name",
    "read_checked",
    "read_record",
    "read_vectors",
    "record_problem",
    "record_text",
    "vectors_bytes",
]
