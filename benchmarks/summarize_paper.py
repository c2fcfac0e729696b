"""Rank generalization, transfer and the summary of benchmarks/paper_tables.sh.

    python benchmarks/summarize_paper.py OUT > OUT/summary.md

Reads OUT/bench-*/ (tables), evaluates every ``eval_loss`` run of OUT/bench-skills-lm (trained on
rank-4 LoRAs of the base model) on OUT/ranks.store per rank (rank generalization; that zoo's
recipes are held out by construction) and on OUT/variant.store (transfer to the base variant),
and adds a "hyperparameters only" reference fitted on the same training LoRAs. The zoos share a
seed, so LoRA i of the variant zoo has the recipe (learning rate, data sources, ...) of LoRA i of
the training zoo; the variant table also scores the LoRAs whose recipe the run did not train on.
Writes OUT/extra.json.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import numpy as np

from loralens.learn.fitting.data import hparam_columns, make_split, select_rows
from loralens.learn.fitting.tasks import Task
from loralens.learn.runs.evaluation import evaluate
from loralens.learn.runs.folder import load_run
from loralens.store import LoRAStore

RANKS = (1, 2, 4, 8, 16)


def _ms(values: list[float | None]) -> str:
    v = [x for x in values if x is not None and np.isfinite(x)]
    if not v:
        return "-"
    return f"{np.mean(v):.3f} ± {np.std(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}"


def _hparams_reference(src: LoRAStore, dst: LoRAStore, seed: int, where: str | None) -> dict:
    """Trees on hyperparameters, fitted on the run's training split of ``src``, scored on ``dst``."""
    from sklearn.ensemble import HistGradientBoostingRegressor

    cols = [c for c in hparam_columns(src, exclude=["eval_loss"]) if c in dst.index.columns]
    y = src.labels(["eval_loss"])
    split = make_split(src, select_rows(src, None), y, seed)
    task = Task.fit(["eval_loss"], y[split["train"]])
    reg = HistGradientBoostingRegressor(max_iter=200, min_samples_leaf=5, random_state=seed)
    reg.fit(src.labels(cols)[split["train"]], task.encode(y[split["train"]])[:, 0])
    rows = select_rows(dst, where)
    out = reg.predict(dst.labels(cols)[rows])[:, None]
    m = task.metrics(out, dst.labels(["eval_loss"])[rows])
    return {"r2": m["r2"], "kendall_tau": m["kendall_tau"], "n": len(rows)}


@functools.cache
def _unseen(src: LoRAStore, seed: int) -> str:
    """A query for LoRAs whose index (= recipe) is not in that seed's training split of ``src``."""
    split = make_split(src, select_rows(src, None), src.labels(["eval_loss"]), seed)
    ids = [src.ids[i] for i in split["train"]]
    return f"id not in {ids!r}"


def extra(out: Path) -> dict:
    runs_dir = out / "bench-skills-lm" / "runs" / "eval_loss"
    src_path = out / "skills-lm.store"
    if not runs_dir.is_dir() or not src_path.exists():
        return {}
    src = LoRAStore(src_path)
    result: dict = {"ranks": {}, "transfer": {}}
    ranks_store = out / "ranks.store"
    variant_store = out / "variant.store"
    ranks = LoRAStore(ranks_store) if ranks_store.exists() else None
    variant = LoRAStore(variant_store) if variant_store.exists() else None
    for model_dir in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
        for seed_dir in sorted(model_dir.glob("seed*")):
            run = load_run(seed_dir)
            same = json.loads((seed_dir / "metrics.json").read_text())["test"]
            key = f"{model_dir.name}/{seed_dir.name}"
            unseen = _unseen(src, int(seed_dir.name[4:]))
            if ranks is not None:
                result["ranks"][key] = {
                    "same_zoo_test": same,
                    "per_rank": {
                        r: evaluate(run, ranks, where=f"rank == {r}")["metrics"]
                        for r in RANKS
                        if (ranks.index["rank"] == r).sum() >= 3
                    },
                }
            if variant is not None:
                result["transfer"][key] = {
                    "same_base_test": same,
                    "variant": evaluate(run, variant)["metrics"],
                    "variant_unseen_recipes": evaluate(run, variant, where=unseen)["metrics"],
                }
    seeds = sorted({int(k.split("seed")[1]) for k in {**result["ranks"], **result["transfer"]}})
    ref: dict = {"ranks": {}, "transfer": []}
    for seed in seeds:
        if ranks is not None:
            for r in RANKS:
                if (ranks.index["rank"] == r).sum() >= 3:
                    ref["ranks"].setdefault(r, []).append(
                        _hparams_reference(src, ranks, seed, f"rank == {r}")
                    )
        if variant is not None:
            ref["transfer"].append(_hparams_reference(src, variant, seed, None))
            ref.setdefault("transfer_unseen", []).append(
                _hparams_reference(src, variant, seed, _unseen(src, seed))
            )
    result["hparams_reference"] = ref
    result["sizes"] = {
        "train_store": len(src),
        "ranks": {int(r): int((ranks.index["rank"] == r).sum()) for r in RANKS} if ranks else {},
        "variant": len(variant) if variant else 0,
    }
    (out / "extra.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    return result


def main(out: Path) -> None:
    lines = []
    for bench in sorted(out.glob("bench-*/benchmark.md")):
        res = json.loads((bench.parent / "benchmark.json").read_text())
        lines.append(f"### {bench.parent.name} ({res['num_loras']} LoRAs)\n")
        lines.append(bench.read_text().strip() + "\n")
    ex = extra(out)
    models = sorted({k.split("/")[0] for k in ex.get("ranks", {}) or ex.get("transfer", {})})

    def cell(ms: list[dict]) -> str:
        return f"{_ms([m.get('r2') for m in ms])} / {_ms([m.get('kendall_tau') for m in ms])}"

    if ex.get("ranks"):
        sizes = ex["sizes"]["ranks"]
        lines.append(
            "### Rank generalization: trained on rank-4 LoRAs, eval_loss R² / τ on the held-out "
            f"ranks zoo, per rank (n per rank: {sizes})\n"
        )
        lines.append(
            "| model | own test split (r=4) | " + " | ".join(f"r={r}" for r in RANKS) + " |"
        )
        lines.append("|---|---|" + "---|" * len(RANKS))
        for m in models:
            runs = [v for k, v in ex["ranks"].items() if k.startswith(m + "/")]
            cells = [cell([v["same_zoo_test"] for v in runs])]
            for r in RANKS:
                cells.append(cell([v["per_rank"][r] for v in runs if r in v["per_rank"]]))
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        refs = ex["hparams_reference"]["ranks"]
        lines.append(
            "| hyperparameters only | | "
            + " | ".join(cell(refs.get(r, [])) for r in RANKS)
            + " |\n"
        )
    if ex.get("transfer"):
        lines.append(
            "### Transfer to the base variant: eval_loss R² / τ "
            f"({ex['sizes']['train_store']} training LoRAs, {ex['sizes']['variant']} variant)\n"
        )
        lines.append(
            "| model | same base (test split) | variant base (all its LoRAs) "
            "| variant base, unseen recipes |"
        )
        lines.append("|---|---|---|---|")
        for m in models:
            runs = [v for k, v in ex["transfer"].items() if k.startswith(m + "/")]
            same = cell([v["same_base_test"] for v in runs])
            var = cell([v["variant"] for v in runs])
            lines.append(
                f"| {m} | {same} | {var} | {cell([v['variant_unseen_recipes'] for v in runs])} |"
            )
        refs = ex["hparams_reference"]
        lines.append(
            f"| hyperparameters only | | {cell(refs['transfer'])} "
            f"| {cell(refs.get('transfer_unseen', []))} |\n"
        )
    speed = out / "predict_vs_eval.json"
    if speed.exists():
        s = json.loads(speed.read_text())
        lines.append("### Predict vs evaluate (seconds per LoRA, one thread)\n")
        lines.append(
            f"predict from PEFT folders {s['predict_files_s_per_lora']:.4f} s, from the store "
            f"{s.get('predict_store_s_per_lora', float('nan')):.5f} s; running the finetuned "
            f"model on {s['n_eval_examples']} eval examples {s['evaluate_s_per_lora']:.3f} s: "
            f"{s['speedup_files']:.0f}x (files), {s.get('speedup_store', float('nan')):.0f}x "
            f"(store) faster (measured eval_loss matches labels.csv to "
            f"{s['eval_loss_max_abs_diff_vs_labels']:.1e})."
        )
    print("\n".join(lines))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
