"""The end-to-end demo behind ``loralens demo``: a small skills-lm zoo of real PEFT finetunes ->
a packed store -> every registered model on ``eval_loss``, the skill loss that varies most and
one data-membership label -> the benchmark table, plots, and a verdict in plain words."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from loralens.jsonio import write_json
from loralens.learn.bench.benchmark import HPARAMS_ONLY, NO_WEIGHTS, PRIMARY, run_benchmark
from loralens.learn.fitting.probes import PROBES
from loralens.models.registry import MODEL_NAMES
from loralens.store import LoRAStore

#: The regression target of the demo (a skills-lm label).
REGRESSION_TARGET = "eval_loss"
#: The prefix of skills-lm's per-skill loss columns.
SKILL_LOSS = "loss_"
#: One line under the demo's table.
HOW_TO_READ = (
    "How to read it: each cell is a test metric on LoRAs no model saw in training, mean ± std "
    "over seeds. R² is 1 for perfect predictions and 0 for always predicting the training "
    "LoRAs' mean (the no-weights row; a little below 0 where the test LoRAs' mean differs). "
    "The probe rows are linear models of the same weights: a model is worth its cost where it "
    "beats them (▼ marks one that does not)."
)
#: How far above the better of "no weights" and "hyperparameters only" the best model must be
#: for the verdict to call it "well above" / "above" them (R² or accuracy).
WELL_ABOVE = {"r2": 0.2, "accuracy": 0.1}
ABOVE = {"r2": 0.05, "accuracy": 0.03}
METRIC_WORDS = {"r2": "R²", "accuracy": "accuracy"}


def most_balanced(store: LoRAStore, columns: Sequence[str]) -> str:
    """The binary label column whose positive rate is closest to one half (ties: by name)."""
    rates = {c: float(store.labels([c]).mean()) for c in columns}
    return min(columns, key=lambda c: (abs(rates[c] - 0.5), c))


def most_varied(store: LoRAStore, columns: Sequence[str]) -> str:
    """The label column with the largest standard deviation over the store (ties: by name)."""
    spread = {c: float(np.nanstd(store.labels([c]))) for c in columns}
    return min(columns, key=lambda c: (-spread[c], c))


def demo_targets(store: LoRAStore, binary_columns: Sequence[str]) -> list[str]:
    """``eval_loss``; the per-skill loss (``loss_*``) that varies most over the zoo, a label the
    finetunes move much more than the mean over all skills; and, when the zoo has 0/1 label
    columns, the most balanced of them."""
    skills = [c for c in store.label_columns if c.startswith(SKILL_LOSS)]
    binary = [c for c in binary_columns if c in store.label_columns]
    return (
        [REGRESSION_TARGET]
        + ([most_varied(store, skills)] if skills else [])
        + ([most_balanced(store, binary)] if binary else [])
    )


def describe_target(target: str) -> str:
    """What a skills-lm label means, for someone who has not read the preset."""
    if target == "eval_loss":
        return "the finetuned model's loss on held-out examples of all 14 skills"
    if target == "eval_acc":
        return "the finetuned model's exact-match accuracy on held-out examples"
    if target.startswith(SKILL_LOSS):
        return f"the finetuned model's loss on held-out examples of the '{target[5:]}' skill"
    if target.startswith("src_"):
        return f"whether the LoRA's finetuning data included the '{target[4:]}' skill"
    return target


def _mean(table: Mapping[str, Any], row: str, target: str, key: str) -> float | None:
    cell = table.get(row, {}).get(target)
    if not cell or "skipped" in cell or key not in cell:
        return None
    return cell[key]["mean"]


def verdict(result: Mapping[str, Any]) -> list[str]:
    """The demo's last lines, from a benchmark result (``run_benchmark``): per target, the best
    model against "no weights", "hyperparameters only" and the linear probes, whether the
    networks added anything to their linear base, and one sentence of summary."""
    seeds = len(result["seeds"])
    lines = [f"What the demo learned (on test LoRAs no model saw, mean over {seeds} seed(s)):"]
    learned = []
    for target in result["targets"]:
        line, well_above = _target_line(result["table"], result["models"], target)
        lines += [line, "  " + _network_line(result["runs"], target)]
        learned += [target] if well_above else []
    if learned:
        lines.append(
            f"In short: from the adapter weights alone the models learned {_join(learned)} well "
            "beyond what knowing nothing or knowing the training recipe gives."
        )
    else:
        lines.append(
            "In short: on this zoo the weights told the models little beyond the training "
            "recipe; a larger zoo (--num) gives them more to learn from."
        )
    return lines


def _target_line(table: Mapping[str, Any], models: Sequence[str], target: str) -> tuple[str, bool]:
    """One target's line (the best model against the rows that use no weights, and the probes)
    and whether the best model is well above those rows. R² is measured from 0, the training
    mean's, where those rows score below it; a margin within the best model's spread over seeds
    is no margin."""
    kind = next((table[m][target]["task"] for m in models if target in table.get(m, {})), None)
    key = PRIMARY[kind or "regression"]
    scores = {m: v for m in models if (v := _mean(table, m, target, key)) is not None}
    if not scores:
        return f"- {target}: no model gave a score.", False
    best = max(scores, key=lambda m: scores[m])
    tied = [m for m in models if m in scores and scores[best] - scores[m] < 5e-4]
    who = f"best: {best}" if len(tied) == 1 else f"best: {len(tied)} models tie"
    who = "every model alike" if len(tied) == len(models) else who
    refs = {
        "knowing nothing": _mean(table, NO_WEIGHTS, target, key),
        "from the finetuning hyperparameters": _mean(table, HPARAMS_ONLY, target, key),
    }
    refs = {how: v for how, v in refs.items() if v is not None}
    probes = [v for p in PROBES if (v := _mean(table, p, target, key)) is not None]
    floor = 0.0 if key == "r2" else -math.inf
    margin = scores[best] - max(floor, *refs.values()) if refs else None
    spread = table[best][target][key].get("std") or 0.0
    them = "both" if len(refs) > 1 else "it"
    if margin is None:
        word = "with nothing to compare"
    elif margin >= WELL_ABOVE[key] and margin > spread:
        word = f"well above {them}"
    elif margin >= ABOVE[key] and margin > spread:
        word = f"above {them}"
    elif margin > -max(ABOVE[key], spread):
        word = f"level with {them}" + (
            " within the spread over seeds" if spread > ABOVE[key] else ""
        )
    else:
        word = f"below {'the better of them' if len(refs) > 1 else 'it'}"
    against = " and ".join(f"{v:.2f} {how}" for how, v in refs.items())
    line = (
        f"- {target} ({describe_target(target)}): {METRIC_WORDS[key]} {scores[best]:.2f} ± "
        f"{spread:.2f} from the weights ({who}), against {against or 'no reference'}: "
        f"{word}" + (f"; a linear probe of the weights gets {max(probes):.2f}." if probes else ".")
    )
    return line, word.startswith("well above")


def _network_line(runs: Sequence[Mapping[str, Any]], target: str) -> str:
    """Whether the networks beat their linear base (the epoch-0 model) on a target, and why not."""
    mine = [r for r in runs if r["target"] == target]
    kept = [r for r in mine if r["best_epoch"] > 0]
    if not kept:
        return (
            f"Every one of the {len(mine)} runs kept its linear base alone (epoch 0): no network "
            "beat a linear map of each layer's update on the validation LoRAs (a paired "
            "t-test), so the models' rows are that linear map."
        )
    models = sorted({r["model"] for r in kept})
    return (
        f"The network improved on its linear base in {len(kept)} of {len(mine)} runs "
        f"({', '.join(models)}); the others kept the linear base alone (epoch 0)."
    )


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def run_demo(
    out: str | os.PathLike,
    *,
    num: int = 192,
    seeds: int = 3,
    epochs: int = 40,
    threads: int | None = None,
    size: str = "tiny",
    log: Callable[[str], None] | None = None,
    on_run: Callable[[int, int, str], None] | None = None,
) -> dict[str, Any]:
    """Build OUT/zoo (resumable), pack OUT/store, benchmark into OUT/benchmark, write
    OUT/demo.json; ``log`` gets one line per step, ``on_run`` the benchmark's progress
    (``run_benchmark``). Returns the benchmark's ``markdown``, the ``verdict`` lines, the
    ``plots`` written, the ``targets``, ``num`` LoRAs packed and the ``seconds`` taken."""
    from loralens.store import pack
    from loralens.zoo.builder import build_zoo

    log = log or (lambda msg: None)
    t0 = time.time()
    root = Path(out)
    zoo_dir = root / "zoo"
    log(
        f"[1/3] building a {num}-LoRA skills-lm zoo ({size} base) in {zoo_dir} "
        "(resumes if interrupted)"
    )
    manifest = build_zoo("skills-lm", num, zoo_dir, threads=threads, options={"size": size})
    log(f"      done in {time.time() - t0:.0f}s")
    t1 = time.time()
    store, refused = pack(zoo_dir, root / "store", overwrite=True, skip_bad=True)
    log(f"[2/3] packed {len(store)} LoRAs into {store.path} ({time.time() - t1:.1f}s)")
    for name, why in refused:
        log(f"      skipped {name}: {why}")
    targets = demo_targets(store, manifest.get("binary_columns", []))
    log(f"[3/3] training {len(MODEL_NAMES)} models on {', '.join(targets)}")
    bench_dir = root / "benchmark"
    result = run_benchmark(
        store,
        targets,
        models=MODEL_NAMES,
        seeds=seeds,
        epochs=epochs,
        out_dir=bench_dir,
        threads=1,  # small models: one thread is fastest and never oversubscribes the CPU
        log=lambda m: log("      " + m),
        on_run=on_run,
    )
    lines = verdict(result)
    summary = {"seconds": time.time() - t0, "targets": targets, "num": len(store)}
    write_json(root / "demo.json", {**summary, "verdict": lines})
    plots = sorted(str(p) for p in (bench_dir / "runs").rglob("*.png"))
    markdown = result["markdown"] + "\n\n" + HOW_TO_READ
    return {
        **summary,
        "markdown": markdown,
        "verdict": lines,
        "plots": plots,
        "benchmark": str(bench_dir),
    }


__all__ = [
    "HOW_TO_READ",
    "demo_targets",
    "describe_target",
    "most_balanced",
    "most_varied",
    "run_demo",
    "verdict",
]
