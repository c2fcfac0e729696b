"""``loralens screen DIR --ray``: :func:`~loralens.serve.batch.screen_folder` with one Ray task
per adapter, so that a cluster screens a hub's worth of adapters.

Each task asks for one CPU and screens its adapter the way the local screen does, in a worker
process of its Ray worker (time limit, memory cap, a crash costs that process only), which keeps
the runs loaded for the worker's later tasks. Records are appended to the report as tasks finish,
so the report, its format and resuming are the local screen's. Ray retries a task whose worker
or node died (a task that raised is not retried: what the file does to a reader is already an
error line, so an exception here is a fault of the node that would repeat). A task that fails
becomes its adapter's line with status :data:`~loralens.serve.batch.LOST` and a one-line
reason, the other tasks go on, and a rerun screens it again. The folder and the runs must be at
the same paths on every node.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from loralens.raycluster import as_finished, import_ray, ray_session
from loralens.screening import load_screening_runs
from loralens.serve.batch import (
    LOST,
    BatchSummary,
    PoolScreener,
    append_records,
    plan_screening,
    screening_pool,
)
from loralens.serve.unpack import Limits
from loralens.serve.workers import WorkerPool

#: the screening process of each Ray worker, per (runs, memory cap), kept for its later tasks
_POOLS: dict[tuple[tuple[str, ...], int | None], WorkerPool] = {}


def screen_folder_ray(
    folder: str | os.PathLike,
    run_dirs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    address: str | None = None,
    time_limit_s: float = 60.0,
    limits: Limits | None = None,
    worker_memory_mb: int | None = 4096,
    max_retries: int = 3,
    on_start: Callable[[BatchSummary], None] | None = None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> BatchSummary:
    """:func:`~loralens.serve.batch.screen_folder` as Ray tasks (``address``: see
    :func:`~loralens.raycluster.ray_session`); ``summary.lost`` counts the adapters whose task
    failed (its worker died ``1 + max_retries`` times, or it raised). Raises ValueError when
    Ray is not installed or a run cannot be loaded (checked here, before Ray starts),
    NotADirectoryError for ``folder``."""
    import_ray()
    out = Path(out)
    todo, refused, summary = plan_screening(folder, out)
    runs = tuple(str(Path(d).resolve()) for d in run_dirs)
    load_screening_runs(runs)
    if on_start:
        on_start(summary)
    if not todo:
        append_records(out, refused, summary, on_result)
        return summary
    settings = (runs, worker_memory_mb, limits or Limits(), time_limit_s)
    with ray_session(address, quiet=True) as ray:
        task = ray.remote(_screen_task).options(num_cpus=1, max_retries=max_retries)
        refs = {task.remote(*settings, str(p.resolve()), rel): rel for p, rel in todo}
        records = (
            record if reason is None else lost_record(rel, reason)
            for rel, record, reason in as_finished(ray, refs)
        )
        append_records(out, itertools.chain(refused, records), summary, on_result)
    return summary


def lost_record(rel: str, reason: str) -> dict[str, Any]:
    """The report line of an adapter whose Ray task failed (``reason``: one line)."""
    return {
        "path": rel,
        "error": f"{rel}: not screened, its Ray task failed: {reason}",
        "status": LOST,
    }


def _screen_task(
    runs: tuple[str, ...],
    memory_mb: int | None,
    limits: Limits,
    time_limit_s: float,
    path: str,
    rel: str,
) -> dict[str, Any]:
    """Ray task: screen one adapter in this worker's screening process (started on first use)."""
    key = (runs, memory_mb)
    if key not in _POOLS:
        pool = screening_pool(runs, 1, memory_mb)
        try:
            pool.wait_ready()
        except BaseException:
            pool.close()
            raise
        _POOLS[key] = pool
    with tempfile.TemporaryDirectory(prefix="loralens-screen-") as tmp:
        return PoolScreener(_POOLS[key], Path(tmp), limits, time_limit_s)(Path(path), rel)


__all__ = ["lost_record", "screen_folder_ray"]
