"""``loralens screen``: the service's screening over a folder of adapters (a hub mirror), one
JSON line per adapter, in worker processes with the service's time limit and archive rules.

Resumable: adapters already in the report (by path relative to the folder) are skipped, and a
line cut short by a kill is dropped. One bad file never stops the batch: it gets a line
``{"path", "error", "status"}`` instead of a report.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loralens import formats
from loralens.serve import jobs
from loralens.serve.unpack import Limits
from loralens.serve.workers import TimeLimit, WorkerFailed, WorkerPool

ARCHIVES = (".zip", ".tar", ".tar.gz", ".tgz")


@dataclass
class BatchSummary:
    """What a ``screen`` run found and did."""

    found: int = 0
    skipped: int = 0
    screened: int = 0
    errors: int = 0
    paths: list[str] = field(default_factory=list)


def find_adapters(folder: Path) -> list[Path]:
    """Every adapter under ``folder``: PEFT folders, other ``.safetensors`` files, and ``.zip``
    / ``.tar`` archives (:func:`loralens.formats.find_adapters`)."""
    return formats.find_adapters(folder, (".safetensors", *ARCHIVES))


def already_screened(out: Path) -> set[str]:
    """Paths with a line in the report ``out``; a last line cut short by a kill is removed."""
    if not out.is_file():
        return set()
    data = out.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(out, "r+b") as f:
            f.truncate(end)
    done = set()
    for line in data[:end].splitlines():
        try:
            done.add(json.loads(line)["path"])
        except (ValueError, KeyError, TypeError):
            continue  # not a line of ours: that adapter is screened again
    return done


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
    root = Path(folder)
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a folder")
    out = Path(out)
    adapters = find_adapters(root)
    done = already_screened(out)
    todo = [(p, p.relative_to(root).as_posix()) for p in adapters]
    todo = [(p, rel) for p, rel in todo if rel not in done]
    summary = BatchSummary(found=len(adapters), skipped=len(adapters) - len(todo))
    if on_start:
        on_start(summary)
    if not todo:
        return summary
    pool = WorkerPool(
        workers,
        jobs.load_runs,
        ([str(d) for d in run_dirs],),
        jobs.handle,
        memory_mb=worker_memory_mb,
        preload=jobs.PRELOAD,
    )
    tmp = Path(tempfile.mkdtemp(prefix="loralens-screen-"))
    executor = ThreadPoolExecutor(workers)
    try:
        pool.wait_ready()
        one = _Screen(pool, tmp, limits or Limits(), time_limit_s)
        futures = [executor.submit(one, path, rel) for path, rel in todo]
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "a", encoding="utf-8") as f:
            for future in as_completed(futures):
                record = future.result()
                f.write(json.dumps(record, allow_nan=False) + "\n")
                f.flush()
                summary.screened += 1
                summary.errors += "error" in record
                summary.paths.append(record["path"])
                if on_result:
                    on_result(record)
    finally:  # on Ctrl-C too: nothing more is written, no worker or temp file stays
        executor.shutdown(wait=False, cancel_futures=True)
        pool.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


class _Screen:
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


__all__ = ["BatchSummary", "already_screened", "find_adapters", "screen_folder"]
