"""Adapter retrieval measured like W2T: queries from each run's test split against an index of
the rest of the store; relevance = shared training data.

    python benchmarks/retrieval.py --data STORE --bench BENCH_DIR --out retrieval.json \
        [--relevance 'sets:src_*' | --relevance 'same:subject_class,attr_*']

BENCH_DIR is a ``loralens benchmark --out`` folder: its runs (``runs/<family>/<model>/seed<k>``)
give the embeddings (``model.embed``, the representation before the head) and the test split of
each seed. Beside them, on each family's test split: the unsupervised spectral embedding
(``loralens index --unsupervised``), a dense-ΔW baseline (every ΔW flattened) and random
rankings. Every embedding is standardized with the statistics of the indexed rows and searched
exactly (Euclidean), as ``loralens search`` does.

Relevance, ``--relevance``: ``sets:GLOB`` (default ``sets:src_*``, skills-lm's training sources;
``sets:class_*`` for digits-subsets' class sets): the Jaccard similarity of the query's and the
candidate's 0/1 sets is the graded gain of NDCG@10; ``same:COLUMNS`` (digits-dreambooth's
subject: ``same:subject_class,attr_*``): gain 1 where the two LoRAs agree on every column, else 0.
recall@10 is the share of the ideal top 10 (every candidate with a positive gain at least that of
the 10th best, ties included; fewer when fewer are relevant) that the search returns in its top
10; queries without any relevant candidate are left out of both scores.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from loralens.jsonio import write_json
from loralens.learn.fitting.data import resolve_targets
from loralens.learn.fitting.tasks import mean_std
from loralens.search.embed import Embedder
from loralens.search.index import exact_knn, standardizer
from loralens.store import LoRAStore

K = 10


def relevance(store: LoRAStore, spec: str) -> np.ndarray:
    """(N, N) gains between every pair of LoRAs for ``--relevance`` ``spec`` (see above)."""
    kind, _, columns = spec.partition(":")
    if kind not in ("sets", "same") or not columns:
        raise SystemExit(f"--relevance must be sets:GLOB or same:COLUMNS, got {spec!r}")
    labels = store.labels(resolve_targets(store, columns)).astype(np.float64)
    if kind == "same":
        return (labels[:, None, :] == labels[None, :, :]).all(axis=2).astype(np.float64)
    return jaccard(labels > 0.5, labels > 0.5)


def jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) Jaccard similarity of 0/1 rows."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    return inter / np.maximum(union, 1)


def ranking_scores(found: np.ndarray, gains: np.ndarray, k: int = K) -> dict[str, float]:
    """recall@k and NDCG@k of ``found`` (M, k) candidate columns of ``gains`` (M, N), over
    the queries with a relevant candidate (and how many those are)."""
    asked = (gains > 0).any(axis=1)
    found, gains = found[asked], gains[asked]
    discount = 1 / np.log2(np.arange(2, k + 2))
    got = np.take_along_axis(gains, found, axis=1)
    ideal = -np.sort(-gains, axis=1)[:, :k]
    ndcg = (got * discount).sum(1) / (ideal * discount).sum(1)
    # the ideal top k, ties included; only candidates with a positive gain are relevant
    relevant = (gains >= ideal[:, -1:]) & (gains > 0)
    hits = np.take_along_axis(relevant, found, axis=1).sum(1)
    recall = hits / np.minimum(relevant.sum(1), k)
    return {
        "recall@10": float(np.mean(recall)),
        "ndcg@10": float(np.mean(ndcg)),
        "queries": int(asked.sum()),
    }


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
    ap.add_argument(
        "--relevance", default="sets:src_*", help="sets:GLOB (Jaccard) or same:COLUMNS (0/1)"
    )
    args = ap.parse_args()
    store = LoRAStore(args.data)
    gains_all = relevance(store, args.relevance)
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
        # label-free rows on each family's test split (classification splits are stratified,
        # so they may differ from a regression family's): compared with that family's runs
        for family, test in sorted(splits.items()):
            base = np.setdiff1d(np.arange(len(store)), test)
            gains = gains_all[np.ix_(test, base)]
            for name, vectors in fixed.items():
                score = retrieval(vectors, test, base, gains)
                per.setdefault(f"{name} ({family} split)", []).append(score)
            order = np.argsort(rng.random(gains.shape), axis=1)[:, :K]
            per.setdefault(f"random ranking ({family} split)", []).append(
                ranking_scores(order, gains)
            )
    result = {name: mean_std(scores) for name, scores in per.items()}
    facts = {"store": str(store.path), "bench": args.bench, "relevance": args.relevance, "k": K}
    write_json(args.out, {**facts, "rows": result})
    lines = ["| embedding | recall@10 | NDCG@10 | queries |", "|---|---|---|---|"]
    for name, (mean, std) in result.items():
        spread = std or {}  # None from a single seed
        cells = [
            f"{mean[m]:.3f}" + (f" ± {spread[m]:.3f}" if spread.get(m) is not None else "")
            for m in ("recall@10", "ndcg@10")
        ]
        lines.append(f"| {name} | {' | '.join(cells)} | {mean['queries']:g} |")
    table = "\n".join(lines)
    Path(args.out).with_suffix(".md").write_text(table + "\n")
    print(table)
    print(json.dumps({"seeds": seeds, "queries_per_seed": len(test)}))


if __name__ == "__main__":
    main()
