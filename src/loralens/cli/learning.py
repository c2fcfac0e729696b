"""`loralens train`, `evaluate`, `predict`, `benchmark` and `demo`: learning on a store of LoRAs."""

from __future__ import annotations

import json
import os
from typing import Any

import typer

from loralens.cli.common import console, echo_json, fail, interval, num, user_errors
from loralens.cli.options import AsJson, Overwrite, Store, Threads

commands = typer.Typer()
#: The registered models' names, for help texts: written out so that the command line starts
#: without importing torch (tests/cli/test_startup.py checks they are ``MODEL_NAMES``).
MODEL_CHOICES = ("mlp", "mlp-oalign", "mlp-svd", "mlp-dense", "glnet", "w2t")
WHERE_HELP = (
    "Use only rows where FILTER holds: comparisons, in [..], and/or/not over label columns, "
    "e.g. 'rank == 4 and lr < 1e-3'."
)
LINEAR_BASE_HELP = (
    "The model's linear base, fitted before the network learns what it misses: auto (update: "
    "each layer's update in the basis of the training updates, over its norm, with the "
    "spectra; the same at any width), update, dense, spectral, or none (the network alone)."
)


def _parse_hparams(items: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--hparam takes KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _metrics_table(title: str, columns: dict[str, dict[str, Any]]) -> None:
    """Print metrics side by side: one column per source (e.g. model vs no-weights baseline)."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    for name in columns:
        table.add_column(name, justify="right")
    keys = list(dict.fromkeys(k for c in columns.values() for k in c))
    for k in keys:
        table.add_row(
            k, *(v if isinstance(v := c.get(k), str) else num(v, ".4g") for c in columns.values())
        )
    console().print(table)


@commands.command(
    epilog="Examples:\n\n"
    "  loralens train --data zoo.store --target eval_loss --model glnet --out runs/glnet\n\n"
    "  loralens train --data zoo.store --target 'src_*' --model mlp-dense --out runs/membership\n\n"
    "  loralens train --data zoo.store --target task_acc --model glnet --out r --where 'rank == 4'\n\n"
    "  accelerate launch --multi_gpu --num_processes 2 -m loralens train --data ... (DDP)"
)
def train(
    data: Store,
    target: str = typer.Option(..., help="Label column(s): COL[,COL...] or a glob like 'src_*'."),
    model: str = typer.Option("glnet", help=f"One of {', '.join(MODEL_CHOICES)}."),
    out: str = typer.Option(..., help="Run directory for checkpoint, metrics.json and plots."),
    seed: int = typer.Option(0, help="Seed of the split, the init and the batch order."),
    epochs: int = typer.Option(None, help="Maximum epochs (default: per model)."),
    lr: float = typer.Option(None, help="Learning rate (default: per model)."),
    batch_size: int = typer.Option(None, help="Batch size (default: per model)."),
    weight_decay: float = typer.Option(None, help="AdamW weight decay (default: per model)."),
    patience: int = typer.Option(None, help="Early-stopping patience in epochs."),
    where: str = typer.Option(None, metavar="FILTER", help=WHERE_HELP),
    task: str = typer.Option(None, help="Force 'regression' or 'classification'."),
    hparam: list[str] = typer.Option(None, help="Model hyperparameter KEY=VALUE (repeatable)."),
    threads: Threads = None,
    folds: int = typer.Option(
        None, help="Cross-validation folds (default: 5 below 60 labelled LoRAs; 1: one split)."
    ),
    linear_base: str = typer.Option("auto", help=LINEAR_BASE_HELP),
    coverage: float = typer.Option(0.9, help="Coverage of intervals / prediction sets."),
    interval: str = typer.Option(
        "normalized", help="'normalized' (wider for unusual LoRAs) or 'plain' intervals."
    ),
    calibration: float = typer.Option(
        0.1, help="Share of LoRAs held out of training to calibrate on (0: none)."
    ),
    ood_share: float = typer.Option(
        0.05, help="Share of in-distribution LoRAs the fit check flags (its threshold)."
    ),
    overwrite: Overwrite = False,
    quiet: bool = typer.Option(False, "--quiet", help="No per-epoch lines."),
    as_json: AsJson = False,
) -> None:
    """Train a model to predict label columns from LoRA weights.

    Writes OUT/metrics.json (test metrics at the best validation epoch), OUT/model.safetensors
    + OUT/config.json (all that `predict` needs), predictions.csv and PNG plots. The task type
    follows from the labels (all 0/1: classification; else regression).
    """
    from loralens.learn.fitting.data import resolve_targets
    from loralens.learn.runs.folder import load_run
    from loralens.learn.runs.report import (
        calibration_lines,
        probe_verdict,
        train_columns,
        train_title,
    )
    from loralens.learn.runs.standing import standing_line
    from loralens.learn.training.config import TrainConfig
    from loralens.learn.training.loop import train as train_run
    from loralens.store import LoRAStore

    hparams = _parse_hparams(hparam)
    with user_errors():
        store = LoRAStore(data)
        config = TrainConfig(
            model=model,
            targets=resolve_targets(store, target),
            seed=seed,
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            weight_decay=weight_decay,
            patience=patience,
            where=where,
            task=task,
            hparams=hparams,
            threads=threads,
            folds=folds,
            linear_base=linear_base,
            coverage=coverage,
            interval=interval,
            calibration=calibration,
            ood_share=ood_share,
        )
        metrics = train_run(store, config, out, progress=not quiet, overwrite=overwrite)
    if int(os.environ.get("RANK", "0")) != 0:  # one report under `accelerate launch`
        return
    if as_json:
        echo_json(metrics)
        return
    _metrics_table(train_title(metrics), train_columns(metrics))
    for line in [*probe_verdict(metrics), *calibration_lines(metrics.get("calibration"))]:
        typer.echo(line)
    with user_errors():
        typer.echo(f"this run: {standing_line(load_run(out).standing)}")
    typer.echo(f"wrote {out}/metrics.json, model.safetensors, config.json and plots")


@commands.command(
    epilog="Examples:\n\n"
    "  loralens evaluate runs/glnet --data other-base.store\n\n"
    "  loralens evaluate runs/glnet --data ranks.store --where 'rank == 16' --json"
)
def evaluate(
    data: Store,
    run_dir: str = typer.Argument(..., help="A run directory written by `loralens train`."),
    where: str = typer.Option(None, metavar="FILTER", help=WHERE_HELP),
    out: str = typer.Option(None, help="Also write OUT/evaluate.json."),
    coverage: float = typer.Option(None, help="Coverage of the intervals (default: the run's)."),
    as_json: AsJson = False,
) -> None:
    """Metrics of a trained model on every LoRA of a store, and how its intervals (or sets)
    and its fit check hold there."""
    from loralens.learn.runs.evaluation import evaluate as evaluate_run
    from loralens.learn.runs.report import calibration_lines
    from loralens.learn.runs.standing import standing_line

    with user_errors():
        result = evaluate_run(run_dir, data, where=where, out_dir=out, coverage=coverage)
    if as_json:
        echo_json(result)
        return
    columns = {"model": result["metrics"]}
    if "baseline" in result:
        columns["no weights"] = result["baseline"]
    _metrics_table(
        f"{result['model']} on {', '.join(result['targets'][:6])}: {result['n']} LoRAs of "
        f"{result['store']}",
        columns,
    )
    for line in calibration_lines(result["calibration"], key="report"):
        typer.echo(line)
    typer.echo(f"this run: {standing_line(result['run'])}")
    for note in result.get("warnings", []):
        typer.secho(f"warning: {note}", fg=typer.colors.YELLOW, err=True)


@commands.command(
    epilog="Examples:\n\n"
    "  loralens predict runs/glnet my_adapter/ other_lora.safetensors\n\n"
    "  loralens predict runs/glnet uploads/ --json > predictions.json   (a folder of adapters)\n\n"
    "Exit code 1 when any adapter could not be read or does not fit (its row says why)."
)
def predict(
    run_dir: str = typer.Argument(..., help="A run directory written by `loralens train`."),
    adapters: list[str] = typer.Argument(
        ..., help="Adapters: PEFT folders, LoRA files, or folders of them."
    ),
    as_json: bool = typer.Option(
        False, "--json", help="A JSON list of rows: prediction, interval or set, fit check."
    ),
    coverage: float = typer.Option(None, help="Coverage of the intervals (default: the run's)."),
    batch_size: int = typer.Option(64, help="Adapters per forward pass."),
) -> None:
    """Predict label(s) for new adapters in any supported format, without running them: with an
    interval (or probability and prediction set) and a check that each adapter fits the model
    (! marks one that does not look like the training LoRAs; its reasons follow the table)."""
    from rich.markup import escape
    from rich.table import Table

    from loralens.learn.runs.folder import load_run
    from loralens.learn.runs.prediction import UNCALIBRATED
    from loralens.learn.runs.prediction import predict as predict_rows
    from loralens.learn.runs.standing import standing_line

    with user_errors():
        run = load_run(run_dir)
        rows = predict_rows(run, adapters, batch_size=batch_size, coverage=coverage)
    failed = [r for r in rows if r["error"] is not None]
    if as_json:
        echo_json(rows)
    else:
        task = run.task
        kind = "probability" if task.kind == "classification" else "predicted"
        level = next((r["coverage"] for r in rows if r["coverage"] is not None), None)
        extra = (
            ""
            if level is None
            else f" ({level:.0%} {'set' if kind == 'probability' else 'interval'})"
        )
        table = Table(
            title=f"{run.config['model']['name']}: {kind} {', '.join(task.targets[:6])}{extra}"
        )
        table.add_column("adapter")
        table.add_column("fit")
        for t in task.targets:
            table.add_column(t, justify="right")
        for row in rows:
            cells = [_cell(row, t) for t in task.targets]
            table.add_row(escape(row["adapter"]), _fit_mark(row), *cells)
        console().print(table)
        typer.echo(f"this run: {standing_line(run.standing)}")
        for problem in run.standing["problems"]:
            typer.secho(f"not calibrated: {problem}", fg=typer.colors.YELLOW, err=True)
        for row in rows:
            for reason in row["reasons"]:
                typer.secho(f"! {row['adapter']}: {reason}", fg=typer.colors.YELLOW, err=True)
            if row["error"] is not None:
                typer.secho(f"error: {row['error']}", fg=typer.colors.RED, err=True)
        if any(row["seen"] for row in rows):
            typer.echo(
                "trained on it: the run learned from this adapter, so its prediction is not a "
                "test of the run"
            )
        if not run.calibration:
            typer.secho(f"note: {UNCALIBRATED}", fg=typer.colors.YELLOW, err=True)
    if failed:
        raise typer.Exit(code=1)


def _fit_mark(row: dict[str, Any]) -> str:
    """ "ok", "!" (flagged by the fit check), "error", or "-" (no fit check: uncalibrated),
    and "trained on it" when the run learned from the adapter."""
    if row["error"] is not None:
        return "error"
    mark = "-" if row["in_distribution"] is None else "ok" if row["in_distribution"] else "!"
    return mark + (", trained on it" if row.get("seen") else "")


def _cell(row: dict[str, Any], target: str) -> str:
    """A prediction with its interval [lo, hi] or its probability and prediction set."""
    if row["error"] is not None:
        return ""
    value = num(row["prediction"][target], ".4g")
    if row.get("interval"):
        lo, hi = row["interval"][target]
        return f"{value} {interval(lo, hi)}"
    if row.get("set"):
        return f"{value} {{{', '.join(map(str, row['set'][target]))}}}"
    return value


@commands.command(
    epilog="Examples:\n\n"
    "  loralens benchmark --zoo zoos/skills-lm-500 --targets eval_loss,task_acc --targets 'src_*'\n\n"
    "  loralens benchmark --data zoo.store --targets eval_loss --models glnet,mlp-svd --seeds 3\n\n"
    "Each --targets value is one target family (COL[,COL] or a glob); a family of several\n"
    "columns is one multi-output model (e.g. 'src_*' = data membership)."
)
def benchmark(
    zoo: str = typer.Option(None, help="A zoo folder (adapters/ + labels.csv), packed first."),
    data: str = typer.Option(None, help="A packed store instead of a zoo."),
    targets: list[str] = typer.Option(..., help="Target family (repeatable)."),
    models: str = typer.Option(
        "all", help=f"Comma-separated model names ({', '.join(MODEL_CHOICES)}), or 'all'."
    ),
    seeds: int = typer.Option(3, help="Seeds (splits and inits) per cell."),
    epochs: int = typer.Option(None, help="Maximum epochs per run (default: per model)."),
    where: str = typer.Option(None, metavar="FILTER", help=WHERE_HELP),
    out: str = typer.Option("loralens-benchmark", help="Output folder (tables, runs, store)."),
    threads: Threads = None,
    linear_base: str = typer.Option("auto", help=LINEAR_BASE_HELP),
    as_json: AsJson = False,
) -> None:
    """Table of models x targets, mean ± std over seeds, with baseline rows.

    Rows: every model, 'no weights' (train mean / majority class) and 'hyperparameters only'
    (trees on the zoo's finetuning hyperparameters). Writes OUT/benchmark.md and .json.
    """
    from pathlib import Path

    from loralens.learn.bench.benchmark import run_benchmark
    from loralens.store import pack_zoo_cached

    if bool(zoo) == bool(data):
        fail("give either --zoo DIR or --data STORE", code=2)

    def log(msg: str) -> None:
        typer.echo(msg, err=True)

    from loralens.models.registry import MODEL_NAMES

    names = list(MODEL_NAMES) if models == "all" else [m for m in models.split(",") if m]
    with user_errors():
        store = data or str(pack_zoo_cached(zoo, Path(out) / "store", log))
        result = run_benchmark(
            store,
            targets,
            models=names,
            seeds=seeds,
            epochs=epochs,
            where=where,
            out_dir=out,
            threads=threads,
            linear_base=linear_base,
            log=log,
        )
    if as_json:
        echo_json({k: v for k, v in result.items() if k != "runs"})
    else:
        typer.echo(result["markdown"])
        typer.echo(f"\nwrote {out}/benchmark.md and {out}/benchmark.json")


@commands.command(
    epilog="Example:\n\n  loralens demo            (on 2 shared CPU cores at load 11-20: the zoo "
    "builds at about 3 LoRAs a minute, the training step takes 14 minutes; see "
    "benchmarks/BENCHMARKS.md)\n\n"
    "  loralens demo --out /tmp/demo --num 96 --seeds 3"
)
def demo(
    out: str = typer.Option("loralens-demo", help="Where the zoo, store, runs and plots go."),
    num: int = typer.Option(192, help="LoRAs in the demo zoo (the build is most of the time)."),
    seeds: int = typer.Option(3, help="Seeds (splits and inits) per model."),
    epochs: int = typer.Option(40, help="Maximum epochs per model."),
    threads: int = typer.Option(None, help="Torch threads for the zoo build."),
    size: str = typer.Option(
        "tiny", help="Base model size: tiny (a few minutes on 2 CPU cores) or small (the zoos')."
    ),
) -> None:
    """The end-to-end demo: zoo -> store -> every model -> table, plots and a verdict.

    Builds a small skills-lm zoo of real PEFT finetunes, packs it, trains every model on
    eval_loss, the skill loss that varies most over the zoo and one data-membership label,
    prints the table, writes plots and ends with a verdict: what the weights told the models,
    against knowing nothing and knowing the finetuning hyperparameters.
    """
    from loralens.cli.common import progress
    from loralens.learn.bench.demo import run_demo

    bar = progress()
    task = None

    def on_run(done: int, total: int, what: str) -> None:
        """The training step's bar: which run is under way, how many are done, elapsed, ETA."""
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task("training", total=total)
        bar.update(task, completed=done, description=f"training {what}")
        if done == total:
            bar.stop()

    with user_errors():
        try:
            result = run_demo(
                out,
                num=num,
                seeds=seeds,
                epochs=epochs,
                threads=threads,
                size=size,
                log=typer.echo,
                on_run=on_run,
            )
        finally:
            bar.stop()
    typer.echo("")
    typer.echo(result["markdown"])
    runs = f"{result['benchmark']}/runs"
    typer.echo(f"\nplots: {len(result['plots'])} PNGs under {runs}")
    typer.echo(f"table: {result['benchmark']}/benchmark.md (+ .json)")
    typer.echo(f"total {result['seconds']:.0f}s\n")
    for line in result["verdict"]:
        typer.echo(line)
