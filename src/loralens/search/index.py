"""Nearest-adapter search: an index of a store's embeddings (``learn.embed``), queried by adapters.

An index folder holds ``index.json`` (how the vectors were made: the run and its checkpoint hash,
or the unsupervised features; the layout, ids and labels of the store; the size and sha256 of
every other file), ``vectors.safetensors`` (standardized float32 vectors and the mean/std that
standardize queries) and, for large stores, ``hnsw.bin``: an HNSW graph (hnswlib, the
``loralens[search]`` extra). Everything is checked before it is used (:mod:`.manifest`). Search
is exact (Euclidean, ties by row) unless the index holds a graph; the graph's recall@10 against
exact search is measured when it is built and recorded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loralens.atomic import file_sha256, new_dir, replaceable, write_file_atomic
from loralens.errors import InputError, SettingsError
from loralens.jsonio import json_safe
from loralens.lora import LayerSpec
from loralens.search.embed import RUN, Embedder, read_adapters
from loralens.search.manifest import (
    FORMAT,
    GRAPH,
    INDEX_JSON,
    METRIC,
    VECTORS,
    VERSION,
    SearchIndexError,
    checked_file,
    index_folder,
    is_index_folder,
    opened_name,
    read_record,
    read_vectors,
    record_text,
)
from loralens.store import LoRAStore

#: Stores with more LoRAs than this get an approximate (HNSW) index when hnswlib is installed.
APPROX_ABOVE = 50_000
#: HNSW settings (hnswlib's M, ef_construction, ef at query time) and queries for its recall.
HNSW_M, HNSW_EF_BUILD, HNSW_EF = 16, 200, 128
RECALL_QUERIES = 1000


def exact_knn(base: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(distances, rows), each (M, k'), k' = min(k, N): Euclidean, nearest first, ties by row."""
    b, q = base.astype(np.float64), queries.astype(np.float64)
    d2 = (q * q).sum(1)[:, None] - 2 * q @ b.T + (b * b).sum(1)[None, :]
    d2 = np.maximum(d2, 0)
    k = min(k, len(b))
    kth = np.partition(d2, k - 1, axis=1)[:, k - 1 : k]  # linear time; then sort only those
    rows = np.empty((len(q), k), dtype=np.int64)
    for i, near in enumerate(d2 <= kth):  # every row tied with the k-th too: ties go by row
        cand = np.flatnonzero(near)
        rows[i] = cand[np.argsort(d2[i, cand], kind="stable")[:k]]
    return np.sqrt(np.take_along_axis(d2, rows, axis=1)), rows


def standardizer(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std of indexed vectors (std 1 where a dimension is constant), so
    that no dimension's unit decides the distances."""
    mean, std = raw.mean(0), raw.std(0)
    return mean, np.where(std > 1e-6 * max(float(std.max(initial=0)), 1e-30), std, 1.0)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each row's true neighbours (``truth``) that ``found`` also lists."""
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth)]))


def _hnsw(vectors: np.ndarray, seed: int):
    try:
        import hnswlib
    except ImportError:
        return None
    graph = hnswlib.Index(space="l2", dim=vectors.shape[1])
    graph.init_index(len(vectors), ef_construction=HNSW_EF_BUILD, M=HNSW_M, random_seed=seed)
    graph.set_num_threads(1)  # the same graph for the same seed
    graph.add_items(vectors, np.arange(len(vectors)))
    graph.set_ef(HNSW_EF)
    return graph


@dataclass
class Index:
    """An index folder read back: its record, vectors and standardization, graph (or None) and
    the embedder that turns query adapters into comparable vectors."""

    path: Path
    meta: dict[str, Any]
    vectors: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    embedder: Embedder
    graph: Any = None

    def nearest(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(distances, rows) of the ``k`` nearest indexed LoRAs to raw query vectors."""
        if queries.shape[1] != self.vectors.shape[1]:
            raise SearchIndexError(
                f"{self.path / INDEX_JSON}: records {self.vectors.shape[1]} dimensions, but its "
                f"embedding gives queries {queries.shape[1]}"
            )
        q = ((queries - self.mean) / self.std).astype(np.float32)
        if self.graph is None:
            return exact_knn(self.vectors, q, k)
        rows, d2 = self.graph.knn_query(q, k=min(k, len(self.vectors)))
        return np.sqrt(np.maximum(d2, 0)), rows.astype(np.int64)


def build_index(
    data: LoRAStore | str | os.PathLike,
    out: str | os.PathLike,
    *,
    run: Any = None,
    approximate: bool | None = None,
    overwrite: bool = False,
    seed: int = 0,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Embed every LoRA of ``data`` (with ``run``'s model, or unsupervised when None) and write
    an index folder at ``out``. ``approximate`` None: HNSW above ``APPROX_ABOVE`` LoRAs when
    hnswlib is installed, else exact. An existing ``out`` is replaced only with ``overwrite``
    and only if it is an index folder. Returns the index record (``index.json``)."""
    from safetensors.numpy import save_file

    out = Path(out)
    replace = replaceable(
        out, overwrite=overwrite, ours=is_index_folder, what="a loralens index", folder=True
    )
    store = data if isinstance(data, LoRAStore) else LoRAStore(data)
    emb = Embedder.of_run(run) if run is not None else Embedder.unsupervised(store.spec)
    raw = emb.store(store, batch_size=batch_size)
    mean, std = standardizer(raw) if emb.per_dimension else (raw.mean(0), np.ones(raw.shape[1]))
    vectors = ((raw - mean) / std).astype(np.float32)
    if approximate is None:
        approximate = len(store) > APPROX_ABOVE
    graph = _hnsw(vectors, seed) if approximate else None
    if approximate and graph is None:
        raise SettingsError("an approximate index needs hnswlib: pip install 'loralens[search]'")
    meta: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "store": str(Path(store.path).resolve()),
        "embedding": emb.describe(),
        "layout": {"names": list(store.names), "shapes": [list(s) for s in store.shapes]},
        "n": len(store),
        "dim": int(vectors.shape[1]),
        "metric": METRIC,
        "backend": "hnsw" if graph is not None else "exact",
        "ids": store.ids,
        "labels": {c: store.index[c].tolist() for c in store.label_columns},
    }
    if graph is not None:
        sample = np.random.default_rng(seed).permutation(len(vectors))[:RECALL_QUERIES]
        truth = exact_knn(vectors, vectors[sample], 10)[1]
        found = graph.knn_query(vectors[sample], k=min(10, len(vectors)))[0]
        meta["hnsw"] = {"M": HNSW_M, "ef_construction": HNSW_EF_BUILD, "ef": HNSW_EF}
        meta["recall_at_10_vs_exact"] = recall_at_k(found, truth)
    with new_dir(out, replace=replace) as tmp:
        save_file({"vectors": vectors, "mean": mean, "std": std}, str(tmp / VECTORS))
        if graph is not None:
            graph.save_index(str(tmp / GRAPH))
        meta["files"] = {f.name: _entry(f) for f in (tmp / VECTORS, tmp / GRAPH) if f.exists()}
        write_file_atomic(tmp / INDEX_JSON, record_text(meta, f"cannot index {store.path}"))
    return json_safe({k: v for k, v in meta.items() if k not in ("ids", "labels")})


def _entry(path: Path) -> dict[str, Any]:
    size, sha256 = file_sha256(path)
    return {"bytes": size, "sha256": sha256}


def load_index(path: str | os.PathLike) -> Index:
    """Read an index folder, checking everything (:mod:`.manifest`); refuse
    (:class:`SearchIndexError`, naming the file) a damaged one, or one whose run's checkpoint
    changed since it was built (its vectors would not match new queries)."""
    path = Path(path)
    with index_folder(path) as dir_fd:
        meta = read_record(path, dir_fd)
        embedder = _embedder(path, meta)
        arrays = read_vectors(path, dir_fd, meta)
        graph = _load_graph(path, dir_fd, meta) if meta["backend"] == "hnsw" else None
    return Index(path, meta, arrays["vectors"], arrays["mean"], arrays["std"], embedder, graph)


def _embedder(path: Path, meta: dict[str, Any]) -> Embedder:
    """The embedder that makes queries comparable with the index's vectors, of its layout."""
    lay = meta["layout"]
    spec = LayerSpec(
        tuple(lay["names"]), tuple(map(tuple, lay["shapes"])), (0,) * len(lay["names"])
    )
    desc = meta["embedding"]
    if desc["kind"] != RUN:
        return Embedder.unsupervised(spec, desc["k"])
    try:
        embedder = Embedder.of_run(desc["run"])
    except InputError as e:
        raise SearchIndexError(f"{path / INDEX_JSON}: its run cannot be loaded: {e}") from None
    if embedder.run_sha256 != desc["checkpoint_sha256"]:
        raise SearchIndexError(
            f"{path} was built with the run {desc['run']} as it was then; its checkpoint has "
            "changed since (retrained?), so new queries would not be comparable: rebuild it "
            "with `loralens index`"
        )
    embedder.check(spec, f"{path / INDEX_JSON}: its layout")
    embedder.spec = spec
    return embedder


def _load_graph(path: Path, dir_fd: int, meta: dict[str, Any]):
    try:
        import hnswlib
    except ImportError:
        raise SearchIndexError(
            f"{path} is an approximate index: reading it needs hnswlib "
            "(pip install 'loralens[search]')"
        ) from None
    with checked_file(path, dir_fd, GRAPH, meta) as f:
        graph = hnswlib.Index(space="l2", dim=int(meta["dim"]))
        try:
            graph.load_index(opened_name(f, path / GRAPH), max_elements=int(meta["n"]))
        except Exception as e:  # whatever hnswlib raises on a graph it cannot read
            raise SearchIndexError(f"{path / GRAPH}: not an HNSW graph ({e})") from None
    if graph.get_current_count() != meta["n"]:
        raise SearchIndexError(f"{path / GRAPH}: does not hold the {meta['n']} vectors")
    graph.set_ef(HNSW_EF)
    return graph


def verify_index(path: str | os.PathLike) -> dict[str, Any]:
    """Check an index folder as search does (record schema, sizes and sha256 of its files,
    finite vectors, the graph, the run's checkpoint); returns what it holds, or raises
    :class:`SearchIndexError` naming the damaged file."""
    index = load_index(path)
    keep = ("n", "dim", "backend", "store", "embedding")
    return {"path": str(index.path), **{k: index.meta[k] for k in keep}}


def search(
    index: Index | str | os.PathLike, adapters: Sequence[str | os.PathLike], k: int = 10
) -> list[dict[str, Any]]:
    """For each adapter, its ``k`` nearest LoRAs of the index: ``{"query", "neighbors":
    [{"adapter", "distance", <label>: value, ...}]}`` (strict JSON). An adapter whose layers
    differ from the index's layout is refused, naming both."""
    index = index if isinstance(index, Index) else load_index(index)
    if k < 1:
        raise SettingsError(f"k must be at least 1, got {k}")
    loras = read_adapters(adapters)
    names = [str(a) for a in adapters]
    try:
        q = index.embedder.loras(loras, names)
    except ValueError as e:
        where = f"the index {index.path} was built from {index.meta['store']}"
        raise SearchIndexError(f"{e} ({where})") from None
    dist, rows = index.nearest(q, k)
    ids, labels = index.meta["ids"], index.meta["labels"]
    return json_safe(
        [
            {
                "query": name,
                "neighbors": [
                    {
                        "adapter": ids[r],
                        "distance": float(d),
                        **{c: v[r] for c, v in labels.items()},
                    }
                    for d, r in zip(dr, rr)
                ],
            }
            for name, dr, rr in zip(names, dist, rows)
        ]
    )


__all__ = [
    "Index",
    "SearchIndexError",
    "build_index",
    "exact_knn",
    "load_index",
    "recall_at_k",
    "search",
    "standardizer",
    "verify_index",
]
