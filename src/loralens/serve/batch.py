"""``loralens screen``: the service's screening over a folder of adapters (a hub mirror), one
JSON line per adapter, in worker processes with the service's time limit and archive rules.

Resumable: adapters already in the report (by path relative to the folder) are skipped, and a
line cut short by a kill is dropped. One bad file never stops the batch: it gets a line
``{"path", "error", "status"}`` instead of a report. A line with status :data:`LOST` (its Ray
task failed, see :mod:`loralens.serve.ray_screen`) is dropped too: a rerun screens it again.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loralens import formats
from loralens.atomic import write_file_atomic
from loralens.errors import InputError
from loralens.serve import jobs
from loralens.serve.unpack import Limits
from loralens.serve.workers import TimeLimit, WorkerFailed, WorkerPool

ARCHIVES = (".zip", ".tar", ".tar.gz", ".tgz")
#: status of the line of an adapter that was not screened because its Ray task failed
LOST = 503


@dataclass
class BatchSummary:
    """What a ``screen`` run found and did."""

    found: int = 0
    skipped: int = 0
    screened: int = 0
    errors: int = 0
    #: adapters lost with their Ray task (lines of status LOST, screened again by a rerun)
    lost: int = 0
    paths: list[str] = field(default_factory=list)


def find_adapters(folder: Path) -> list[Path]:
    """Every adapter under ``folder``: PEFT folders, other ``.safetensors`` files, and ``.zip``
    / ``.tar`` archives (:func:`loralens.formats.find_adapters`)."""
    return formats.find_adapters(folder, (".safetensors", *ARCHIVES))


def already_screened(out: Path) -> set[str]:
    """Paths with a line in the report ``out``; a last line cut short by a kill, and the lines
    of adapters lost with their Ray task, are removed (those adapters are screened again)."""
    if not out.is_file():
        return set()
    data = out.read_bytes()
    end = data.rfind(b"\n") + 1
    lines = data[:end].split(b"\n")[:-1]
    kept, done = [], set()
    for line in lines:
        try:
            record = json.loads(line)
            if record.get("status") == LOST:
                continue
            done.add(record["path"])
        except (ValueError, KeyError, TypeError, AttributeError):
            pass  # not a line of ours: kept, and that adapter is screened again
        kept.append(line + b"\n")
    if len(kept) < len(lines):
        write_file_atomic(out, b"".join(kept))
    elif end < len(data):
        with open(out, "r+b") as f:
            f.truncate(end)
    return done


def plan_screening(
    folder: str | os.PathLike, out: Path
) -> tuple[list[tuple[Path, str]], BatchSummary]:
    """The adapters under ``folder`` not yet in the report ``out``, as (path, path relative to
    the folder), and the summary counting them. Raises NotADirectoryError."""
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"{root}: not a folder")
    adapters = find_adapters(root)
    done = already_screened(out)
    todo = [(p, p.relative_to(root).as_posix()) for p in adapters]
    todo = [(p, rel) for p, rel in todo if rel not in done]
    return todo, BatchSummary(found=len(adapters), skipped=len(adapters) - len(todo))


def append_records(
    out: Path,
    records: Iterable[dict[str, Any]],
    summary: BatchSummary,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    """Append each record to ``out`` as one JSON line as soon as it arrives, and count it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, allow_nan=False) + "\n")
            f.flush()
            summary.screened += 1
            summary.errors += "error" in record
            summary.lost += record.get("status") == LOST
            summary.paths.append(record["path"])
            if on_result:
                on_result(record)


def screen_folder(
    folder: str | os.PathLike,
    run_dirs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    workers: int = 1,
    time_limit_s: float = 60.0,
    limits: Limits | None = None,
    worker_memory_mb: int | None = 4096,
    on_start: Callable[[BatchSummary], None] | None = None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> BatchSummary:
    """Screen every adapter under ``folder`` not yet in ``out`` (JSON lines, appended as each
    finishes) with the runs in ``run_dirs``. Raises RuntimeError if a run cannot be loaded,
    NotADirectoryError if ``folder`` is not a folder."""
    out = Path(out)
    todo, summary = plan_screening(folder, out)
    if on_start:
        on_start(summary)
    if not todo:
        return summary
    pool = screening_pool(run_dirs, workers, worker_memory_mb)
    tmp = Path(tempfile.mkdtemp(prefix="loralens-screen-"))
    executor = ThreadPoolExecutor(workers)
    try:
        pool.wait_ready()
        one = PoolScreener(pool, tmp, limits or Limits(), time_limit_s)
        futures = [executor.submit(one, path, rel) for path, rel in todo]
        append_records(out, (f.result() for f in as_completed(futures)), summary, on_result)
    finally:  # on Ctrl-C too: nothing more is written, no worker or temp file stays
        executor.shutdown(wait=False, cancel_futures=True)
        pool.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


def screening_pool(
    run_dirs: Sequence[str | os.PathLike], workers: int, memory_mb: int | None
) -> WorkerPool:
    """``workers`` worker processes holding the runs of ``run_dirs``, each under ``memory_mb``."""
    return WorkerPool(
        workers,
        jobs.load_runs,
        ([str(d) for d in run_dirs],),
        jobs.handle,
        memory_mb=memory_mb,
        preload=jobs.PRELOAD,
    )


class PoolScreener:
    """Screen one adapter in a worker; a refusal, time-out or crash becomes its error line."""

    def __init__(self, pool: WorkerPool, tmp: Path, limits: Limits, time_limit_s: float) -> None:
        self.pool, self.tmp, self.limits, self.time_limit_s = pool, tmp, limits, time_limit_s

    def __call__(self, path: Path, rel: str) -> dict[str, Any]:
        workdir = tempfile.mkdtemp(dir=self.tmp)
        try:
            payload = ("path", str(path), rel, workdir, self.limits)
            result = self.pool.call(payload, self.time_limit_s)
        except TimeLimit as e:
            return {"path": rel, "error": f"{rel}: screening {e}", "status": 422}
        except WorkerFailed as e:
            return {"path": rel, "error": f"{rel}: screening failed: {e}", "status": 500}
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        if result[0] == "refused":
            return {"path": rel, "error": result[2], "status": result[1]}
        return result[1]


__all__ = [
    "LOST",
    "BatchSummary",
    "PoolScreener",
    "already_screened",
    "append_records",
    "find_adapters",
    "plan_screening",
    "screen_folder",
    "screening_pool",
]
