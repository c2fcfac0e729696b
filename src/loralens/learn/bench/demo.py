"""The end-to-end demo behind ``loralens demo``: a small skills-lm zoo of real PEFT finetunes ->
a packed store -> every registered model on ``eval_loss`` and one data-membership label ->
the benchmark table and plots."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from loralens.jsonio import write_json
from loralens.learn.bench.benchmark import run_benchmark
from loralens.models.registry import MODEL_NAMES
from loralens.store import LoRAStore

#: The regression target of the demo (a skills-lm label).
REGRESSION_TARGET = "eval_loss"
#: One line under the demo's table.
HOW_TO_READ = (
    "How to read it: each cell is a test metric, mean ± std over seeds (R²: 1 is perfect, 0 is "
    "the no-weights row); a model is worth its cost only where it beats the probe rows, linear "
    "models of the same weights (▼ marks a model that does not)."
)


def most_balanced(store: LoRAStore, columns: Sequence[str]) -> str:
    """The binary label column whose positive rate is closest to one half (ties: by name)."""
    rates = {c: float(store.labels([c]).mean()) for c in columns}
    return min(columns, key=lambda c: (abs(rates[c] - 0.5), c))


def demo_targets(store: LoRAStore, binary_columns: Sequence[str]) -> list[str]:
    """``eval_loss`` and, when the zoo has 0/1 label columns, the most balanced of them."""
    binary = [c for c in binary_columns if c in store.label_columns]
    return [REGRESSION_TARGET] + ([most_balanced(store, binary)] if binary else [])


def run_demo(
    out: str | os.PathLike,
    *,
    num: int = 192,
    seeds: int = 3,
    epochs: int = 40,
    threads: int | None = None,
    size: str = "tiny",
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Build OUT/zoo (resumable), pack OUT/store, benchmark into OUT/benchmark, write
    OUT/demo.json; ``log`` gets one line per step. Returns the benchmark's ``markdown``, the
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
    )
    summary = {"seconds": time.time() - t0, "targets": targets, "num": len(store)}
    write_json(root / "demo.json", summary)
    plots = sorted(str(p) for p in (bench_dir / "runs").rglob("*.png"))
    markdown = result["markdown"] + "\n\n" + HOW_TO_READ
    return {**summary, "markdown": markdown, "plots": plots, "benchmark": str(bench_dir)}


__all__ = ["HOW_TO_READ", "demo_targets", "most_balanced", "run_demo"]
