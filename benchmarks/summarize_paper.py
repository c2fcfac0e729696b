"""Markdown summary of benchmarks/paper_tables.sh results: python benchmarks/summarize_paper.py OUT."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def _ms(values: list[float]) -> str:
    v = [x for x in values if x is not None]
    if not v:
        return "-"
    return f"{np.mean(v):.3f} ± {np.std(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}"


def main(out: Path) -> None:
    lines = []
    for bench in sorted(out.glob("bench-*/benchmark.md")):
        res = json.loads((bench.parent / "benchmark.json").read_text())
        lines.append(f"### {bench.parent.name} ({res['num_loras']} LoRAs)\n")
        lines.append(bench.read_text().strip() + "\n")
    ranks = out / "ranks"
    if ranks.is_dir():
        lines.append("### Rank generalization (trained on rank 4 only; eval_loss R² / Kendall τ)\n")
        lines.append("| model | r=1 | r=2 | r=4 (test split) | r=8 | r=16 |")
        lines.append("|---|---|---|---|---|---|")
        for model_dir in sorted(p for p in ranks.iterdir() if p.is_dir()):
            cells = []
            for r in (1, 2, 4, 8, 16):
                r2, tau = [], []
                for seed in sorted(model_dir.glob("seed*")):
                    if r == 4:
                        m = json.loads((seed / "metrics.json").read_text())["test"]
                    else:
                        f = seed / f"rank{r}" / "evaluate.json"
                        if not f.exists():
                            continue
                        m = json.loads(f.read_text())["metrics"]
                    r2.append(m.get("r2"))
                    tau.append(m.get("kendall_tau"))
                cells.append(f"{_ms(r2)} / {_ms(tau)}")
            lines.append(f"| {model_dir.name} | " + " | ".join(cells) + " |")
        lines.append("")
    transfer = out / "transfer"
    if transfer.is_dir():
        lines.append("### Transfer to the base variant (eval_loss; R² / Kendall τ)\n")
        lines.append("| model | same base (test split) | variant base (all its LoRAs) |")
        lines.append("|---|---|---|")
        for model_dir in sorted(p for p in transfer.iterdir() if p.is_dir()):
            same, other = [], []
            for seed in sorted(model_dir.glob("seed*")):
                run = out / "bench-skills-lm" / "runs" / "eval_loss" / model_dir.name / seed.name
                same.append(json.loads((run / "metrics.json").read_text())["test"])
                other.append(json.loads((seed / "evaluate.json").read_text())["metrics"])
            cell = lambda ms: (
                f"{_ms([m.get('r2') for m in ms])} / {_ms([m.get('kendall_tau') for m in ms])}"
            )  # noqa: E731
            lines.append(f"| {model_dir.name} | {cell(same)} | {cell(other)} |")
        lines.append("")
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
