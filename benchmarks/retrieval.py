"""Adapter retrieval measured like W2T: queries from each run's test split against an index of
the rest of the store; relevance = shared training data.

    python benchmarks/retrieval.py --data STORE --bench BENCH_DIR --out retrieval.json

BENCH_DIR is a ``loralens benchmark --out`` folder: its runs (``runs/<family>/<model>/seed<k>``)
give the embeddings (``model.embed``, the representation before the head) and the test split of
each seed. Beside them: the unsupervised spectral embedding (``loralens index --unsupervised``),
a dense-ΔW baseline (every ΔW flattened) and random rankings. Every embedding is standardized
with the statistics of the indexed rows and searched exactly (Euclidean), as ``loralens search``
does.

Relevance (skills-lm): the Jaccard similarity of the query's and the candidate's training source
sets (``src_*`` columns) is the graded gain of NDCG@10; recall@10 is the fraction of the ideal
top 10 by Jaccard (every candidate at least as similar as the 10th best counts) that the search
returns in its top 10. Exact duplicates of a source set are rare (14 sources), so graded
relevance is what separates methods.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from loralens.jsonio import write_json
from loralens.learn.embed import Embedder
from loralens.learn.search import exact_knn, standardizer
from loralens.learn.tasks import mean_std
from loralens.store import LoRAStore

K = 10


def source_sets(store: LoRAStore) -> np.ndarray:
    """(N, S) 0/1 matrix of the sources each LoRA was finetuned on (its ``src_*`` labels)."""
    cols = [c for c in store.label_columns if c.startswith("src_")]
    if not cols:
        raise SystemExit(f"{store.path} has no src_* columns: no training-data relevance")
    return (store.labels(cols) > 0.5).astype(np.float64)


def jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) Jaccard similarity of 0/1 rows."""
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    return inter / np.maximum(union, 1)


def ranking_scores(found: np.ndarray, gains: np.ndarray, k: int = K) -> dict[str, float]:
    """recall@k and NDCG@k of ``found`` (M, k) candidate columns of ``gains`` (M, N)."""
    discount = 1 / np.log2(np.arange(2, k + 2))
    got = np.take_along_axis(gains, found, axis=1)
    ideal = -np.sort(-gains, axis=1)[:, :k]
    ndcg = (got * discount).sum(1) / np.maximum((ideal * discount).sum(1), 1e-12)
    relevant = gains >= ideal[:, -1:]  # the ideal top k, ties included
    hits = np.take_along_axis(relevant, found, axis=1).sum(1)
    return {"recall@10": float(np.mean(hits / k)), "ndcg@10": float(np.mean(ndcg))}


def retrieval(vectors: np.ndarray, queries: np.ndarray, base: np.ndarray, gains: np.ndarray):
    """Scores of exact search of ``queries`` rows among ``base`` rows, standardized on ``base``."""
    mean, std = standardizer(vectors[base])
    z = (vectors - mean) / std
    found = exact_knn(z[base], z[queries], K)[1]
    return ranking_scores(found, gains)


def dense_vectors(store: LoRAStore) -> np.ndarray:
    """Every LoRA's ΔW, all layers flattened and concatenated (float32)."""
    out = []
    for _, batch in store.iter_batches(128):
        out.append(np.concatenate([d.flatten(1).numpy() for d in batch.delta_weights()], axis=1))
    return np.concatenate(out).astype(np.float32)


def test_split(run: Path, store: LoRAStore) -> np.ndarray:
    ids = pd.read_csv(run / "predictions.csv", dtype={"id": str})["id"]
    return np.array([store.row_of(i) for i in ids])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", required=True, help="the store the benchmark ran on")
    ap.add_argument("--bench", required=True, help="a `loralens benchmark --out` folder")
    ap.add_argument("--out", required=True, help="JSON results (a .md table is written beside)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random rankings")
    args = ap.parse_args()
    store = LoRAStore(args.data)
    sets = source_sets(store)
    gains_all = jaccard(sets, sets)
    runs = sorted(Path(args.bench, "runs").glob("*/*/seed*"))
    seeds = sorted({r.name for r in runs})
    fixed = {
        "unsupervised (spectral)": Embedder.unsupervised(store.spec).store(store),
        "dense ΔW": dense_vectors(store),
    }
    rng = np.random.default_rng(args.seed)
    per: dict[str, list[dict[str, float]]] = {}
    for seed in seeds:
        splits = {}
        for run in [r for r in runs if r.name == seed]:
            family, model = run.parent.parent.name, run.parent.name
            test = test_split(run, store)
            splits[family] = test
            base = np.setdiff1d(np.arange(len(store)), test)
            vectors = Embedder.of_run(run).store(store)
            score = retrieval(vectors, test, base, gains_all[np.ix_(test, base)])
            per.setdefault(f"{model} ({family} run)", []).append(score)
        test = splits[sorted(splits)[-1]]
        base = np.setdiff1d(np.arange(len(store)), test)
        gains = gains_all[np.ix_(test, base)]
        for name, vectors in fixed.items():
            per.setdefault(name, []).append(retrieval(vectors, test, base, gains))
        order = np.argsort(rng.random(gains.shape), axis=1)[:, :K]
        per.setdefault("random ranking", []).append(ranking_scores(order, gains))
    result = {name: mean_std(scores) for name, scores in per.items()}
    write_json(args.out, {"store": str(store.path), "bench": args.bench, "k": K, "rows": result})
    lines = ["| embedding | recall@10 | NDCG@10 |", "|---|---|---|"]
    for name, (mean, std) in result.items():
        cells = [f"{mean[m]:.3f} ± {std[m]:.3f}" for m in ("recall@10", "ndcg@10")]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    table = "\n".join(lines)
    Path(args.out).with_suffix(".md").write_text(table + "\n")
    print(table)
    print(json.dumps({"seeds": seeds, "queries_per_seed": len(test)}))


if __name__ == "__main__":
    main()
