"""Zoo builds on a Ray cluster: the same zoo as :func:`~loralens.zoo.builder.build_zoo`, built
by Ray tasks that share the zoo folder (a shared filesystem on a real cluster).

One task opens the zoo (pretrains or loads the cached base, writes ``base/`` and ``zoo.json``);
then each group of LoRAs that the preset finetunes together is one task asking for ``threads``
CPUs (and ``gpus`` GPUs). Tasks commit adapters with the builder's atomic commit; Ray retries a
task whose worker or node died (``max_retries``), and the retry skips the LoRAs already
committed. A task that raised is not retried (the same recipe raises again, and Ray would print
each attempt's traceback). The driver shows one progress bar (counted from the zoo folder) and,
at the end, rewrites labels.csv from the finished adapters, so a rerun after a lost driver
resumes. A task that fails does not stop the others: the build ends with one line per failed
group (:class:`~loralens.raycluster.TasksFailed`), keeping every LoRA committed.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from loralens.cache import default_cache_dir
from loralens.errors import SettingsError
from loralens.raycluster import (
    TasksFailed,
    as_finished,
    check_resources,
    ray_session,
    unwrap,
)
from loralens.zoo.builder import OpenZoo, finish_zoo, open_zoo, silent, torch_threads, train_group
from loralens.zoo.folder import ADAPTERS, adapter_id, drop_temp_dirs, rewrite_labels
from loralens.zoo.preset import Preset, get_preset
from loralens.zoo.progress import ProgressBar, log_stderr, silence_libraries

#: every worker writes PEFT's adapter_config.json (which holds sets) in the same order
WORKER_ENV = {"env_vars": {"PYTHONHASHSEED": "0"}}
#: prepared presets of this worker process, reused by its later tasks (no reload of the base)
_PREPARED: dict[tuple[str, ...], Preset] = {}


def build_zoo_ray(
    preset: str | Preset,
    num: int,
    out: Path | str,
    *,
    address: str | None = None,
    seed: int = 0,
    ranks: Sequence[int] = (4,),
    shard: str | tuple[int, int] | None = None,
    first: int = 0,
    cache_dir: Path | str | None = None,
    options: Mapping[str, Any] | None = None,
    threads: int = 1,
    gpus: float = 0.0,
    max_retries: int = 3,
    progress: bool = True,
    quiet: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """:func:`~loralens.zoo.builder.build_zoo` on Ray; returns its manifest (with ``summary``).

    ``address``: see :func:`~loralens.raycluster.ray_session` (``None``: the Ray this process
    is connected to, or a local one). ``out`` and ``cache_dir`` must be paths every node sees
    (a shared filesystem). Each task asks for ``threads`` CPUs and ``gpus`` GPUs (a fraction
    shares one GPU between tasks); GPUs only for a preset that trains on CUDA, and only from a
    cluster that has them (else ``ValueError`` before anything runs). Raises
    :class:`~loralens.raycluster.TasksFailed` when tasks failed (a task whose worker died is
    retried ``max_retries`` times).
    """
    driver_preset = get_preset(preset) if isinstance(preset, str) else preset
    if gpus and not driver_preset.uses_cuda:
        raise SettingsError(
            f"--ray-gpus: preset {driver_preset.name} trains on the CPU only; a GPU asked for "
            "its tasks would sit idle"
        )
    resources = {"num_cpus": max(1, int(threads)), "num_gpus": float(gpus)}
    log = silent if quiet else (log or log_stderr)
    with ray_session(address, quiet=quiet) as ray:
        check_resources(ray, **resources, flag="--ray-gpus" if gpus else "--threads")
        with silence_libraries() if quiet else contextlib.nullcontext():
            return _build(
                ray,
                preset,
                driver_preset,
                num,
                Path(out).resolve(),
                recipe={
                    "seed": seed,
                    "ranks": ranks,
                    "shard": shard,
                    "first": first,
                    "cache_dir": Path(cache_dir or default_cache_dir()).resolve(),
                    "options": options,
                },
                resources=resources,
                max_retries=max_retries,
                progress=progress and not quiet,
                log=log,
            )


def _build(
    ray: Any,
    preset: str | Preset,
    driver_preset: Preset,
    num: int,
    out: Path,
    *,
    recipe: dict[str, Any],
    resources: dict[str, Any],
    max_retries: int,
    progress: bool,
    log: Callable[[str], None],
) -> dict[str, Any]:
    t0 = time.time()
    opened = ray.remote(_open_task).options(
        **resources, max_retries=max_retries, runtime_env=WORKER_ENV
    )
    manifest, todo, group = unwrap(
        ray, opened.remote(preset, num, out, recipe, log is silent), "opening the zoo"
    )
    zoo = OpenZoo(driver_preset, manifest, todo, group, t0)
    log(f"ray: {len(todo)} LoRAs in {len(zoo.groups())} tasks of up to {group}")

    task = ray.remote(_group_task).options(
        **resources, max_retries=max_retries, runtime_env=WORKER_ENV
    )
    threads = resources["num_cpus"]
    cache_dir = recipe["cache_dir"]
    refs = {
        task.remote(preset, out, c, manifest, cache_dir, threads): tuple(c) for c in zoo.groups()
    }
    bar = ProgressBar(len(todo), enabled=progress, eta_after=group)
    wanted = {adapter_id(i) for i in todo}

    def count() -> None:
        bar.update(len(wanted & set(os.listdir(out / ADAPTERS))) - bar.done)

    failed = [
        f"LoRAs {', '.join(adapter_id(i) for i in chunk)}: {reason}"
        for chunk, _, reason in as_finished(ray, refs, tick=count)
        if reason
    ]

    drop_temp_dirs(out)  # left by workers that died; their tasks were retried
    done = rewrite_labels(out, manifest["label_columns"])
    if failed:
        raise TasksFailed(
            f"ray: {len(failed)} of {len(refs)} tasks failed; "
            f"{out} keeps its {len(done)} finished LoRAs and the same command resumes it\n"
            + "\n".join(failed)
        )
    missing = sorted(wanted - set(done))
    if missing:
        raise RuntimeError(f"ray build of {out} ended without adapters {missing[:5]} ...")
    return finish_zoo(out, zoo, progress=progress, log=log)


def _open_task(
    preset: str | Preset, num: int, out: Path, recipe: dict[str, Any], quiet: bool
) -> tuple[dict[str, Any], list[int], int]:
    """Ray task: :func:`~loralens.zoo.builder.open_zoo` (the base is pretrained once, here)."""
    with silence_libraries() if quiet else contextlib.nullcontext():
        zoo = open_zoo(preset, num, out, log=silent if quiet else log_stderr, **recipe)
    zoo.preset.log = silent
    _PREPARED[_key(preset, zoo.manifest, recipe["cache_dir"])] = zoo.preset
    return zoo.manifest, zoo.todo, zoo.group


def _group_task(
    preset: str | Preset,
    out: Path,
    chunk: list[int],
    manifest: dict[str, Any],
    cache_dir: Path,
    threads: int,
) -> int:
    """Ray task: finetune and commit one group; a retry builds only what is not committed."""
    with torch_threads(threads), silence_libraries():
        chunk = [i for i in chunk if not (out / ADAPTERS / adapter_id(i)).is_dir()]
        if chunk:
            train_group(_prepared(preset, manifest, cache_dir), out, chunk, manifest)
    return len(chunk)


def _key(preset: str | Preset, manifest: Mapping[str, Any], cache_dir: Path) -> tuple[str, ...]:
    kind = (
        preset
        if isinstance(preset, str)
        else f"{type(preset).__module__}.{type(preset).__qualname__}"
    )
    recipe = {k: manifest[k] for k in ("preset", "seed", "options", "base_hash")}
    return (kind, json.dumps(recipe, sort_keys=True), str(cache_dir))


def _prepared(preset: str | Preset, manifest: Mapping[str, Any], cache_dir: Path) -> Preset:
    """The preset prepared for this zoo (loading its cached base), once per worker process."""
    key = _key(preset, manifest, cache_dir)
    if key not in _PREPARED:
        obj = get_preset(preset) if isinstance(preset, str) else preset
        obj.log = silent
        obj.prepare(cache_dir, int(manifest["seed"]), manifest["options"])
        _PREPARED[key] = obj
    return _PREPARED[key]
