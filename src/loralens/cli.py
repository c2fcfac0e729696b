"""The `loralens` command line: one thin function per command; the work lives in the library."""

from __future__ import annotations

import typer

from loralens.models.registry import MODEL_NAMES

app = typer.Typer(
    help="Learning on LoRAs: read LoRA adapters as data and predict properties of the finetuned model.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
zoo_app = typer.Typer(help="Build datasets ('zoos') of real LoRA finetunes.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")

from loralens.zoo.commands import register as _register_zoo_commands  # noqa: E402

_register_zoo_commands(zoo_app)

from loralens.zoo.samples import register as _register_zoo_samples  # noqa: E402

_register_zoo_samples(zoo_app)


@app.command()
def version() -> None:
    """Print the loralens version."""
    from loralens import __version__

    typer.echo(__version__)


# ---------------------------------------------------------------------------- learning on zoos


def _fail(message: str, code: int = 1) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _progress():
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=True,
    )


@app.command(
    epilog="Examples:\n\n"
    "  loralens pack zoo/adapters --labels zoo/labels.csv --out zoo.store\n\n"
    "  loralens pack my_loras/ --labels labels.csv --out s --dtype float16 --skip-bad\n\n"
    "  loralens pack zoo/ --out zoo.store   (a zoo folder: adapters/ + labels.csv)"
)
def pack(
    adapters_dir: str = typer.Argument(..., help="Folder of adapters: PEFT folders or files."),
    labels: str = typer.Option(None, help="CSV whose first column `adapter` names each adapter."),
    out: str = typer.Option(..., help="The store directory to create (or extend with --append)."),
    dtype: str = typer.Option("float32", help="float32 or float16 weights in the store."),
    append: bool = typer.Option(False, help="Add to an existing store."),
    overwrite: bool = typer.Option(False, help="Replace an existing store."),
    skip_bad: bool = typer.Option(
        False, help="Pack the rest when some adapters are unreadable or do not fit."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> None:
    """Pack a folder of LoRA adapters plus their labels into a memory-mapped store.

    Adapters that cannot be read or whose layers do not match the others are refused and
    listed; unless --skip-bad, nothing is written when any is refused.
    """
    import json

    from loralens.store import PackError, StoreError
    from loralens.store import pack as pack_store

    with _progress() as bar:
        task = bar.add_task("packing", total=None)

        def tick(i, n, name):
            bar.update(task, completed=i, total=n)

        try:
            store, refused = pack_store(
                adapters_dir,
                out,
                labels=labels,
                dtype=dtype,
                append=append,
                overwrite=overwrite,
                skip_bad=skip_bad,
                progress=tick,
            )
        except PackError as e:
            bar.stop()
            for name, why in e.refused:
                typer.echo(f"refused {name}: {why}", err=True)
            _fail(str(e))
        except (StoreError, FileNotFoundError) as e:
            bar.stop()
            _fail(str(e))
    summary = {
        "store": str(store.path),
        "num_loras": len(store),
        "layers": len(store.names),
        "ranks": sorted({int(r) for r in store.index["rank"]}),
        "label_columns": store.label_columns,
        "bytes": store.nbytes,
        "refused": [{"adapter": n, "reason": r} for n, r in refused],
    }
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    for name, why in refused:
        typer.echo(f"skipped {name}: {why}", err=True)
    typer.echo(
        f"packed {len(store)} LoRAs ({len(store.names)} layers, ranks {summary['ranks']}, "
        f"{store.nbytes / 2**20:.1f} MiB) into {store.path}"
    )
    typer.echo(f"label columns: {', '.join(store.label_columns)}")


def _parse_hparams(items: list[str] | None) -> dict:
    import json

    out = {}
    for item in items or []:
        key, _, value = item.partition("=")
        if not _:
            _fail(f"--hparam takes KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


@app.command(
    epilog="Examples:\n\n"
    "  loralens train --data zoo.store --target eval_loss --model glnet --out runs/glnet\n\n"
    "  loralens train --data zoo.store --target 'src_*' --model mlp-dense --out runs/membership\n\n"
    "  loralens train --data zoo.store --target task_acc --model glnet --out r --where 'rank == 4'\n\n"
    "  accelerate launch --multi_gpu --num_processes 2 -m loralens train --data ... (DDP)"
)
def train(
    data: str = typer.Option(..., help="A packed store (see `loralens pack`)."),
    target: str = typer.Option(..., help="Label column(s): COL[,COL...] or a glob like 'src_*'."),
    model: str = typer.Option("glnet", help=f"One of {', '.join(MODEL_NAMES)}."),
    out: str = typer.Option(..., help="Run directory for checkpoint, metrics.json and plots."),
    seed: int = typer.Option(0, help="Seed of the split, the init and the batch order."),
    epochs: int = typer.Option(None, help="Maximum epochs (default: per model)."),
    lr: float = typer.Option(None, help="Learning rate (default: per model)."),
    batch_size: int = typer.Option(None, help="Batch size (default: per model)."),
    weight_decay: float = typer.Option(None, help="AdamW weight decay (default: per model)."),
    patience: int = typer.Option(None, help="Early-stopping patience in epochs."),
    where: str = typer.Option(None, help="Use only rows matching a query, e.g. 'rank == 4'."),
    task: str = typer.Option(None, help="Force 'regression' or 'classification'."),
    hparam: list[str] = typer.Option(None, help="Model hyperparameter KEY=VALUE (repeatable)."),
    threads: int = typer.Option(None, help="Torch CPU threads (1 is fastest on a busy CPU)."),
    quiet: bool = typer.Option(False, help="No per-epoch lines."),
) -> None:
    """Train a LoL model to predict label columns from LoRA weights.

    Writes OUT/metrics.json (test metrics at the best validation epoch), OUT/model.safetensors
    + OUT/config.json (all that `predict` needs), predictions.csv and PNG plots. The task type
    follows from the labels (all 0/1: classification; else regression).
    """
    import json

    from loralens.learn.data import resolve_targets
    from loralens.learn.loop import TrainConfig
    from loralens.learn.loop import train as train_run
    from loralens.store import LoRAStore, StoreError

    try:
        store = LoRAStore(data)
        cols = resolve_targets(store, target)
        cfg = TrainConfig(
            model=model,
            targets=cols,
            seed=seed,
            epochs=epochs,
            lr=lr,
            batch_size=batch_size,
            weight_decay=weight_decay,
            patience=patience,
            where=where,
            task=task,
            hparams=_parse_hparams(hparam),
            threads=threads,
        )
        metrics = train_run(store, cfg, out, progress=not quiet)
    except (StoreError, ValueError, FileNotFoundError) as e:
        _fail(str(e))
    import os

    if int(os.environ.get("RANK", "0")) == 0:  # one report under `accelerate launch`
        typer.echo(json.dumps({k: metrics[k] for k in ("task", "test", "val", "best_epoch")}))
        typer.echo(f"wrote {out}/metrics.json, model.safetensors, config.json and plots")


@app.command(
    epilog="Examples:\n\n"
    "  loralens evaluate runs/glnet --data other-base.store\n\n"
    "  loralens evaluate runs/glnet --data ranks.store --where 'rank == 16' --json"
)
def evaluate(
    run_dir: str = typer.Argument(..., help="A run directory written by `loralens train`."),
    data: str = typer.Option(..., help="The store to evaluate on (other ranks, other base)."),
    where: str = typer.Option(None, help="Evaluate only rows matching a query."),
    out: str = typer.Option(None, help="Also write OUT/evaluate.json."),
    as_json: bool = typer.Option(False, "--json", help="Print the full JSON."),
) -> None:
    """Metrics of a trained model on every LoRA of a store."""
    import json

    from loralens.learn.runs import evaluate as evaluate_run
    from loralens.store import StoreError

    try:
        result = evaluate_run(run_dir, data, where=where, out_dir=out)
    except (StoreError, ValueError, FileNotFoundError) as e:
        _fail(str(e))
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        typer.echo(json.dumps({k: result[k] for k in ("task", "n", "metrics")}))


@app.command(
    epilog="Examples:\n\n"
    "  loralens predict runs/glnet my_adapter/ other_lora.safetensors\n\n"
    "  loralens predict runs/glnet uploads/*.safetensors --json > predictions.json"
)
def predict(
    run_dir: str = typer.Argument(..., help="A run directory written by `loralens train`."),
    adapters: list[str] = typer.Argument(..., help="Adapters: PEFT folders or LoRA files."),
    as_json: bool = typer.Option(False, "--json", help="A JSON list of {adapter, prediction}."),
    batch_size: int = typer.Option(64, help="Adapters per forward pass."),
) -> None:
    """Predict label(s) for new adapters in any supported format, without running them."""
    import json

    from loralens.formats import LoRAFormatError
    from loralens.learn.runs import load_run
    from loralens.learn.runs import predict as predict_rows

    try:
        run = load_run(run_dir)
    except FileNotFoundError as e:
        _fail(str(e))
    try:
        rows = predict_rows(run, adapters, batch_size=batch_size)
    except (LoRAFormatError, ValueError, FileNotFoundError) as e:
        _fail(str(e), code=2)
    task = run.task
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    kind = "probability" if task.kind == "classification" else "predicted"
    table = Table(title=f"{run.config['model']['name']}: {kind} {', '.join(task.targets[:6])}")
    table.add_column("adapter")
    for t in task.targets:
        table.add_column(t, justify="right")
    for row in rows:
        table.add_row(row["adapter"], *(f"{row['prediction'][t]:.4g}" for t in task.targets))
    console = Console()
    if not console.is_terminal:  # piped: do not squeeze the table into 80 columns
        console = Console(width=160)
    console.print(table)


def _store_for(zoo: str | None, data: str | None, out: str, log) -> str:
    """A store path: ``data`` as is, or ``zoo`` packed into OUT/store (reused when up to date)."""
    from pathlib import Path

    from loralens.store import pack_zoo_cached

    if data:
        return data
    if not zoo:
        _fail("give --zoo DIR or --data STORE")
    return str(pack_zoo_cached(zoo, Path(out) / "store", log))


@app.command(
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
        "all", help=f"Comma-separated model names ({', '.join(MODEL_NAMES)}), or 'all'."
    ),
    seeds: int = typer.Option(3, help="Seeds (splits and inits) per cell."),
    epochs: int = typer.Option(None, help="Maximum epochs per run (default: per model)."),
    where: str = typer.Option(None, help="Use only rows matching a query, e.g. 'rank == 4'."),
    out: str = typer.Option("loralens-benchmark", help="Output folder (tables, runs, store)."),
    threads: int = typer.Option(None, help="Torch CPU threads (1 is fastest on a busy CPU)."),
    as_json: bool = typer.Option(False, "--json", help="Print the JSON result."),
) -> None:
    """Table of models x targets, mean ± std over seeds, with baseline rows.

    Rows: every model, 'no weights' (train mean / majority class) and 'hyperparameters only'
    (trees on the zoo's finetuning hyperparameters). Writes OUT/benchmark.md and .json.
    """
    import json

    from loralens.learn.benchmark import run_benchmark
    from loralens.store import StoreError

    def log(msg):
        typer.echo(msg, err=True)

    names = list(MODEL_NAMES) if models == "all" else [m for m in models.split(",") if m]
    try:
        store = _store_for(zoo, data, out, log)
        result = run_benchmark(
            store,
            targets,
            models=names,
            seeds=seeds,
            epochs=epochs,
            where=where,
            out_dir=out,
            threads=threads,
            log=log,
        )
    except (StoreError, ValueError, FileNotFoundError) as e:
        _fail(str(e))
    if as_json:
        typer.echo(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    else:
        typer.echo(result["markdown"])
        typer.echo(f"\nwrote {out}/benchmark.md and {out}/benchmark.json")


@app.command(
    epilog="Example:\n\n  loralens demo            (about 2.5 minutes on 2 idle CPU cores)\n\n"
    "  loralens demo --out /tmp/demo --num 96 --seeds 3"
)
def demo(
    out: str = typer.Option("loralens-demo", help="Where the zoo, store, runs and plots go."),
    num: int = typer.Option(192, help="LoRAs in the demo zoo (the build is most of the time)."),
    seeds: int = typer.Option(3, help="Seeds (splits and inits) per model."),
    epochs: int = typer.Option(40, help="Maximum epochs per model."),
    threads: int = typer.Option(None, help="Torch threads for the zoo build."),
    size: str = typer.Option(
        "tiny", help="Base model size: tiny (fits the 10-minute budget) or small (the zoos')."
    ),
) -> None:
    """The end-to-end demo: zoo -> store -> every model -> table and plots.

    Builds a small skills-lm zoo of real PEFT finetunes, packs it, trains every model on
    eval_loss and one data-membership label, prints the table and writes plots.
    """
    from loralens.learn.demo import run_demo

    result = run_demo(
        out, num=num, seeds=seeds, epochs=epochs, threads=threads, size=size, log=typer.echo
    )
    typer.echo("")
    typer.echo(result["markdown"])
    runs = f"{result['benchmark']}/runs"
    typer.echo(f"\nplots: {len(result['plots'])} PNGs under {runs}")
    typer.echo(f"table: {result['benchmark']}/benchmark.md (+ .json)")
    typer.echo(f"total {result['seconds']:.0f}s")


# ---------------------------------------------------------------------------- inspect


@app.command(
    name="inspect",
    epilog="Examples:\n\n"
    "  loralens inspect path/to/peft_adapter_folder\n\n"
    "  loralens inspect my_lora.safetensors --json > layers.json",
)
def inspect_cmd(
    path: str = typer.Argument(..., help="A PEFT adapter folder or a .safetensors/.bin file."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    top: int = typer.Option(4, "--top", "-k", help="How many top singular values to show."),
    allow_nonfinite: bool = typer.Option(
        False, help="Read files with NaN/inf weights (those layers show no singular values)."
    ),
) -> None:
    """Show a LoRA's layers: shape, rank, scale, |delta W|_F, top singular values, effective rank.

    Norms and singular values come from the small factors (QR of U and V, SVD of an r x r
    matrix); no delta W is formed, so this is fast on any model size. Effective rank is Roy &
    Vetterli's exp(entropy of the normalized singular values).
    """
    import json
    import math

    from loralens.features import describe_layers
    from loralens.formats import LoRAFormatError, load_lora

    try:
        lora = load_lora(path, allow_nonfinite=allow_nonfinite)
    except (LoRAFormatError, FileNotFoundError, ValueError) as e:
        _inspect_fail(str(e))
    rows = describe_layers(lora, k=top)
    md = lora.metadata
    summary = {
        "path": str(path),
        "format": md.get("format"),
        "base_model": md.get("base_model"),
        "num_layers": len(rows),
        "ranks": sorted({r["rank"] for r in rows}),
        "adapter_params": sum(la.U.numel() + la.V.numel() for la in lora.layers),
    }
    if as_json:

        def clean(x):
            if isinstance(x, float) and not math.isfinite(x):
                return None
            if isinstance(x, list):
                return [clean(v) for v in x]
            if isinstance(x, dict):
                return {k: clean(v) for k, v in x.items()}
            return x

        typer.echo(json.dumps(clean({**summary, "layers": rows}), indent=2))
        return

    from rich.console import Console
    from rich.table import Table

    def num(x, fmt=".3g"):
        return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)

    title = (
        f"{summary['path']}: {summary['format'] or '?'} LoRA, {len(rows)} layers, "
        f"rank {'/'.join(map(str, summary['ranks']))}, {summary['adapter_params']:,} parameters"
        + (f", base {summary['base_model']}" if summary["base_model"] else "")
    )
    table = Table(title=title, title_justify="left")
    table.add_column("layer", overflow="fold", ratio=3)
    table.add_column("out x in", justify="right", no_wrap=True)
    table.add_column("rank", justify="right")
    table.add_column("scale", justify="right")
    table.add_column("|dW|_F", justify="right", no_wrap=True)
    table.add_column(f"top {top} singular values", ratio=2)
    table.add_column("eff. rank", justify="right")
    for r in rows:
        sv = " ".join(num(x, ".2g") for x in r["top_svals"])
        if not r["finite"]:
            sv = "[red]NaN/inf[/red]"
        table.add_row(
            r["name"],
            f"{r['shape'][0]}x{r['shape'][1]}",
            str(r["rank"]),
            num(r["scale"]),
            num(r["fro_norm"]),
            sv,
            num(r["effective_rank"], ".2f"),
        )
    console = Console()
    if not console.is_terminal:  # piped: do not squeeze the table into 80 columns
        console = Console(width=160)
    console.print(table)


def _inspect_fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)
