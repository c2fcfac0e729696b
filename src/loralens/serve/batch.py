"""``loralens screen``: the service's screening over a folder of adapters (a hub mirror), one
JSON line per adapter, in worker processes with the service's time limit and archive rules.

Resumable: adapters already in the report (by path relative to the folder) are skipped, and a
line cut short by a kill is dropped; a file that is not a report is never appended to. One bad
file never stops the batch: it gets a line ``{"path", "error", "status"}`` instead of a report;
a named pipe, device or socket, or a link leading out of the folder, gets it at once, without
a worker ever opening it. A line with status :data:`LOST` (its Ray task failed, see
:mod:`loralens.serve.ray_screen`) is dropped too: a rerun screens it again.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from loralens import formats
from loralens.atomic import file_kind, new_file, open_append, open_regular, output_exists
from loralens.errors import InputError, OutputExistsError
from loralens.serve import jobs
from loralens.serve.unpack import Limits
from loralens.serve.workers import TimeLimit, WorkerFailed, WorkerPool

ARCHIVES = (".zip", ".tar", ".tar.gz", ".tgz")
#: status of the line of an adapter that was not screened because its Ray task failed
LOST = 503
#: Longest line read back from a report (one adapter's record is far shorter).
MAX_LINE = 64 * 2**20


@dataclass
class BatchSummary:
    """What a ``screen`` run found and did."""

    found: int = 0
    skipped: int = 0
    screened: int = 0
    errors: int = 0
    #: adapters lost with their Ray task (lines of status LOST, screened again by a rerun)
    lost: int = 0
    #: adapters a run's fit check flagged, or whose layout a run does not take
    flagged: int = 0
    misfit: int = 0
    paths: list[str] = field(default_factory=list)


def fit_marks(record: dict[str, Any]) -> list[str]:
    """One line per run that flags the screened adapter of ``record`` (with its reasons) or
    does not take its layout; empty when every run predicts it as in distribution."""
    out = []
    for p in record.get("predictions") or []:
        if p.get("error"):
            out.append(f"does not fit {p['run']}: {p['error']}")
        elif p.get("in_distribution") is False:
            out.append(f"flagged by {p['run']}: {'; '.join(p.get('reasons') or [])}")
    return out


def find_adapters(folder: Path) -> list[Path]:
    """Every adapter under ``folder``: PEFT folders, other ``.safetensors`` files, and ``.zip``
    / ``.tar`` archives (:func:`loralens.formats.find_adapters`)."""
    return formats.find_adapters(folder, (".safetensors", *ARCHIVES))


def already_screened(out: Path) -> set[str]:
    """Paths with a line in the report ``out``; a last line cut short by a kill, and the lines
    of adapters lost with their Ray task, are removed (those adapters are screened again). A
    file that is not a report (a folder, a link, a line that is not one of its records) is
    refused (``OutputExistsError``): screen appends to its own reports only."""
    if not output_exists(out):
        return set()
    done, stale = set(), False
    with open_regular(out, follow=False) as f:
        for _, record in _lines(f, out):
            if record is None or record.get("status") == LOST:
                stale = True
            else:
                done.add(record["path"])
        if stale:  # rewritten whole without those lines
            f.seek(0)
            with new_file(out, replace=True) as new:
                lines = _lines(f, out)
                new.writelines(ln for ln, rec in lines if rec and rec.get("status") != LOST)
    return done


def _lines(f: BinaryIO, out: Path) -> Iterator[tuple[bytes, dict[str, Any] | None]]:
    """Each line of the open report ``out`` and its record; None for a last line cut short."""
    for number in itertools.count(1):
        line = f.readline(MAX_LINE + 1)
        if not line:
            return
        if not line.endswith(b"\n") and len(line) <= MAX_LINE:
            yield line, None
            return
        record = _record(line)
        if record is None:
            raise OutputExistsError(
                f"{out}: line {number} is not a line of a screen report; not appending to a "
                "file that is not one (give another --out)"
            )
        yield line, record


def _record(line: bytes) -> dict[str, Any] | None:
    """The record of a report line: a JSON object naming its adapter's ``path``."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("path"), str) else None


def plan_screening(
    folder: str | os.PathLike, out: Path
) -> tuple[list[tuple[Path, str]], list[dict[str, Any]], BatchSummary]:
    """The adapters under ``folder`` not yet in the report ``out``, as (path, path relative to
    the folder); the error lines of those refused without a worker (:func:`refusal`); and the
    summary counting them."""
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"{root}: not a folder")
    adapters = find_adapters(root)
    done = already_screened(out)
    todo = [(p, p.relative_to(root).as_posix()) for p in adapters]
    todo = [(p, rel) for p, rel in todo if rel not in done]
    summary = BatchSummary(found=len(adapters), skipped=len(adapters) - len(todo))
    inside = root.resolve()
    refused = [r for p, rel in todo if (r := refusal(p, rel, inside))]
    gone = {r["path"] for r in refused}
    todo = [(p, rel) for p, rel in todo if rel not in gone]
    return todo, refused, summary


def refusal(path: Path, rel: str, root: Path) -> dict[str, Any] | None:
    """The error line of an adapter refused without being opened (None when it may be read):
    a named pipe, device or socket (a reader would block on it), or a link leading out of the
    folder ``root`` (resolved); for a PEFT folder, the same of anything in it."""
    problem, shown = _unreadable(path, root), rel
    if not problem and path.is_dir():
        problem, shown = _unreadable_member(path, rel, root)
    if not problem:
        return None
    return {"path": rel, "error": f"{shown}: {problem}; not screened", "status": 422}


def _unreadable_member(folder: Path, rel: str, root: Path) -> tuple[str, str]:
    """Why a member of the adapter folder ``folder`` must not be opened, and its name."""
    try:
        members = sorted(folder.iterdir())
    except OSError as e:
        return f"cannot be read ({e.strerror or e})", rel
    for p in members:
        if problem := _unreadable(p, root):
            return problem, f"{rel}/{p.name}"
    return "", rel


def _unreadable(path: Path, root: Path) -> str:
    """Why ``path`` must not be opened (empty when it may be)."""
    try:
        if not path.resolve().is_relative_to(root):
            return "a link to something outside the screened folder"
        mode = path.stat().st_mode
    except (OSError, RuntimeError) as e:  # RuntimeError: a link loop, on older Pythons
        return f"cannot be read ({getattr(e, 'strerror', None) or e})"
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return ""
    return f"{file_kind(mode)}, not a regular file"


def append_records(
    out: Path,
    records: Iterable[dict[str, Any]],
    summary: BatchSummary,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> None:
    """Append each record to ``out`` as one JSON line as soon as it arrives, and count it (the
    report is opened at the first record, never through a link; see :func:`open_append`)."""
    f: BinaryIO | None = None
    try:
        for record in records:
            f = f or open_append(out)
            f.write(json.dumps(record, allow_nan=False).encode() + b"\n")
            f.flush()
            summary.screened += 1
            summary.errors += "error" in record
            summary.lost += record.get("status") == LOST
            marks = fit_marks(record)
            summary.flagged += any(m.startswith("flagged") for m in marks)
            summary.misfit += any(m.startswith("does not fit") for m in marks)
            summary.paths.append(record["path"])
            if on_result:
                on_result(record)
    finally:
        if f is not None:
            f.close()


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
    todo, refused, summary = plan_screening(folder, out)
    if on_start:
        on_start(summary)
    if not todo:
        append_records(out, refused, summary, on_result)
        return summary
    workers = min(workers, len(todo))
    pool = screening_pool(run_dirs, workers, worker_memory_mb)
    tmp = Path(tempfile.mkdtemp(prefix="loralens-screen-"))
    executor = ThreadPoolExecutor(workers)
    try:
        pool.wait_ready()
        one = PoolScreener(pool, tmp, limits or Limits(), time_limit_s)
        futures = [executor.submit(one, path, rel) for path, rel in todo]
        screened = (f.result() for f in as_completed(futures))
        append_records(out, itertools.chain(refused, screened), summary, on_result)
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
    "refusal",
    "screen_folder",
    "screening_pool",
]
