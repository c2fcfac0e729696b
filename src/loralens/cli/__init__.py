"""The `loralens` command line: one module per command group; each command parses its
arguments, makes one library call and prints. The work lives in the library."""

from __future__ import annotations

import typer

from loralens.cli import adapters, convert, learning, search, serve, stores, zoo
from loralens.cli.common import EXIT_CODES_HELP, unwrap_help

app = typer.Typer(
    epilog=EXIT_CODES_HELP,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
for group in (adapters, convert, stores, learning, search, serve):
    app.registered_commands += group.commands.registered_commands
app.add_typer(stores.store_app, name="store")
app.add_typer(search.index_app, name="index")
app.add_typer(zoo.app, name="zoo")


def _print_version(value: bool) -> None:
    if value:
        from loralens import __version__

        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False,
        "--version",
        callback=_print_version,
        is_eager=True,
        help="Print the loralens version and exit.",
    ),
) -> None:
    """Learning on LoRAs: read LoRA adapters as data and predict properties of the finetuned model."""


@app.command()
def version() -> None:
    """Print the loralens version."""
    _print_version(True)


unwrap_help(app)
