"""Does an index of a trained run find LoRAs with shared training data at least as well as the
cosine between their updates?

    python benchmarks/search_vs_cosine.py --store STORE --target 'src_*' --seeds 0,1,2

Per seed: ``train`` with default flags (GL-net) on the 0/1 labels ``--target`` (which training
sources a LoRA saw); each of the run's test LoRAs then queries every other LoRA of the store,
ranked by the run's embedding (what ``loralens index RUN`` and ``search`` do: the vectors
centered, Euclidean), by the cosine between flattened ΔW, and at random. Score: the mean
Jaccard similarity of the query's and each of its 10 nearest neighbours' source sets
(Jaccard@10). Prints one line per seed and the means.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from loralens.learn import TrainConfig, train
from loralens.learn.fitting.data import resolve_targets
from loralens.learn.runs.folder import load_run
from loralens.search.embed import Embedder
from loralens.search.index import exact_knn
from loralens.store import LoRAStore

K = 10


def jaccard_at_k(sets: np.ndarray, vectors: np.ndarray, queries: np.ndarray) -> float:
    """Mean Jaccard@K of ``queries`` (rows) against every other row, nearest by Euclidean
    distance between ``vectors``."""
    scores = []
    for q in queries:
        others = np.delete(np.arange(len(sets)), q)
        _, near = exact_knn(vectors[others], vectors[q : q + 1], K)
        hits = sets[others[near[0]]]
        inter = (hits & sets[q]).sum(1)
        union = (hits | sets[q]).sum(1)
        scores.append(float(np.mean(inter / np.maximum(union, 1))))
    return float(np.mean(scores))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--target", default="src_*")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True, help="a folder for the runs")
    a = ap.parse_args()
    store = LoRAStore(a.store)
    targets = resolve_targets(store, a.target)
    sets = store.labels(targets) > 0.5
    dense = torch.cat([w.flatten(1) for w in store.batch(np.arange(len(store))).delta_weights()], 1)
    cosine = (dense / dense.norm(dim=1, keepdim=True)).double().numpy()
    rows = []
    for seed in [int(s) for s in a.seeds.split(",")]:
        out = f"{a.out}/seed{seed}"
        cfg = TrainConfig("glnet", targets, seed=seed, plots=False, threads=a.threads)
        done = Path(out) / "metrics.json"  # a stopped run resumes
        metrics = json.loads(done.read_text()) if done.exists() else train(store, cfg, out)
        ids = pd.read_csv(f"{out}/predictions.csv", dtype={"id": str})["id"]
        where = {i: r for r, i in enumerate(store.ids)}
        queries = np.array([where[i] for i in ids])
        vectors = Embedder.of_run(load_run(out)).store(store).astype(np.float64)
        vectors -= vectors.mean(0)
        noise = np.random.default_rng(seed).normal(size=(len(store), 8))
        row = {
            "seed": seed,
            "queries": len(queries),
            "kept": "network" if metrics["best_epoch"] > 0 else "linear base alone",
            "run_index": jaccard_at_k(sets, vectors, queries),
            "cosine_on_dW": jaccard_at_k(sets, cosine, queries),
            "random": jaccard_at_k(sets, noise, queries),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    for key in ("run_index", "cosine_on_dW", "random"):
        vals = [r[key] for r in rows]
        print(f"{key}: {np.mean(vals):.3f} ± {np.std(vals):.3f}")


if __name__ == "__main__":
    main()
