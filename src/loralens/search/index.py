"""Nearest-adapter search: an index of a store's embeddings (``learn.embed``), queried by adapters.

An index folder holds ``index.json`` (how the vectors were made: the run and its checkpoint hash,
or the unsupervised features; the layout, ids and labels of the store), ``vectors.safetensors``
(standardized float32 vectors and the mean/std that standardize queries) and, for large stores,
``hnsw.bin``: an HNSW graph (hnswlib, the ``loralens[search]`` extra) whose sha256 is checked
before it is read. Search is exact (Euclidean, ties by row) unless the index holds a graph;
the graph's recall@10 against exact search is measured when it is built and recorded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loralens.atomic import atomic_dir, file_sha256
from loralens.errors import InputError, OutputExistsError, SettingsError
from loralens.jsonio import json_safe, write_json
from loralens.lora import LayerSpec
from loralens.search.embed import RUN, Embedder, read_adapters
from loralens.store import LoRAStore

FORMAT, VERSION = "loralens-index", 1
INDEX_JSON, VECTORS, GRAPH = "index.json", "vectors.safetensors", "hnsw.bin"
#: Stores with more LoRAs than this get an approximate (HNSW) index when hnswlib is installed.
APPROX_ABOVE = 50_000
#: HNSW settings (hnswlib's M, ef_construction, ef at query time) and queries for its recall.
HNSW_M, HNSW_EF_BUILD, HNSW_EF = 16, 200, 128
RECALL_QUERIES = 1000


class SearchIndexError(InputError):
    """An index folder that cannot be read, or that does not fit the query."""


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
    hnswlib is installed, else exact. Returns the index record (``index.json``)."""
    from safetensors.numpy import save_file

    out = Path(out)
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists (use --overwrite to replace it)")
    if out.exists() and not (out / INDEX_JSON).is_file():
        raise OutputExistsError(f"{out} exists and is not an index: not replacing it")
    store = data if isinstance(data, LoRAStore) else LoRAStore(data)
    emb = Embedder.of_run(run) if run is not None else Embedder.unsupervised(store.spec)
    raw = emb.store(store, batch_size=batch_size)
    mean, std = standardizer(raw)
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
        "metric": "euclidean (standardized)",
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
    if out.exists():
        import shutil

        shutil.rmtree(out)
    with atomic_dir(out) as tmp:
        save_file({"vectors": vectors, "mean": mean, "std": std}, str(tmp / VECTORS))
        if graph is not None:
            graph.save_index(str(tmp / GRAPH))
            meta["graph_sha256"] = file_sha256(tmp / GRAPH)[1]
        write_json(tmp / INDEX_JSON, meta)
    return json_safe({k: v for k, v in meta.items() if k not in ("ids", "labels")})


def load_index(path: str | os.PathLike) -> Index:
    """Read an index folder; refuse (:class:`SearchIndexError`) a damaged one, or one whose run's
    checkpoint changed since it was built (its vectors would not match new queries)."""
    import json

    from safetensors.numpy import load_file

    path = Path(path)
    try:
        meta = json.loads((path / INDEX_JSON).read_text())
        arrays = load_file(str(path / VECTORS))
    except (OSError, ValueError) as e:
        raise SearchIndexError(f"{path}: not a loralens index ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise SearchIndexError(f"{path / INDEX_JSON}: not a loralens index (format {FORMAT!r})")
    vectors, n = arrays.get("vectors"), meta.get("n")
    if vectors is None or vectors.shape != (n, meta.get("dim")) or len(meta.get("ids", ())) != n:
        raise SearchIndexError(
            f"{path}: {VECTORS} does not hold the {n} vectors {INDEX_JSON} lists"
        )
    lay = meta["layout"]
    spec = LayerSpec(
        tuple(lay["names"]), tuple(map(tuple, lay["shapes"])), (0,) * len(lay["names"])
    )
    desc = meta["embedding"]
    if desc["kind"] == RUN:
        embedder = Embedder.of_run(desc["run"])
        if embedder.run_sha256 != desc["checkpoint_sha256"]:
            raise SearchIndexError(
                f"{path} was built with the run {desc['run']} as it was then; its checkpoint has "
                "changed since (retrained?), so new queries would not be comparable: rebuild it "
                "with `loralens index`"
            )
    else:
        embedder = Embedder.unsupervised(spec, desc["k"])
    embedder.spec = spec
    graph = None
    if meta.get("backend") == "hnsw":
        graph = _load_graph(path, meta)
    return Index(path, meta, vectors, arrays["mean"], arrays["std"], embedder, graph)


def _load_graph(path: Path, meta: dict[str, Any]):
    try:
        import hnswlib
    except ImportError:
        raise SearchIndexError(
            f"{path} is an approximate index: reading it needs hnswlib "
            "(pip install 'loralens[search]')"
        ) from None
    if file_sha256(path / GRAPH)[1] != meta.get("graph_sha256"):
        raise SearchIndexError(
            f"{path / GRAPH}: its sha256 differs from the one {INDEX_JSON} records"
        )
    graph = hnswlib.Index(space="l2", dim=int(meta["dim"]))
    graph.load_index(str(path / GRAPH), max_elements=int(meta["n"]))
    graph.set_ef(HNSW_EF)
    return graph


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
]
