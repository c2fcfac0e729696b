"""The worker pool: a job over its time limit, a worker that dies or raises, one that asks for
more memory than its limit: each costs that worker only; the pool answers the next call.
(The forkserver is one per process: these pools preload what the service's pools do, so the
order the test files run in does not matter.)"""

from __future__ import annotations

import time

import pool_jobs
import pytest

from loralens.serve.jobs import PRELOAD
from loralens.serve.workers import TimeLimit, WorkerFailed, WorkerPool


@pytest.fixture(scope="module")
def pool():
    p = WorkerPool(
        1, pool_jobs.init, ("t",), pool_jobs.job, memory_mb=1024, preload=[*PRELOAD, "pool_jobs"]
    )
    p.wait_ready()
    yield p
    p.close()


def _alive(pool) -> bool:
    return pool.call(("echo", 1), 30)[:2] == ("t", 1)


def test_a_job_runs_in_another_process(pool):
    import os

    tag, arg, pid = pool.call(("echo", "x"), 30)
    assert (tag, arg) == ("t", "x") and pid != os.getpid() and pid in pool.pids


def test_a_job_over_its_time_limit_is_killed_and_the_worker_replaced(pool):
    old = pool.pids
    t0 = time.monotonic()
    with pytest.raises(TimeLimit, match=r"longer than the limit of 0\.5 s"):
        pool.call(("sleep", 60), 0.5)
    assert time.monotonic() - t0 < 10
    assert pool.pids != old
    assert _alive(pool)


def test_a_worker_that_dies_or_raises_is_replaced(pool):
    with pytest.raises(WorkerFailed, match="died"):
        pool.call(("die", None), 30)
    assert _alive(pool)
    with pytest.raises(WorkerFailed, match="RuntimeError: boom"):
        pool.call(("raise", "boom"), 30)
    assert _alive(pool)


def test_memory_beyond_the_limit_fails_the_job_not_the_pool(pool):
    with pytest.raises(WorkerFailed, match="MemoryError"):
        pool.call(("allocate", 2 * 2**30), 30)
    assert _alive(pool)


def test_a_worker_that_cannot_start_is_reported():
    p = WorkerPool(1, pool_jobs.broken_init, ("runs/x",), pool_jobs.job)
    try:
        with pytest.raises(RuntimeError, match="FileNotFoundError: runs/x is not a run"):
            p.wait_ready()
    finally:
        p.close()
