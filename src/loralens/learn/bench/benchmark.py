"""The quality benchmark behind ``loralens benchmark``: models x target families, mean +- std.

Every cell trains one model on one target family (one or more label columns, e.g. ``eval_loss``
or ``src_*``) for several seeds (each seed is its own split and init) and reports the test metric
at the best validation epoch. Two rows need no LoRA weights at all and say what the weights add:

- ``no weights``: the train-set mean (regression) or majority class (classification);
- ``hyperparameters only``: gradient-boosted trees on the zoo's recorded finetuning
  hyperparameters (learning rate, epochs, rank, ...), target columns excluded, where the zoo
  records any.

Two more rows say what a linear model of the weights already gets (``learn.probes``): ``probe:
dense ΔW`` and ``probe: spectral``, fitted on the same split(s) as the models. A model cell
below the better probe is marked ▼. Small stores are cross-validated (``learn.loop``): every
seed's number is then itself a mean over folds.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from loralens.jsonio import write_json
from loralens.learn.fitting.data import hparam_columns, make_splits, resolve_targets, select_rows
from loralens.learn.fitting.probes import PROBES
from loralens.learn.fitting.tasks import CLASSIFICATION, Task, infer_task, mean_std
from loralens.learn.runs.report import below, headline, kept
from loralens.learn.training.config import TrainConfig
from loralens.learn.training.loop import train
from loralens.models.registry import MODEL_NAMES
from loralens.store import LoRAStore

NO_WEIGHTS = "no weights"
HPARAMS_ONLY = "hyperparameters only"
PRIMARY = {"regression": "r2", CLASSIFICATION: "accuracy"}
SECONDARY = {"regression": "kendall_tau", CLASSIFICATION: "auroc"}
#: Marks a model cell whose mean is below the better probe's (at the precision shown).
BELOW_PROBE = "▼"


def hparams_only_metrics(
    store: LoRAStore, targets: Sequence[str], cols: Sequence[str], seed: int, where: str | None
) -> dict[str, Any]:
    """Test metrics of gradient-boosted trees on hyperparameter columns, fitted on train and val
    of the same split(s) as ``train`` (mean over folds when it cross-validates)."""
    y_all = store.labels(list(targets))
    rows = select_rows(store, where)
    kind = infer_task(y_all[rows])
    splits = make_splits(store, rows, y_all, seed, classification=kind == CLASSIFICATION)
    X = store.labels(list(cols))
    per = []
    for split in splits:
        fit = np.concatenate([split["train"], split["val"]])
        te = split["test"]
        task, out = tree_outputs(X, y_all, fit, te, list(targets), kind, seed)
        per.append(headline(task.metrics(out, y_all[te]), kind))
    return mean_std(per)[0]


def tree_outputs(
    X: np.ndarray,
    y_all: np.ndarray,
    tr: np.ndarray,
    te: np.ndarray,
    targets: list[str],
    kind: str,
    seed: int,
) -> tuple[Task, np.ndarray]:
    """Gradient-boosted trees on hyperparameter columns ``X`` fitted on rows ``tr``: the target
    scaling and their raw outputs (standardized values or logits) on rows ``te``."""
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor

    task = Task.fit(targets, y_all[tr], kind=kind)
    out = np.zeros((len(te), len(targets)))
    for j in range(len(targets)):
        ok = ~np.isnan(y_all[tr, j])
        yj = y_all[tr, j][ok]
        if task.kind == CLASSIFICATION:
            if len(np.unique(yj)) < 2:
                p = float(yj.mean()) if len(yj) else 0.5
                out[:, j] = math.log(max(p, 1e-6) / max(1 - p, 1e-6))
                continue
            clf = HistGradientBoostingClassifier(
                max_iter=200, min_samples_leaf=5, random_state=seed
            )
            clf.fit(X[tr][ok], yj)
            prob = np.clip(clf.predict_proba(X[te])[:, 1], 1e-6, 1 - 1e-6)
            out[:, j] = np.log(prob / (1 - prob))
        else:
            reg = HistGradientBoostingRegressor(max_iter=200, min_samples_leaf=5, random_state=seed)
            reg.fit(X[tr][ok], task.encode(y_all[tr])[ok, j])
            out[:, j] = reg.predict(X[te])
    return task, out


def _mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return None, None
    return float(np.mean(v)), float(np.std(v)) if len(v) > 1 else None


def run_benchmark(
    store: LoRAStore | str | os.PathLike,
    targets: Sequence[str],
    *,
    models: Sequence[str] = MODEL_NAMES,
    seeds: int | Sequence[int] = 3,
    out_dir: str | os.PathLike | None = None,
    epochs: int | None = None,
    where: str | None = None,
    hparams: Sequence[str] | None = None,
    save_runs: bool = True,
    threads: int | None = None,
    linear_base: str = "auto",
    log: Callable[[str], None] | None = None,
    on_run: Callable[[int, int, str], None] | None = None,
) -> dict[str, Any]:
    """Train every model on every target family for every seed; return (and write) the table.
    ``linear_base`` is every model's (see ``TrainConfig.linear_base``). ``on_run(done, total,
    what)`` is called before each run starts (and once at the end, ``done == total``), so a
    caller can show progress while a run is under way; ``log`` gets one line per finished run."""
    store = store if isinstance(store, LoRAStore) else LoRAStore(store)
    seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    log = log or (lambda msg: None)
    out = Path(out_dir) if out_dir is not None else None
    families = {spec: resolve_targets(store, spec) for spec in targets}
    cells: dict[str, dict[str, dict[str, Any]]] = {}
    runs: list[dict[str, Any]] = []
    t_start = time.time()
    total, done = len(families) * len(seeds) * len(models), 0
    on_run = on_run or (lambda done, total, what: None)
    for spec, cols in families.items():
        kind = None
        hp_cols = hparam_columns(store, exclude=cols) if hparams is None else list(hparams)
        rows_by_name: dict[str, list[dict[str, Any]]] = {}
        skipped: dict[str, str] = {}
        for seed in seeds:
            for name in models:
                t0 = time.time()
                first = name == models[0]  # also fits the probes (and the shared base fits)
                on_run(done, total, f"{spec}: {name}, seed {seed}" + (" + probes" if first else ""))
                run_dir = (
                    out / "runs" / _slug(spec) / name / f"seed{seed}"
                    if out is not None and save_runs
                    else None
                )
                cfg = TrainConfig(
                    model=name,
                    targets=cols,
                    seed=seed,
                    epochs=epochs,
                    where=where,
                    plots=seed == 0,
                    threads=threads,
                    linear_base=linear_base,
                    probes=first,  # one fit per split; every model shares it
                )
                m = train(store, cfg, run_dir, overwrite=True)  # the benchmark's own folder
                kind = m["task"]
                rows_by_name.setdefault(name, []).append(m["test"])
                for probe, p in m["probes"].items():
                    if "test" in p:
                        rows_by_name.setdefault(probe, []).append(p["test"])
                    else:
                        skipped[probe] = p["skipped"]
                runs.append(
                    {
                        "target": spec,
                        "model": name,
                        "seed": seed,
                        "test": m["test"],
                        "val": m["val"],
                        "best_epoch": m["best_epoch"],
                        "seconds": m["seconds"],
                    }
                )
                log(
                    f"{spec:>16s}  {name:<11s} seed {seed}  "
                    f"{PRIMARY[kind]} {_fmt(m['test'].get(PRIMARY[kind]))}  "
                    f"kept: {kept(m):<24s} ({time.time() - t0:.0f}s)"
                )
                done += 1
            rows_by_name.setdefault(NO_WEIGHTS, []).append(m["baseline"]["test"])
            if hp_cols:
                hm = hparams_only_metrics(store, cols, hp_cols, seed, where)
                rows_by_name.setdefault(HPARAMS_ONLY, []).append(hm)
        for name, results in rows_by_name.items():
            cell = {"task": kind, "n_seeds": len(results)}
            for key in (PRIMARY[kind], SECONDARY[kind], "loss"):
                mean, std = _mean_std([r.get(key) for r in results])
                cell[key] = {"mean": mean, "std": std}
            if name == HPARAMS_ONLY:
                cell["columns"] = hp_cols
            cells.setdefault(name, {})[spec] = cell
        for name, why in skipped.items():
            cells.setdefault(name, {})[spec] = {"task": kind, "skipped": why}
    on_run(total, total, "done")
    result = {
        "store": str(store.path),
        "num_loras": len(store),
        "where": where,
        "targets": {k: v for k, v in families.items()},
        "models": list(models),
        "seeds": seeds,
        "epochs": epochs,
        "table": cells,
        "runs": runs,
        "seconds": time.time() - t_start,
    }
    result["markdown"] = to_markdown(result)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "benchmark.json", result)
        (out / "benchmark.md").write_text(result["markdown"] + "\n")
    return result


def _slug(spec: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in spec).strip("_") or "target"


def _fmt(x: float | None, std: float | None = None) -> str:
    if x is None:
        return "-"
    return f"{x:.3f}" if std is None else f"{x:.3f} ± {std:.3f}"


def to_markdown(result: dict[str, Any]) -> str:
    """Models x targets: primary metric (R^2 / accuracy), then a second table (tau / AUROC)."""
    specs = list(result["targets"])
    order = [*result["models"], *PROBES, NO_WEIGHTS, HPARAMS_ONLY]
    names = [n for n in order if n in result["table"]]
    marked = False
    lines = []
    for which in (PRIMARY, SECONDARY):
        head = []
        for spec in specs:
            kind = next(
                (result["table"][n][spec]["task"] for n in names if spec in result["table"][n]),
                "regression",
            )
            label = {"r2": "R²", "kendall_tau": "Kendall τ", "accuracy": "acc", "auroc": "AUROC"}
            head.append(f"{spec} ({label[which[kind]]})")
        lines.append("| model | " + " | ".join(head) + " |")
        lines.append("|---|" + "---|" * len(specs))
        for n in names:
            cells = []
            for spec in specs:
                c = result["table"][n].get(spec)
                if c is None:
                    cells.append("")
                    continue
                if "skipped" in c:
                    cells.append("skipped")
                    continue
                v = c[which[c["task"]]]
                best = _best_probe(result["table"], spec, which[c["task"]])
                lower = n in result["models"] and below(
                    -1e9 if v["mean"] is None else v["mean"], best
                )
                marked |= lower
                cells.append(_fmt(v["mean"], v["std"]) + (f" {BELOW_PROBE}" if lower else ""))
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        lines.append("")
    seeds = result["seeds"]
    lines.append(
        f"{result['num_loras']} LoRAs in {result['store']}"
        + (f" (rows where {result['where']})" if result["where"] else "")
        + f"; mean ± std over {len(seeds)} seed(s); test split at the best validation epoch"
        + " (stores under 60 labelled LoRAs: 5-fold cross-validation, mean over folds)."
    )
    if marked:
        lines.append(f"{BELOW_PROBE}: below the better linear probe on the same split(s).")
    for n in PROBES:
        for spec, c in result["table"].get(n, {}).items():
            if "skipped" in c:
                lines.append(f"{n} ({spec}): {c['skipped']}.")
    return "\n".join(lines)


def _best_probe(table: dict[str, Any], spec: str, key: str) -> float | None:
    """The better probe's mean of metric ``key`` for target ``spec`` (None: no probe ran)."""
    vals = [
        table[n][spec][key]["mean"]
        for n in PROBES
        if spec in table.get(n, {}) and key in table[n][spec]
    ]
    vals = [v for v in vals if v is not None]
    return max(vals) if vals else None


__all__ = [
    "BELOW_PROBE",
    "HPARAMS_ONLY",
    "NO_WEIGHTS",
    "hparams_only_metrics",
    "run_benchmark",
    "to_markdown",
    "tree_outputs",
]
