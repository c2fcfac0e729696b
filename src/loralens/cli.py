"""The `loralens` command line: one thin function per command; the work lives in the library."""

from __future__ import annotations

import typer

app = typer.Typer(
    help="Learning on LoRAs: read LoRA adapters as data and predict properties of the finetuned model.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
zoo_app = typer.Typer(help="Build datasets ('zoos') of real LoRA finetunes.", no_args_is_help=True)
app.add_typer(zoo_app, name="zoo")


@app.command()
def version() -> None:
    """Print the loralens version."""
    from loralens import __version__

    typer.echo(__version__)


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
