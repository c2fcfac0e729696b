"""A zoo of adapters at Llama-7B q_proj/v_proj shape through pack, train and predict: wall time,
peak memory and sizes on disk, each command in its own process as a user runs it.

    python benchmarks/store_7b.py --num 2000 --rank 8 --work DIR [--threads 2]

The adapters are synthetic (float16 PEFT folders, 32 layers x q_proj, v_proj of 4096 x 4096,
factors drawn N(0, 1) times a per-adapter size s, log-normal): what they cost is that of real
ones of the same shape and rank. Their label ``y`` is log s plus noise, so a run has something
to learn; its score says nothing about real labels. Steps: write the adapters and labels.csv;
``loralens pack``; ``loralens train --model glnet`` with default flags (basis, update base,
probes); ``loralens predict`` on 20 adapters. Each step's wall time and peak resident memory
(the child's ru_maxrss) go to DIR/store_7b.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from memory_bench import write_adapter  # the script's folder is on sys.path

MODULES = ("q_proj", "v_proj")
LAYERS, WIDTH = 32, 4096


def write_zoo(zoo: Path, num: int, rank: int, seed: int) -> None:
    """``num`` synthetic adapter folders under ``zoo`` and their labels.csv (kept if present)."""
    labels = zoo / "labels.csv"
    if labels.exists():
        return
    rng = np.random.default_rng(seed)
    sizes = np.exp(rng.normal(0.0, 0.5, num))
    rows = ["adapter,y"]
    for k in range(num):
        write_adapter(
            zoo / "adapters" / f"a{k:05d}",
            LAYERS,
            WIDTH,
            rank,
            seed * 1_000_003 + k,
            modules=MODULES,
            scale=float(sizes[k]) / np.sqrt(WIDTH),
            base_model="meta-llama/Llama-2-7b-hf",
        )
        rows.append(f"a{k:05d},{np.log(sizes[k]) + 0.1 * rng.normal():.6f}")
    labels.write_text("\n".join(rows) + "\n")


def timed(args: list[str], threads: int) -> dict[str, float]:
    """Wall seconds and peak resident MiB of ``loralens ARGS`` in a child process."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-m", "loralens", *args], env=env, stdout=subprocess.DEVNULL
    )
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"loralens {' '.join(args)} failed")
    return {"seconds": wall, "peak_mib": usage.ru_maxrss / 1024}


def du_mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--num", type=int, default=2000)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", required=True)
    a = ap.parse_args()
    work = Path(a.work)
    zoo, store, run = work / "zoo", work / "zoo.store", work / "run"
    t = time.perf_counter()
    write_zoo(zoo, a.num, a.rank, a.seed)
    result: dict = {"num": a.num, "rank": a.rank, "threads": a.threads}
    result["write_s"] = time.perf_counter() - t
    result["adapters_mib"] = du_mib(zoo / "adapters")
    if not store.exists():
        result["pack"] = timed(
            [
                "pack",
                str(zoo / "adapters"),
                "--labels",
                str(zoo / "labels.csv"),
                "--out",
                str(store),
            ],
            a.threads,
        )
    result["store_mib"] = du_mib(store)
    result["train"] = timed(
        [
            "train",
            "--data",
            str(store),
            "--target",
            "y",
            "--model",
            "glnet",
            "--out",
            str(run),
            "--threads",
            str(a.threads),
            "--overwrite",
            "--json",
        ],
        a.threads,
    )
    metrics = json.loads((run / "metrics.json").read_text())
    result["train_metrics"] = {
        "test": metrics["test"],
        "best_epoch": metrics["best_epoch"],
        "linear_base": metrics.get("linear_base"),
        "seconds": metrics["seconds"],
    }
    result["run_mib"] = du_mib(run)
    queries = [str(p) for p in sorted((zoo / "adapters").iterdir())[:20]]
    result["predict_20"] = timed(["predict", str(run), *queries, "--json"], a.threads)
    (work / "store_7b.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
