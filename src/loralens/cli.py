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
