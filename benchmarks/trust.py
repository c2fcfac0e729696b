"""Issue 16's measurements: do a run's intervals keep their promise, and does the fit check flag
adapters the model has not seen the like of?

    python benchmarks/trust.py ZOOS_DIR --out results.json [--models glnet] [--targets eval_loss,src_sub]
    python benchmarks/trust.py ZOOS_DIR --out - --table results-s0.json results-s1.json ...

ZOOS_DIR holds the zoo folders built by ``benchmarks/trust_zoos.sh``: ``z-main`` (trained on),
``z-id`` (unseen recipes, same base: in distribution), ``z-ranks`` (unseen ranks),
``z-variant`` (the same-lineage base variant), ``z-seed1`` (a base pretrained from another seed)
and ``z-small`` (another architecture). Each is packed once beside it (``<zoo>.store``).
Per model and target: test coverage/width from ``metrics.json``; coverage and share flagged on
every other zoo (``evaluate``); flag rates of z-id LoRAs scaled by 10 and 0.1; refusals of
z-small; AUROC of the ood_score, scale score and span score of each shift against the z-id
LoRAs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import loralens as ll
from loralens.learn.fitting.tasks import roc_auc
from loralens.learn.runs.evaluation import evaluate
from loralens.learn.runs.folder import load_run
from loralens.learn.training.config import TrainConfig
from loralens.learn.training.loop import train
from loralens.store import LoRAStore, pack_zoo_cached

SHIFTS = ("z-ranks", "z-variant", "z-seed1")


def scaled_fit_inputs(run, loras: list[ll.LoRA], factor: float):
    """What ``run``'s fit check reads of ``loras`` with delta W scaled by ``factor``."""
    scaled = [ll.LoRA([ll.LoRALayer(x.name, x.U * factor, x.V) for x in a.layers]) for a in loras]
    batch = ll.collate(scaled)
    return run.outputs([batch.pad_to(np.maximum(batch.spec.ranks, run.spec.ranks))])[1]


def ood_scores(run, store: LoRAStore, scale: float = 1.0) -> tuple[np.ndarray, ...]:
    """(ood_score, flagged, scale_score, span_score) of every LoRA of ``store`` with delta W
    scaled by ``scale``."""
    rows = np.arange(len(store))
    check = run.calibration.fit
    if scale == 1.0:
        _, fit_in = run.store_outputs(store, rows)
    else:
        fit_in = scaled_fit_inputs(run, [store[int(r)] for r in rows], scale)
    fit = check.check(fit_in)
    return (
        np.array([f["ood_score"] for f in fit]),
        np.array([not f["in_distribution"] for f in fit]),
        np.abs(check.size_residuals(fit_in)),
        fit_in.span,
    )


def measure(run_dir: Path, zoos: Path) -> dict:
    run = load_run(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    out = {"test": metrics["test"], "calibration": metrics["calibration"], "shifts": {}}
    ind = LoRAStore(zoos / "z-id.store")
    base = ood_scores(run, ind)
    for name in ("z-id", *SHIFTS):
        store = LoRAStore(zoos / f"{name}.store")
        ev = evaluate(run, store)
        scores, flagged, size, span = ood_scores(run, store) if name != "z-id" else base
        rep = ev["calibration"]["report"]
        out["shifts"][name] = {
            "n": ev["n"],
            "metrics": ev["metrics"],
            "coverage": rep["coverage"],
            "width_rel_std": rep.get("width_rel_std"),
            "set_size": rep.get("set_size"),
            "ece": rep.get("ece"),
            "flagged": float(flagged.mean()),
            **_aurocs(base, (scores, flagged, size, span), name != "z-id"),
        }
    for scale in (10.0, 0.1):
        scores, flagged, size, span = ood_scores(run, ind, scale)
        out["shifts"][f"z-id x{scale:g}"] = {
            "n": len(scores),
            "flagged": float(flagged.mean()),
            **_aurocs(base, (scores, flagged, size, span)),
        }
    small = sorted((zoos / "z-small" / "adapters").iterdir())
    rows = run.predict(small)
    out["shifts"]["z-small (other architecture)"] = {
        "n": len(rows),
        "refused": float(np.mean([r["error"] is not None for r in rows])),
        "example": rows[0]["error"],
    }
    return out


def _aurocs(inside: tuple, outside: tuple, shifted: bool = True) -> dict:
    """AUROC of the ood, scale and span scores of ``outside`` against ``inside`` (None each
    when not ``shifted``)."""
    keys = {"auroc": 0, "auroc_scale": 2, "auroc_span": 3}
    return {k: _auroc(inside[i], outside[i]) if shifted else None for k, i in keys.items()}


def _auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    score = np.concatenate([inside, outside])
    label = np.concatenate([np.zeros(len(inside)), np.ones(len(outside))])
    return roc_auc(np.nan_to_num(score, posinf=1e300), label)


def table(files: list[Path]) -> str:
    """Markdown of several seeds' results: mean ± std per run and zoo."""
    runs = [json.loads(f.read_text()) for f in files]

    def ms(values: list) -> str:
        v = [x for x in values if isinstance(x, (int, float))]
        if not v:
            return "-"
        return f"{np.mean(v):.2f}" + (f" ± {np.std(v):.2f}" if len(v) > 1 else "")

    lines = [
        "| run | zoo | n | coverage | width / label std (no weights) or set size | ECE | "
        "flagged | AUROC of ood_score | of scale_score | of span_score |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in runs[0]:
        cal = [r[key]["calibration"]["test"] for r in runs]
        shape = (
            f"{ms([c['set_size'] for c in cal])}"
            if cal[0].get("set_size") is not None
            else f"{ms([c['width_rel_std'] for c in cal])} "
            f"({ms([c['width_no_weights_rel_std'] for c in cal])})"
        )
        lines.append(
            f"| {key} | test split | {cal[0]['n']} | {ms([c['coverage'] for c in cal])} | {shape} "
            f"| {ms([c.get('ece') for c in cal])} | {ms([c['flagged'] for c in cal])} | - | - | - |"
        )
        for zoo in runs[0][key]["shifts"]:
            z = [r[key]["shifts"][zoo] for r in runs]
            if "refused" in z[0]:
                lines.append(
                    f"| {key} | {zoo} | {z[0]['n']} | - | - | - "
                    f"| refused {ms([x['refused'] for x in z])} | - | - | - |"
                )
                continue
            shape = (
                ms([x.get("set_size") for x in z])
                if z[0].get("set_size")
                else ms([x.get("width_rel_std") for x in z])
            )
            lines.append(
                f"| {key} | {zoo} | {z[0]['n']} | {ms([x.get('coverage') for x in z])} | {shape} "
                f"| {ms([x.get('ece') for x in z])} | {ms([x['flagged'] for x in z])} "
                f"| {ms([x.get('auroc') for x in z])} | {ms([x.get('auroc_scale') for x in z])} "
                f"| {ms([x.get('auroc_span') for x in z])} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("zoos", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--models", default="glnet")
    ap.add_argument("--targets", default="eval_loss,src_sub")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calibration", type=float, default=0.1, help="Share held out to calibrate.")
    ap.add_argument("--table", type=Path, nargs="+", help="Print the table of these results.")
    args = ap.parse_args()
    if args.table:
        print(table(args.table))
        return
    pack_zoo_cached(args.zoos / "z-main", args.zoos / "z-main.store", print)
    runs = [(m, t) for m in args.models.split(",") for t in args.targets.split(",")]
    seconds = {}
    tag = "" if args.calibration == 0.1 else f"-cal{args.calibration:g}"
    for model, target in runs:
        run_dir = args.zoos / "runs" / f"{model}-{target}-s{args.seed}{tag}"
        t0 = time.time()
        if not (run_dir / "calibration.json").exists():
            config = TrainConfig(
                model=model,
                targets=[target],
                seed=args.seed,
                threads=1,
                calibration=args.calibration,
            )
            train(args.zoos / "z-main.store", config, run_dir, overwrite=True)
        seconds[run_dir] = time.time() - t0
    for name in ("z-id", *SHIFTS):
        pack_zoo_cached(args.zoos / name, args.zoos / f"{name}.store", print)
    results = {}
    for model, target in runs:
        run_dir = args.zoos / "runs" / f"{model}-{target}-s{args.seed}{tag}"
        t0 = time.time() - seconds[run_dir]
        key = f"{model} {target}"
        results[key] = {**measure(run_dir, args.zoos), "seconds": time.time() - t0}
        print(json.dumps({key: results[key]}, indent=1))
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
