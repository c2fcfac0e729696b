"""A/B of w2t's canonical-form cache: one training run with it and the same run without it.

    python benchmarks/w2t_cache.py STORE --target eval_loss --seed 0 --rounds 2 [--linear-base none]

Without the cache (``W2T.cache_bytes = 0``: ``canonical_form`` of every batch, every epoch) and
with it, the same run (seed, split, epochs) alternately in one process, ``--rounds`` times each
after one untimed warm-up run, so the ratio survives a machine shared with other work. Prints
the CPU and wall seconds of each run, the ratio of the medians, and checks that both give the
same test metrics and epochs.
"""

from __future__ import annotations

import argparse
import statistics
import time

from loralens.learn.training.config import TrainConfig
from loralens.learn.training.loop import train
from loralens.models.w2t import W2T


def one_run(store: str, target: str, seed: int, linear_base: str, cached: bool) -> dict:
    """Train w2t once, with or without the cache: CPU and wall seconds, epochs, test R² (or
    accuracy)."""
    saved = W2T.cache_bytes
    W2T.cache_bytes = saved if cached else 0
    try:
        config = TrainConfig(
            model="w2t",
            targets=[target],
            seed=seed,
            linear_base=linear_base,
            threads=1,
            plots=False,
            probes=False,
        )
        cpu, wall = time.process_time(), time.perf_counter()
        metrics = train(store, config)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        W2T.cache_bytes = saved
    test = metrics["test"]
    score = test["r2"] if "r2" in test else test["accuracy"]
    return {"cpu": cpu, "wall": wall, "epochs": metrics["epochs_run"], "test": score}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("store")
    p.add_argument("--target", default="eval_loss")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--linear-base", default="auto", help="as `loralens train --linear-base`")
    a = p.parse_args()
    one_run(a.store, a.target, a.seed, a.linear_base, True)  # warm-up: one-time costs, untimed
    runs: dict[bool, list[dict]] = {False: [], True: []}
    for _ in range(a.rounds):
        for cached in (False, True):
            r = one_run(a.store, a.target, a.seed, a.linear_base, cached)
            runs[cached].append(r)
            name = "cached" if cached else "uncached"
            print(
                f"{name:9s} cpu {r['cpu']:7.1f} s  wall {r['wall']:7.1f} s  "
                f"epochs {r['epochs']}  test {r['test']:.6f}",
                flush=True,
            )
    med = {c: {k: statistics.median(r[k] for r in runs[c]) for k in ("cpu", "wall")} for c in runs}
    print(
        f"speedup (uncached / cached, medians): cpu {med[False]['cpu'] / med[True]['cpu']:.2f}x, "
        f"wall {med[False]['wall'] / med[True]['wall']:.2f}x"
    )
    same = {(r["epochs"], round(r["test"], 5)) for rs in runs.values() for r in rs}
    print("same epochs and test metric (5 digits) in every run:", len(same) == 1, sorted(same))


if __name__ == "__main__":
    main()
