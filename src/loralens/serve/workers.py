"""Worker processes that read untrusted files, so that a slow, crashing or memory-hungry input
costs one worker, never the server: each job has a time limit (the worker is killed and replaced
when it runs over), each worker an address-space limit, and a worker that dies is replaced.

A worker runs ``init(*args)`` once (e.g. loading the runs), then ``job(state, payload)`` per
call and sends back what it returns; payloads and results are plain data.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

#: how long a new worker may take to start (import torch, load the runs)
STARTUP_S = 300.0


class TimeLimit(Exception):
    """The job ran longer than its time limit (its worker was replaced)."""


class WorkerFailed(Exception):
    """The worker died or raised while running the job (it was replaced)."""


def _worker_main(
    conn: Any, init: Callable[..., Any], args: tuple, job: Callable, memory_mb: int | None
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    if memory_mb:
        import resource

        limit = memory_mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        state = init(*args)
    except BaseException as e:
        conn.send(("fatal", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            payload = conn.recv()
        except EOFError:
            return
        try:
            conn.send(("ok", job(state, payload)))
        except BaseException as e:
            conn.send(("failed", f"{type(e).__name__}: {e}"))


class _Worker:
    def __init__(self, ctx: Any, target_args: tuple) -> None:
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child, *target_args), daemon=True)
        self.process.start()
        child.close()
        self.ready = False

    def wait_ready(self) -> None:
        if self.ready:
            return
        if not self.conn.poll(STARTUP_S):
            raise RuntimeError(f"a worker did not start within {STARTUP_S:g} s")
        try:
            kind, detail = self.conn.recv()
        except EOFError:
            raise RuntimeError("a worker died while starting") from None
        if kind != "ready":
            raise RuntimeError(f"a worker could not start: {detail}")
        self.ready = True

    def stop(self) -> None:
        self.conn.close()
        self.process.kill()
        self.process.join(5)


class WorkerPool:
    """``size`` worker processes; :meth:`call` blocks until one is free (callers bound how many
    wait) and returns the job's result within ``timeout`` seconds or raises. ``preload`` names
    modules imported once, before any worker starts."""

    def __init__(
        self,
        size: int,
        init: Callable[..., Any],
        args: tuple,
        job: Callable[[Any, Any], Any],
        *,
        memory_mb: int | None = None,
        preload: Sequence[str] = (),
    ) -> None:
        # workers fork from a clean single-threaded process that has imported ``preload`` once:
        # a replacement starts in milliseconds, with no copy of this process's threads
        self._ctx = mp.get_context("forkserver")
        self._ctx.set_forkserver_preload(list(preload))
        self._target_args = (init, args, job, memory_mb)
        self._idle: queue.Queue[_Worker | None] = queue.Queue()
        self._lock = threading.Lock()
        self._workers: set[_Worker] = set()
        self._closed = False
        for _ in range(size):
            self._idle.put(self._start())

    def _start(self) -> _Worker:
        worker = _Worker(self._ctx, self._target_args)
        with self._lock:
            self._workers.add(worker)
        return worker

    def _replace(self, worker: _Worker) -> None:
        worker.stop()
        with self._lock:
            self._workers.discard(worker)
        if not self._closed:
            self._idle.put(self._start())

    def wait_ready(self) -> None:
        """Block until every worker has started; raise if one cannot (e.g. a run fails to load)."""
        with self._lock:
            workers = list(self._workers)
        for w in workers:
            w.wait_ready()

    def call(self, payload: Any, timeout: float) -> Any:
        worker = self._idle.get()
        if worker is None:
            self._idle.put(None)  # wake the next waiter too
            raise WorkerFailed("the pool is closed")
        try:
            worker.wait_ready()
            worker.conn.send(payload)
            deadline = time.monotonic() + timeout
            if not worker.conn.poll(max(0.0, deadline - time.monotonic())):
                raise TimeLimit(f"took longer than the limit of {timeout:g} s")
            kind, result = worker.conn.recv()
        except (EOFError, OSError, RuntimeError) as e:
            self._replace(worker)
            raise WorkerFailed(f"the worker died ({e or type(e).__name__})") from None
        except BaseException:
            self._replace(worker)
            raise
        if kind != "ok":
            self._replace(worker)
            raise WorkerFailed(str(result))
        self._idle.put(worker)
        return result

    @property
    def pids(self) -> list[int]:
        with self._lock:
            return [w.process.pid for w in self._workers if w.process.pid is not None]

    def close(self) -> None:
        self._closed = True
        with self._lock:
            workers = list(self._workers)
            self._workers.clear()
        for w in workers:
            w.stop()
        self._idle.put(None)  # callers still waiting for a worker give up


__all__ = ["TimeLimit", "WorkerFailed", "WorkerPool"]
