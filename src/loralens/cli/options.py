"""The options several commands share, declared once: the same flag, type, bounds and help
wherever they appear (``as_json: AsJson = False``)."""

from __future__ import annotations

import math
import os
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


def cores() -> int:
    """CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def positive_finite(value: float | None) -> float | None:
    """An option's value if it is a finite number above 0 (nan and inf pass click's ranges)."""
    if value is not None and not (math.isfinite(value) and value > 0):
        raise typer.BadParameter(f"must be a finite number above 0, got {value}")
    return value


def share(value: float | None) -> float | None:
    """An option's value if it is in (0, 1]."""
    if value is not None and not 0 < value <= 1:
        raise typer.BadParameter(f"must be above 0 and at most 1, got {value}")
    return value


def time_limit_option(what: str) -> typer.models.OptionInfo:
    """``--time-limit`` in seconds (60 by default), finite and above 0."""
    return typer.Option(60.0, "--time-limit", callback=positive_finite, help=what)


def workers_option(default: int | None, what: str) -> typer.models.OptionInfo:
    """A count of worker processes, from 1 to this machine's cores."""
    return typer.Option(default, min=1, max=cores(), help=f"{what} (at most {cores()} here).")


WorkerMemory = Annotated[
    int,
    typer.Option(min=0, help="Address-space limit of each worker, MB (0: none)."),
]


__all__ = [
    "AsJson",
    "OptionalStore",
    "Overwrite",
    "Store",
    "Threads",
    "WorkerMemory",
    "cores",
    "out_option",
    "positive_finite",
    "share",
    "time_limit_option",
    "workers_option",
]
