"""`loralens pack` (a folder of adapters plus labels becomes a memory-mapped store) and
`loralens store verify`."""

from __future__ import annotations

import typer

from loralens.cli.common import echo_json, fail, progress, user_errors
from loralens.cli.options import AsJson, Overwrite

commands = typer.Typer()
store_app = typer.Typer(help="Check packed stores.", no_args_is_help=True)


@commands.command(
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
    append: bool = typer.Option(False, "--append", help="Add to an existing store."),
    overwrite: Overwrite = False,
    skip_bad: bool = typer.Option(
        False, "--skip-bad", help="Pack the rest when some adapters are unreadable or do not fit."
    ),
    skip_missing: bool = typer.Option(
        False,
        "--skip-missing",
        help="Pack the adapters both name when the labels name adapters the folder lacks, or "
        "the folder holds adapters the labels do not name.",
    ),
    as_json: AsJson = False,
) -> None:
    """Pack a folder of LoRA adapters plus their labels into a memory-mapped store.

    Adapters that cannot be read or whose layers do not match the others are refused and
    listed; unless --skip-bad, nothing is written when any is refused. Every adapter must be
    named in the labels and every name must be found, unless --skip-missing.
    """
    from loralens.store import PackError
    from loralens.store import pack as pack_store

    with user_errors():
        try:
            with progress() as bar:
                task = bar.add_task("packing", total=None)
                store, refused = pack_store(
                    adapters_dir,
                    out,
                    labels=labels,
                    dtype=dtype,
                    append=append,
                    overwrite=overwrite,
                    skip_bad=skip_bad,
                    skip_missing=skip_missing,
                    progress=lambda i, n, name: bar.update(task, completed=i, total=n),
                )
        except PackError as e:
            for name, why in e.refused:
                typer.echo(f"refused {name}: {why}", err=True)
            fail(str(e))
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
        echo_json(summary)
        return
    for name, why in refused:
        typer.echo(f"skipped {name}: {why}", err=True)
    typer.echo(
        f"packed {len(store)} LoRAs ({len(store.names)} layers, ranks {summary['ranks']}, "
        f"{store.nbytes / 2**20:.1f} MiB) into {store.path}"
    )
    typer.echo(f"label columns: {', '.join(store.label_columns)}")


@store_app.command("verify", epilog="Example:\n\n  loralens store verify zoo.store --json")
def verify(
    store: str = typer.Argument(..., help="A packed store."),
    as_json: AsJson = False,
) -> None:
    """Check every shard and the index against the checksums recorded when they were written.

    Exits 1 when anything does not match (each problem names its file)."""
    from loralens.store import verify_store

    with user_errors():
        report = verify_store(store)
    if as_json:
        echo_json(report.to_dict())
    else:
        typer.echo(str(report))
    if not report.ok:
        raise typer.Exit(1)
