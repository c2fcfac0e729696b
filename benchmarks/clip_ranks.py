"""Clipping a dense-ΔW ridge's predictions to its training labels' range, on development stores.

    python benchmarks/clip_ranks.py --target eval_loss STORE [STORE ...]

Per store: a ridge on the flattened ΔW (``learn.probes.fit_linear``, the linear base's fit)
trained on three seeded random 80% splits and on the rank-4 LoRAs; tested on the remaining 20%
and on the rank-2 and rank-8 LoRAs. R² of the raw predictions and of predictions clipped to the
training labels' range widened by 0, 5, 10 and 25% of it (the evidence for ``learn.tasks``'s
clipping; BENCHMARKS.md, issue 13's third round). Markdown to stdout.
"""

from __future__ import annotations

import argparse

import numpy as np

from loralens.learn.fitting.probes import PROBE_DENSE, fit_linear, probe_features
from loralens.learn.fitting.tasks import r2_score
from loralens.store import LoRAStore

MARGINS = (None, 0.0, 0.05, 0.1, 0.25)


def cases(store: LoRAStore) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, train rows, test rows): three seeded 80/20 splits, then rank 4 -> 2 and 4 -> 8."""
    n, rank = len(store), store.ranks.max(axis=1)
    out = []
    for seed in range(3):
        perm = np.random.default_rng(seed).permutation(n)
        out.append((f"random 80/20, seed {seed}", perm[: int(0.8 * n)], perm[int(0.8 * n) :]))
    for r in (2, 8):
        out.append((f"rank 4 -> {r}", np.flatnonzero(rank == 4), np.flatnonzero(rank == r)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stores", nargs="+")
    ap.add_argument("--target", default="eval_loss")
    a = ap.parse_args()
    head = " | ".join("raw" if m is None else f"clipped ±{m:.0%}" for m in MARGINS)
    print(f"| store | train -> test | {head} |\n|---|---|" + "---|" * len(MARGINS))
    for path in a.stores:
        store = LoRAStore(path)
        y = store.labels([a.target])[:, 0]
        x = probe_features(store, np.arange(len(store)), PROBE_DENSE).astype(np.float64)
        for name, tr, te in cases(store):
            coef, b = fit_linear(x[tr], y[tr], False)
            pred, lo, hi = x[te] @ coef + b, y[tr].min(), y[tr].max()
            cells = [
                r2_score(p, y[te])
                for p in (
                    pred if m is None else np.clip(pred, lo - m * (hi - lo), hi + m * (hi - lo))
                    for m in MARGINS
                )
            ]
            print(f"| {path} | {name} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
