"""The options several commands share, declared once: the same flag, type, bounds and help
wherever they appear (``as_json: AsJson = False``)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

AsJson = Annotated[
    bool, typer.Option("--json", help="Print strict JSON (NaN/inf as null) instead of text.")
]
Overwrite = Annotated[
    bool,
    typer.Option(
        "--overwrite", help="Replace the output if it exists (only what this command writes)."
    ),
]
Threads = Annotated[
    Optional[int],  # noqa: UP045 (typer reads the annotation at run time, also on Python 3.10)
    typer.Option("--threads", min=1, help="Torch CPU threads (1 is often fastest on a busy CPU)."),
]
Store = Annotated[str, typer.Option("--data", help="A packed store (see `loralens pack`).")]
OptionalStore = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option("--data", help="A packed store (see `loralens pack`) instead of adapter files."),
]


def out_option(what: str) -> typer.models.OptionInfo:
    """``--out`` (required) with the help saying what the command writes there."""
    return typer.Option(..., "--out", help=what)


__all__ = ["AsJson", "OptionalStore", "Overwrite", "Store", "Threads", "out_option"]
