"""`loralens inspect`: what adapter files hold, read from their factors alone."""

from __future__ import annotations

from typing import Any

import typer

from loralens.cli.common import console, echo_json, fail, num, user_errors
from loralens.cli.options import AsJson

commands = typer.Typer()


@commands.command(
    name="inspect",
    epilog="Examples:\n\n"
    "  loralens inspect path/to/peft_adapter_folder\n\n"
    "  loralens inspect my_lora.safetensors --json > layers.json\n\n"
    "  loralens inspect loras/ other.safetensors owner/some-lora   # one row each + a summary",
)
def inspect_cmd(
    paths: list[str] = typer.Argument(
        ...,
        help="PEFT adapter folders, .safetensors/.bin files, folders of adapters, or Hugging "
        "Face hub ids (owner/name[@revision]; fetched when online).",
    ),
    as_json: AsJson = False,
    top: int = typer.Option(4, "--top", "-k", min=1, help="How many top singular values to show."),
    layers: bool = typer.Option(
        False, "--layers", help="Also show each adapter's layer table when there are several."
    ),
    allow_nonfinite: bool = typer.Option(
        False,
        "--allow-nonfinite",
        help="Read files with NaN/inf weights (those layers show no singular values).",
    ),
) -> None:
    """Show LoRAs: format, the base model they fit, training metadata, flags, and per layer
    shape, rank, scale, |delta W|_F, top singular values, effective rank.

    Norms and singular values come from the small factors (QR of U and V, SVD of an r x r
    matrix); no delta W is formed, so this is fast on any model size. Effective rank is Roy &
    Vetterli's exp(entropy of the normalized singular values). The base model is the file's
    own word (a local folder by its last part) and every well-known family whose module names
    and shapes the layers fit, or where none fits the architecture the module names say
    ("unknown GPT-2-like model (2 blocks)"), or "unknown"; the service's page shows the same
    line. One adapter: its report (--json: the report object, the line as
    base_model_guess.label); several:
    one row each and a summary row (--json: {"adapters": [...], "summary": {...}}); exit code 1
    when any cannot be read.
    """
    from loralens.inspection import inspect_adapters

    with user_errors():
        result = inspect_adapters(paths, top=top, allow_nonfinite=allow_nonfinite)
    reports = result["adapters"]
    if len(paths) == 1 and len(reports) == 1:
        report = reports[0]
        if "error" in report:
            fail(report["error"])
        if as_json:
            echo_json(report)
            return
        _print_adapter(report, top)
        return
    if as_json:
        echo_json(result)
    else:
        _print_overview(result)
        for report in reports if layers else ():
            if "error" not in report:
                _print_adapter(report, top)
    if result["summary"]["failed"]:
        raise typer.Exit(1)


def _base(report: dict[str, Any]) -> str:
    """The base-model line every report shows (the page and the summary too)."""
    return report["base_model_guess"]["label"]


def _print_adapter(report: dict[str, Any], top: int) -> None:
    from rich.table import Table

    from loralens.training_metadata import training_summary

    rows = report["layers"]
    title = (
        f"{report['path']}: {report['format'] or '?'} LoRA, {len(rows)} layers, "
        f"rank {'/'.join(map(str, report['ranks']))}, {report['adapter_params']:,} parameters"
        f"\nbase model: {_base(report)}"
    )
    training = training_summary(report["training"])
    if training:
        title += f"\ntraining: {training}"
    for f in report["flags"]:
        colour = "red" if f["severity"] == "error" else "yellow"
        title += f"\n[{colour}]{f['kind']}[/{colour}]: {f['message']}"
    table = Table(title=title, title_justify="left")
    table.add_column("layer", overflow="fold", ratio=3)
    table.add_column("out x in", justify="right", no_wrap=True)
    table.add_column("rank", justify="right")
    table.add_column("scale", justify="right")
    table.add_column("|dW|_F", justify="right", no_wrap=True)
    table.add_column(f"top {top} singular values", ratio=2)
    table.add_column("eff. rank", justify="right")
    table.add_column("flags")
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
            " ".join(r["flags"]),
        )
    console().print(table)


def _print_overview(result: dict[str, Any]) -> None:
    from rich.table import Table

    from loralens.training_metadata import training_summary

    table = Table(title="adapters", title_justify="left", show_footer=True)
    s = result["summary"]
    footer = {
        "adapter": f"{s['adapters']} adapters ({s['failed']} failed)",
        "format": ", ".join(f"{k} {v}" for k, v in s["formats"].items()),
        "base model": ", ".join(f"{k} {v}" for k, v in s["base_models"].items()),
        "layers": str(s["layers"]),
        "rank": "/".join(map(str, s["ranks"])),
        "parameters": f"{s['adapter_params']:,}",
        "flags": f"{s['flagged']} flagged",
        "training": "",
    }
    for name, text in footer.items():
        right = name in ("layers", "parameters")
        table.add_column(name, footer=text, overflow="fold", justify="right" if right else "left")
    for r in result["adapters"]:
        if "error" in r:
            table.add_row(r["path"], "[red]error[/red]", *[""] * 5, r["error"])
            continue
        table.add_row(
            r["path"],
            r["format"] or "?",
            _base(r),
            str(r["num_layers"]),
            "/".join(map(str, r["ranks"])),
            f"{r['adapter_params']:,}",
            ", ".join(f"{f['kind']} {len(f['layers'])}" for f in r["flags"]),
            training_summary(r["training"]),
        )
    console().print(table)
