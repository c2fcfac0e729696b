"""What every command shares: exit codes, error reporting, JSON and table output, progress bars."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import typer

#: Exit codes, the same for every command (listed in `loralens --help`).
EXIT_INPUT = 1  # an adapter, labels file, store, run or zoo that cannot be read or is invalid
EXIT_USAGE = 2  # wrong or missing options and arguments (click's own code)
EXIT_EXISTS = 3  # the output exists or was made with other settings (--overwrite / --append)
EXIT_OUTPUT = 4  # the output cannot be written (a read-only or full folder)

EXIT_CODES_HELP = (
    "Exit codes: 0 success; 1 an input (adapter, labels, store, run, zoo) that cannot be read "
    "or is invalid; 2 wrong or missing options; 3 the output already exists or was made with "
    "other settings, or a link or special file is in its place (see --overwrite / --append); "
    "4 the output cannot be written (a read-only or full folder)."
)


def unwrap_help(app: typer.Typer) -> None:
    """Give every command of ``app`` (and of its groups) its docstring with each paragraph on
    one line, so that rich wraps the help to the terminal's width instead of breaking the
    source's hand-wrapped lines a second time, mid-phrase."""
    import inspect

    for info in app.registered_commands:
        if info.help is None and info.callback is not None and info.callback.__doc__:
            info.help = unwrap(inspect.getdoc(info.callback) or "")
    for group in app.registered_groups:
        if group.typer_instance is not None:
            unwrap_help(group.typer_instance)


def unwrap(text: str) -> str:
    """``text`` with the line breaks inside each paragraph (blank-line separated) made spaces."""
    paragraphs = (" ".join(p.split()) for p in text.strip().split("\n\n"))
    return "\n\n".join(p for p in paragraphs if p)


def fail(message: str, code: int = EXIT_INPUT) -> NoReturn:
    """Print ``error: message`` to stderr and exit with ``code``."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn the errors loralens raises on purpose (``LoRALensError``) and OS errors naming a path
    into one line on stderr and the exit code of their kind, and its warnings
    (``LoRALensWarning``) into ``warning:`` lines. Any other exception is a bug: its traceback
    is kept."""
    from loralens.errors import (
        LoRALensError,
        LoRALensWarning,
        OutputError,
        OutputExistsError,
        SettingsError,
    )

    caught: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", LoRALensWarning)
            yield
    except OutputExistsError as e:
        fail(str(e), EXIT_EXISTS)
    except OutputError as e:
        fail(str(e), EXIT_OUTPUT)
    except SettingsError as e:
        fail(str(e), EXIT_USAGE)
    except LoRALensError as e:
        fail(str(e))
    except OSError as e:  # a path the user named that is missing, unreadable or unwritable
        if not e.filename:
            raise
        fail(_os_message(e))
    finally:  # out of the recording context: showwarning is Python's own again
        for w in caught:
            if issubclass(w.category, LoRALensWarning):
                typer.secho(f"warning: {w.message}", fg=typer.colors.YELLOW, err=True)
            else:
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def _os_message(e: OSError) -> str:
    return f"{e.filename}: {e.strerror or e}"


def echo_json(value: Any) -> None:
    """Print ``value`` as strict JSON (never NaN or Infinity)."""
    from loralens.jsonio import dumps

    typer.echo(dumps(value))


def console():
    """A rich console; when piped, wide enough that tables are not squeezed into 80 columns."""
    from rich.console import Console

    out = Console()
    return out if out.is_terminal else Console(width=160)


def progress():
    """A transient progress bar with count, elapsed time and ETA."""
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


def num(x: Any, fmt: str = ".3g") -> str:
    """A number for a table cell; '-' where there is none."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, fmt)


def interval(lo: float, hi: float, digits: int = 4) -> str:
    """An interval "[lo, hi]", both ends with the same decimals: enough for ``digits``
    significant digits of the larger end and one of the width (so [1.93, 2.00], not [1.93, 2])."""
    top = max(abs(lo), abs(hi))
    if not math.isfinite(top) or top >= 1e5 or 0 < top < 1e-3:
        return f"[{num(lo, f'.{digits - 1}e')}, {num(hi, f'.{digits - 1}e')}]"
    decimals = [digits - 1 - math.floor(math.log10(top))] if top > 0 else [0]
    if hi > lo:
        decimals.append(-math.floor(math.log10(hi - lo)))
    d = min(max(0, *decimals), 12)
    return f"[{lo:.{d}f}, {hi:.{d}f}]"
