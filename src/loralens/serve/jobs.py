"""What a worker process does: load the runs once, then screen one received file per job and
answer with plain data for the pipe: ``("ok", report)`` or ``("refused", status, message)``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from loralens.screening import ScreeningRun, load_screening_runs, screen_adapter
from loralens.serve.errors import Refused
from loralens.serve.unpack import local_adapter, prepare_adapter

#: imported once before workers fork: this module (torch, loralens) and PEFT, which the PEFT
#: reader imports on first use (2-3 s saved per worker)
PRELOAD = ("loralens.serve.jobs", "peft.utils.other")


def load_runs(run_dirs: Sequence[str], threads: int = 1) -> list[ScreeningRun]:
    """A worker's state: the runs it predicts with (one torch thread: workers run side by side)."""
    import torch

    torch.set_num_threads(threads)
    return load_screening_runs(run_dirs)


def handle(runs: Sequence[ScreeningRun], payload: tuple[Any, ...]) -> tuple[Any, ...]:
    """One job: ``("runs",)`` -> the runs' summaries; ``("upload", file, name, workdir, limits)``
    -> screen a received file; ``("path", path, name, workdir, limits)`` -> screen an adapter
    on this machine (see :mod:`loralens.serve.unpack`)."""
    kind, *args = payload
    if kind == "runs":
        return ("ok", [r.summary() for r in runs])
    path, name, workdir, limits = args
    place = prepare_adapter if kind == "upload" else local_adapter
    return screen_file(
        runs, lambda: place(Path(path), name, Path(workdir) / "in", limits), name, workdir
    )


def screen_file(
    runs: Sequence[ScreeningRun],
    place: Callable[[], tuple[Path, str]],
    name: str,
    workdir: str,
) -> tuple[Any, ...]:
    """Screen the adapter that ``place()`` puts in reach (called ``name``; unpacked under
    ``workdir``). Every failure caused by the file is a refusal with a 4xx status whose message
    names the file and never the server's temp folder; a worker that dies (a crash in a native
    reader) is the pool's to report."""
    from loralens.formats import LoRAFormatError

    try:
        target, shown = place()
        return ("ok", screen_adapter(target, runs, name=shown))
    except Refused as e:
        return ("refused", e.status, _hide(e.message, workdir))
    except LoRAFormatError as e:
        return ("refused", 422, _hide(str(e), workdir))
    except MemoryError:
        return ("refused", 413, f"{name}: reading it needs more memory than a worker may use")
    except Exception as e:  # whatever else reading an untrusted file raised
        return (
            "refused",
            422,
            _hide(f"{name}: could not be read ({type(e).__name__}: {e})", workdir),
        )


def _hide(message: str, workdir: str) -> str:
    return message.replace(str(Path(workdir) / "in") + "/", "").replace(workdir, "")
