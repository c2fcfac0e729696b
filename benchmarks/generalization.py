"""Rank generalization and base-variant transfer of a training recipe, against the dense probe.

    python benchmarks/generalization.py --target eval_loss --seeds 3 --out OUT \\
        --ranks STORE [STORE ...]          # train on rank == 4, test on rank 2 and rank 8
        --transfer TRAIN_STORE TEST_STORE  # train on one base, test on a variant's LoRAs

Rows: ``glnet`` with default flags, ``glnet`` without its linear base (the network alone),
and the dense-ΔW ridge probe (``learn.probes``) twice: fitted on the rows the default run's model
learned from (train and val, ``learn.loop.run_splits``), and on every LoRA the run saw, its
calibration rows too (read from its ``trained_on.json``): 10% more LoRAs than the model had.
Metrics: R², Kendall τ and Spearman ρ of ``evaluate`` on the held-out rows, mean ± std over
seeds (seed = split and init). Markdown to stdout, JSON to OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from loralens.learn.fitting.data import select_rows
from loralens.learn.fitting.probes import PROBE_DENSE, fit_predict, probe_features
from loralens.learn.fitting.tasks import Task
from loralens.learn.runs.evaluation import evaluate
from loralens.learn.runs.report import headline
from loralens.learn.runs.seen import read_trained_on, seen_mask
from loralens.learn.training.config import TrainConfig
from loralens.learn.training.loop import run_splits, train
from loralens.store import LoRAStore

RECIPES = {
    "glnet (defaults)": {},
    "glnet, network alone (--linear-base none)": {"linear_base": "none"},
}
PROBE = "ridge on dense ΔW (probe, the model's train + val rows)"
PROBE_SEEN = "ridge on dense ΔW (probe, + the run's calibration rows)"
METRICS = ("r2", "kendall_tau", "spearman")


def _runs(train_store, tests, target, seeds, where, out):
    """{recipe: {test name: {metric: [per seed]}}} for runs trained on ``train_store`` rows
    ``where`` and evaluated on each ``(name, store, filter)`` of ``tests``, and the probe."""
    res: dict = {}
    for seed in range(seeds):
        for k, (name, kw) in enumerate(RECIPES.items()):
            run_dir = out / "runs" / f"recipe{k}-seed{seed}"
            cfg = TrainConfig("glnet", [target], seed=seed, where=where, plots=False, **kw)
            train(train_store, cfg, run_dir, overwrite=True)
            for test_name, store, test_where in tests:
                _add(res, name, test_name, evaluate(run_dir, store, where=test_where)["metrics"])
            if k == 0:
                src = LoRAStore(train_store)
                split = run_splits(src, cfg, src.labels([target]))[1]
                model_rows = np.concatenate([split[0]["train"], split[0]["val"]])
                if len(split) > 1:  # cross-validated: the refit learns from every row
                    model_rows = np.concatenate([model_rows, split[0]["test"]])
                seen = np.arange(len(src))
                seen = seen[seen_mask(read_trained_on(Path(run_dir)), src, seen)]
                for name, fit in ((PROBE, model_rows), (PROBE_SEEN, seen)):
                    for test_name, store, test_where in tests:
                        _add(res, name, test_name, _probe(src, fit, store, test_where, target))
        print(f"seed {seed} done", flush=True)
    return res


def _add(res: dict, name: str, test_name: str, m: dict) -> None:
    cell = res.setdefault(name, {}).setdefault(test_name, {})
    for k in METRICS:
        cell.setdefault(k, []).append(m.get(k))


def _probe(src: LoRAStore, fit: np.ndarray, store, where, target) -> dict:
    """Test metrics on ``store`` rows ``where`` of the dense-ΔW probe fitted on ``src`` rows."""
    dst = LoRAStore(store)
    fit = np.sort(fit)
    test = select_rows(dst, where)
    y_fit, y_test = src.labels([target])[fit], dst.labels([target])[test]
    task = Task.fit([target], y_fit)
    raw = fit_predict(
        probe_features(src, fit, PROBE_DENSE), y_fit, probe_features(dst, test, PROBE_DENSE), task
    )
    return headline(task.metrics(raw, y_test), task.kind)


def _table(title: str, res: dict) -> str:
    tests = list(next(iter(res.values())))
    head = "| recipe | " + " | ".join(f"{t} R² | {t} τ | {t} ρ" for t in tests) + " |"
    lines = [f"**{title}**", "", head, "|---" * (1 + 3 * len(tests)) + "|"]
    for name, cells in res.items():
        vals = []
        for t in tests:
            for k in METRICS:
                v = np.asarray(cells[t][k], dtype=float)
                vals.append(f"{np.nanmean(v):.3f} ± {np.nanstd(v):.3f}")
        lines.append(f"| {name} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="eval_loss")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", required=True)
    ap.add_argument("--ranks", nargs="*", default=[])
    ap.add_argument("--transfer", nargs=2, metavar=("TRAIN", "TEST"))
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results, tables = {}, []
    for store in a.ranks:
        tests = [(f"rank {r}", store, f"rank == {r}") for r in (2, 8)]
        res = _runs(store, tests, a.target, a.seeds, "rank == 4", out)
        results[f"ranks {store}"] = res
        tables.append(_table(f"{store}: trained on rank 4", res))
    if a.transfer:
        src, dst = a.transfer
        res = _runs(src, [("variant", dst, None)], a.target, a.seeds, None, out)
        results[f"transfer {src} -> {dst}"] = res
        tables.append(_table(f"{src} -> {dst}", res))
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print("\n\n".join(tables))


if __name__ == "__main__":
    main()
