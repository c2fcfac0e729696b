"""Do a run's intervals and sets cover what they say on its test split, with a store's own
split column (with and without ``cal`` rows)?

    python benchmarks/split_coverage.py --zoo /work/zoos/zoo-gpt2-dev:eval_loss \
        --zoo /work/zoos/zoo-skills-dev:eval_loss,src_sub --out DIR [--seeds 3] [--kinds nocal,cal]

Each zoo folder (adapters/ + labels.csv) is packed once into DIR with one split column per
seed and kind: ``nocal_s{seed}`` (train / val / test, 70 / 10 / 20) and ``cal_s{seed}``
(train / val / cal / test, 60 / 10 / 10 / 20), each a seeded permutation. Every target of a zoo
is trained on each column with default flags (glnet; probes skipped: they do not change the
run) and predicted with ``Run.predict`` on its test adapters' files: the coverage measured
there must equal the run's own report in metrics.json. Writes DIR/coverage.json and
DIR/coverage.md: per zoo, target and kind, the coverage of each seed, their mean, and whether
every run called itself calibrated.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from loralens.learn import TrainConfig, load_run, train
from loralens.store import LoRAStore, pack

KINDS = {
    "nocal": (("train", 0.7), ("val", 0.1), ("test", 0.2)),
    "cal": (("train", 0.6), ("val", 0.1), ("cal", 0.1), ("test", 0.2)),
}


def split_labels(zoo: Path, seeds: int, out: Path) -> Path:
    """The zoo's labels.csv with a split column per kind and seed, written to ``out``."""
    labels = pd.read_csv(zoo / "labels.csv", dtype={"adapter": str})
    n = len(labels)
    for kind, parts in KINDS.items():
        for seed in range(seeds):
            order = np.random.default_rng(seed).permutation(n)
            column = np.empty(n, dtype=object)
            start = 0
            for k, (name, share) in enumerate(parts):
                stop = n if k == len(parts) - 1 else start + round(share * n)
                column[order[start:stop]] = name
                start = stop
            labels[f"{kind}_s{seed}"] = column
    labels.to_csv(out, index=False)
    return out


def covered(rows: list[dict], truth: dict[str, float], target: str) -> list[bool]:
    """Per predicted row, whether its interval (or set) holds the adapter's true label."""
    hits = []
    for row in rows:
        y = truth[Path(row["adapter"]).name]
        if row.get("interval") is not None:
            lo, hi = row["interval"][target]
            hits.append(lo <= y <= hi)
        else:
            hits.append(int(y) in row["set"][target])
    return hits


def one_run(store: LoRAStore, zoo: Path, target: str, column: str, seed: int, out: Path) -> dict:
    """Train on ``column`` and measure its test coverage through ``predict``."""
    config = TrainConfig(
        model="glnet", targets=[target], seed=seed, split_column=column, probes=False, plots=False
    )
    t0 = time.time()
    metrics = train(store, config, out, overwrite=True)
    cal = metrics["calibration"]
    test = store.index[store.index[column] == "test"]
    truth = dict(zip(test["id"], test[target].astype(float)))
    paths = [zoo / "adapters" / name for name in truth]
    rows = load_run(out).predict(paths)
    hits = covered(rows, truth, target)
    return {
        "method": cal["method"],
        "n_calibration": cal["n_calibration"],
        "n_test": len(hits),
        "coverage": float(np.mean(hits)),
        "coverage_reported": cal["test"]["coverage"],
        "width_rel_std": cal["test"].get("width_rel_std"),
        "set_size": cal["test"].get("set_size"),
        "ece": cal["test"].get("ece"),
        "ece_uncalibrated": cal["test"].get("ece_uncalibrated"),
        "temperature": cal.get("temperature"),
        "best_epoch": metrics["best_epoch"],
        "test": metrics["test"],
        "calibrated": all(r["calibrated"] for r in rows),
        "problems": cal["problems"],
        "seconds": time.time() - t0,
    }


def table(results: dict) -> str:
    """The markdown table: coverage per seed and its mean, per zoo, target and kind."""
    lines = [
        "| zoo | target | split column | method | n cal / test | coverage per seed | mean | calibrated |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, runs in results.items():
        zoo, target, kind = key.split("|")
        cov = [r["coverage"] for r in runs]
        methods = "/".join(sorted({r["method"] for r in runs}))
        sizes = f"{runs[0]['n_calibration']} / {runs[0]['n_test']}"
        flags = (
            "yes"
            if all(r["calibrated"] for r in runs)
            else "no: " + "; ".join(p for r in runs for p in r["problems"])
        )
        label = "with cal rows" if kind == "cal" else "no cal rows"
        lines.append(
            f"| {zoo} | {target} | {label} | {methods} | {sizes} | "
            f"{', '.join(f'{c:.3f}' for c in cov)} | {np.mean(cov):.3f} | {flags} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--zoo", action="append", required=True, metavar="FOLDER:TARGET[,TARGET]")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--kinds", default=",".join(KINDS), help="split columns to train on")
    args = ap.parse_args()
    kinds = args.kinds.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {}
    for spec in args.zoo:
        folder, targets = spec.rsplit(":", 1)
        zoo = Path(folder)
        labels = split_labels(zoo, args.seeds, args.out / f"{zoo.name}-labels.csv")
        store_path = args.out / f"{zoo.name}.store"
        if not store_path.exists():
            pack(zoo / "adapters", store_path, labels=labels)
        store = LoRAStore(store_path)
        for target in targets.split(","):
            for kind in kinds:
                key = f"{zoo.name}|{target}|{kind}"
                for seed in range(args.seeds):
                    run_dir = args.out / "runs" / f"{zoo.name}-{target}-{kind}-s{seed}"
                    r = one_run(store, zoo, target, f"{kind}_s{seed}", seed, run_dir)
                    print(key, seed, json.dumps({k: r[k] for k in ("method", "coverage")}))
                    results.setdefault(key, []).append(r)
                (args.out / "coverage.json").write_text(json.dumps(results, indent=1))
    md = table(results)
    (args.out / "coverage.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
