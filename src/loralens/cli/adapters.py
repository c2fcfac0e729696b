"""`loralens inspect`: what an adapter file holds, read from its factors alone."""

from __future__ import annotations

import typer

from loralens.cli.common import console, echo_json, num, user_errors

commands = typer.Typer()


@commands.command(
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
        False,
        "--allow-nonfinite",
        help="Read files with NaN/inf weights (those layers show no singular values).",
    ),
) -> None:
    """Show a LoRA's layers: shape, rank, scale, |delta W|_F, top singular values, effective rank.

    Norms and singular values come from the small factors (QR of U and V, SVD of an r x r
    matrix); no delta W is formed, so this is fast on any model size. Effective rank is Roy &
    Vetterli's exp(entropy of the normalized singular values).
    """
    from rich.table import Table

    from loralens.inspection import inspect_adapter

    with user_errors():
        report = inspect_adapter(path, top=top, allow_nonfinite=allow_nonfinite)
    if as_json:
        echo_json(report)
        return
    rows = report["layers"]
    title = (
        f"{report['path']}: {report['format'] or '?'} LoRA, {len(rows)} layers, "
        f"rank {'/'.join(map(str, report['ranks']))}, {report['adapter_params']:,} parameters"
        + (f", base {report['base_model']}" if report["base_model"] else "")
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
    console().print(table)
