"""Ray for the commands that spread work over a cluster (``zoo build --ray``, ``screen --ray``):
start a local Ray or join a cluster, refuse a task request no node can hold, and collect tasks
as they finish, each failure told in one line instead of a Ray traceback.

Ray is an optional extra (``pip install 'loralens[ray]'``); it is imported only here, on use.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterator, Mapping
from typing import Any

from loralens.errors import LoRALensError, SettingsError

INSTALL_HINT = "--ray needs Ray, an optional extra: pip install 'loralens[ray]'"


class TasksFailed(LoRALensError, RuntimeError):
    """Ray tasks failed after their retries; the message has one line per failed task."""


def import_ray() -> Any:
    """The ``ray`` module, or a ``LoRALensError`` that says how to install it."""
    try:
        import ray
    except ImportError as err:
        raise LoRALensError(INSTALL_HINT) from err
    return ray


@contextlib.contextmanager
def ray_session(address: str | None, *, quiet: bool = False) -> Iterator[Any]:
    """Yield the ``ray`` module connected to a cluster; stop Ray after if this call started it.

    A Ray this process is already connected to is used as it is. Otherwise ``None`` or
    ``"local"`` starts a Ray of this machine only (loopback, no dashboard), ``"auto"`` joins
    ``RAY_ADDRESS`` (or the Ray started on this machine) and anything else is a cluster address.
    """
    ray = import_ray()
    started = not ray.is_initialized()
    if started:
        kwargs: dict[str, Any] = {"log_to_driver": not quiet, "logging_level": "error"}
        if address in (None, "local"):
            address = None
            kwargs.update(include_dashboard=False, _node_ip_address="127.0.0.1")
        ray.init(address=address, **kwargs)
    try:
        yield ray
    finally:
        if started:
            ray.shutdown()


def check_resources(ray: Any, num_cpus: float, num_gpus: float, flag: str) -> None:
    """Raise ``LoRALensError`` unless some node of the cluster can hold a task asking for
    ``num_cpus`` CPUs and ``num_gpus`` GPUs (Ray would wait forever for it); ``flag`` names the
    option that asked."""
    if num_gpus < 0 or (num_gpus > 1 and num_gpus != int(num_gpus)):
        raise SettingsError(
            f"{flag} takes a fraction of one GPU or a whole number, got {num_gpus:g}"
        )
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if any(r.get("CPU", 0) >= num_cpus and r.get("GPU", 0) >= num_gpus for r in nodes):
        return
    gpus = max((r.get("GPU", 0) for r in nodes), default=0)
    cpus = max((r.get("CPU", 0) for r in nodes), default=0)
    if num_gpus and not gpus:
        raise LoRALensError(
            f"{flag}: each task asks for {num_gpus:g} GPU but the cluster has no GPU"
        )
    raise LoRALensError(
        f"{flag}: each task asks for {num_cpus:g} CPU and {num_gpus:g} GPU, more than any node "
        f"of the cluster has (at most {cpus:g} CPU, {gpus:g} GPU per node)"
    )


def failure_reason(err: BaseException) -> str:
    """One line saying why a task failed: the exception it raised, or what Ray says happened
    (its worker died, its node was lost, ...)."""
    ray = import_ray()
    cause = err.cause if isinstance(err, ray.exceptions.RayTaskError) else err
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0] if text else 'no message'}"


def unwrap(ray: Any, ref: Any, what: str) -> Any:
    """``ray.get(ref)``; a task that raised raises its own exception (not Ray's wrapper with the
    worker's traceback), one that Ray lost raises :class:`TasksFailed` saying ``what`` failed."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        raise err.cause from None
    except ray.exceptions.RayError as err:
        raise TasksFailed(f"ray: {what} failed: {failure_reason(err)}") from None


def as_finished(
    ray: Any,
    tasks: Mapping[Any, Hashable],
    *,
    tick: Callable[[], None] = lambda: None,
    every_s: float = 1.0,
) -> Iterator[tuple[Hashable, Any, str | None]]:
    """Yield ``(key, result, None)`` or ``(key, None, reason)`` for each task of ``tasks``
    (object ref -> key) as it finishes, the reason being :func:`failure_reason`'s line;
    ``tick()`` runs at least every ``every_s`` seconds while tasks are left."""
    pending = list(tasks)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=every_s)
        if ready and pending:  # everything else finished by now too
            more, pending = ray.wait(pending, num_returns=len(pending), timeout=0)
            ready += more
        for ref in ready:
            try:
                yield tasks[ref], ray.get(ref), None
            except ray.exceptions.RayError as err:
                yield tasks[ref], None, failure_reason(err)
        tick()


__all__ = [
    "INSTALL_HINT",
    "TasksFailed",
    "as_finished",
    "check_resources",
    "failure_reason",
    "import_ray",
    "ray_session",
    "unwrap",
]
