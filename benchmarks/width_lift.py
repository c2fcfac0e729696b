"""Does a run score the same on a zoo and on its isometric lift to wider layers?

    python benchmarks/width_lift.py --store STORE --target eval_loss --lifts 1,4,16 \
        --seeds 0,1,2 --out DIR

Every LoRA of the store is lifted by :func:`loralens.lift_width` (U' = Q_out U, V' = Q_in V,
one fixed Q per layer and side for every LoRA): no inner product between two updates, no norm
and no singular value changes, so the labels stay true and a method that learns from the
updates rather than the width scores the same at every lift. For each lift and seed (the same
split at every lift): ``train`` with default flags (GL-net, its linear base chosen by ``auto``,
the probes beside it), and GL-net with ``--linear-base none`` (the network alone). Writes
DIR/width_lift.json and prints a markdown table: test R² (AUROC for a binary label) per lift,
mean over seeds, the base each default run used, its epoch and wall time.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import loralens as ll
from loralens.learn import TrainConfig, train
from loralens.store import LoRAStore, write_store


def lifted(store: LoRAStore, factor: int, out: Path) -> LoRAStore:
    """``store`` lifted ``factor`` times wider, written once under ``out``."""
    if factor == 1:
        return store
    path = out / f"lift{factor}.store"
    if path.exists():
        return LoRAStore(path)
    items = []
    for row in range(len(store)):
        lora = store[row]
        labels = {c: float(v) for c, v in lora.metadata["labels"].items()}
        items.append((lora.metadata["id"], ll.lift_width(lora, factor, seed=7), labels))
    return write_store(path, items)


def score(metrics: dict, key: str) -> float:
    return float(metrics["test"][key])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--target", required=True)
    ap.add_argument("--lifts", default="1,4,16")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    store = LoRAStore(a.store)
    lifts = [int(x) for x in a.lifts.split(",")]
    seeds = [int(x) for x in a.seeds.split(",")]
    done = out / "width_lift.jsonl"  # one line per (lift, seed): a stopped run resumes
    rows = [json.loads(line) for line in done.read_text().splitlines()] if done.exists() else []
    for seed in seeds:
        for factor in lifts:
            if any(r["lift"] == factor and r["seed"] == seed for r in rows):
                continue
            data = lifted(store, factor, out)
            common = dict(targets=[a.target], seed=seed, plots=False, threads=a.threads)
            t = time.perf_counter()
            m = train(data, TrainConfig("glnet", **common), None)
            wall = time.perf_counter() - t
            key = "r2" if m["task"] == "regression" else "auroc"
            alone = train(
                data, TrainConfig("glnet", linear_base="none", probes=False, **common), None
            )
            row = {
                "lift": factor,
                "widest": max(max(s) for s in data.shapes),
                "seed": seed,
                "metric": key,
                "default": score(m, key),
                "base": m["model_hparams"]["linear_base"],
                "best_epoch": m["best_epoch"],
                "default_s": wall,
                "glnet_alone": score(alone, key),
                "probes": {
                    p: (v["test"][key] if "test" in v else None) for p, v in m["probes"].items()
                },
            }
            rows.append(row)
            with done.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    (out / "width_lift.json").write_text(json.dumps(rows, indent=2) + "\n")
    print_table(rows, lifts)


def print_table(rows: list[dict], lifts: list[int]) -> None:
    probes = sorted({p for r in rows for p in r["probes"]})
    head = ["lift", "widest", "default", "GL-net alone", *probes, "default's base", "s/run"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for factor in lifts:
        mine = [r for r in rows if r["lift"] == factor]

        def mean(vals: list) -> str:
            vals = [v for v in vals if v is not None]
            return f"{np.mean(vals):.3f}" if vals else "skipped"

        cells = [
            f"×{factor}",
            str(mine[0]["widest"]),
            mean([r["default"] for r in mine]),
            mean([r["glnet_alone"] for r in mine]),
            *(mean([r["probes"].get(p) for r in mine]) for p in probes),
            ", ".join(sorted({f"{r['base']} (epoch {r['best_epoch']})" for r in mine})),
            f"{np.mean([r['default_s'] for r in mine]):.0f}",
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
