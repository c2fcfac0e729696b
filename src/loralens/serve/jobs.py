"""What a worker process does: load the runs once, then screen one received file per job and
answer with plain data for the pipe: ``("ok", report)`` or ``("refused", status, message)``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loralens.screening import ScreeningRun, load_screening_runs, screen_adapter
from loralens.serve.errors import Refused
from loralens.serve.unpack import Limits, prepare_adapter

#: imported once before workers fork: this module (torch, loralens) and PEFT, which the PEFT
#: reader imports on first use (2-3 s saved per worker)
PRELOAD = ("loralens.serve.jobs", "peft.utils.other")


def load_runs(run_dirs: Sequence[str], threads: int = 1) -> list[ScreeningRun]:
    """A worker's state: the runs it predicts with (one torch thread: workers run side by side)."""
    import torch

    torch.set_num_threads(threads)
    return load_screening_runs(run_dirs)


def handle(runs: Sequence[ScreeningRun], payload: tuple[Any, ...]) -> tuple[Any, ...]:
    """One job: ``("runs",)`` -> the runs' summaries; ``("screen", upload, name, workdir,
    limits)`` -> :func:`screen_file`."""
    if payload[0] == "runs":
        return ("ok", [r.summary() for r in runs])
    return screen_file(runs, *payload[1:])


def screen_file(
    runs: Sequence[ScreeningRun], upload: str, name: str, workdir: str, limits: Limits
) -> tuple[Any, ...]:
    """Screen the file ``upload`` (called ``name`` by its sender), unpacking it under
    ``workdir`` within ``limits``. Every failure caused by the file is a refusal with a 4xx
    status whose message names the file and never the server's temp folder; a worker that
    dies (a crash in a native reader) is the pool's to report."""
    from loralens.formats import LoRAFormatError

    try:
        target, shown = prepare_adapter(Path(upload), name, Path(workdir) / "in", limits)
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
