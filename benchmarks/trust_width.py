"""Issue 16 where the model has signal: interval width against the no-weights interval on a
store a model predicts well, and the fit check's flag rate on its test LoRAs, as they are and
scaled by 10 and 0.1.

    python benchmarks/trust_width.py STORE --out DIR [--models glnet,mlp-dense] [--target eval_loss]

Trains one run per model and seed (0, 1, 2) with default flags into DIR and writes
DIR/width.json: test R², best epoch, coverage, width / label std and the no-weights width (from
metrics.json), and the share of the test LoRAs (those the run did not train on) flagged.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

import loralens as ll
from loralens.learn.runs.folder import load_run
from loralens.learn.training.config import TrainConfig
from loralens.learn.training.loop import train
from loralens.store import LoRAStore
from trust import scaled_fit_inputs


def flagged(run, loras: list[ll.LoRA], factor: float) -> float:
    """Share of ``loras`` with ΔW scaled by ``factor`` that the run's fit check flags."""
    fit = run.calibration.fit.check(scaled_fit_inputs(run, loras, factor))
    return float(np.mean([not r["in_distribution"] for r in fit]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("store", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--models", default="glnet,mlp-dense")
    ap.add_argument("--target", default="eval_loss")
    args = ap.parse_args()
    store = LoRAStore(args.store)
    results = {}
    for model in args.models.split(","):
        for seed in (0, 1, 2):
            run_dir = args.out / f"{model}-s{seed}"
            config = TrainConfig(model=model, targets=[args.target], seed=seed, threads=1)
            m = train(store, config, run_dir, overwrite=True)
            test = m["calibration"]["test"]
            run = load_run(run_dir)
            seen = set(json.loads((run_dir / "trained_on.json").read_text())["ids"])
            loras = [store[i] for i, x in enumerate(store.ids) if x not in seen]
            results[f"{model} s{seed}"] = {
                "r2": m["test"]["r2"],
                "best_epoch": m["best_epoch"],
                "coverage": test["coverage"],
                "width_rel_std": test["width_rel_std"],
                "width_no_weights_rel_std": test["width_no_weights_rel_std"],
                "n_test": len(loras),
                **{f"flagged x{f:g}": flagged(run, loras, f) for f in (1.0, 10.0, 0.1)},
            }
            print(model, seed, results[f"{model} s{seed}"], flush=True)
    (args.out / "width.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
