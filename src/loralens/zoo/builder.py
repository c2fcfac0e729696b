"""The generic zoo builder: resumable, sharded, extendable; knows nothing about models.

It owns the zoo folder (:mod:`loralens.zoo.folder`: layout, manifest, crash-safe commits) and
asks a preset (:mod:`loralens.zoo.preset`) for everything about models. LoRA ``i`` depends only
on ``(seed, i)`` (see ``Preset.sample_config``), so rerunning a build after a crash (kill -9
included) completes the zoo, a larger ``--num`` extends it, and shards (``index % k == i``)
agree; :func:`loralens.zoo.merge.merge_zoos` joins shards.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loralens.atomic import atomic_dir
from loralens.cache import default_cache_dir
from loralens.errors import SettingsError
from loralens.zoo.folder import (
    ADAPTERS,
    BASE,
    FORMAT_VERSION,
    MANIFEST,
    adapter_id,
    check_identity,
    commit_adapter,
    drop_temp_dirs,
    finished_adapters,
    hash_base,
    package_versions,
    read_manifest,
    rewrite_labels,
    temp_dir,
    write_manifest,
)
from loralens.zoo.preset import Preset, get_preset
from loralens.zoo.progress import ProgressBar, log_stderr, silence_libraries
from loralens.zoo.summary import format_summary, summarize_labels


def parse_shard(shard: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """``"i/k"`` -> (i, k) with 0 <= i < k."""
    if shard is None or isinstance(shard, tuple):
        return shard
    try:
        i, k = (int(x) for x in str(shard).split("/"))
    except ValueError as err:
        raise SettingsError(f"--shard must look like i/k (e.g. 0/4), got {shard!r}") from err
    if not 0 <= i < k:
        raise SettingsError(f"--shard {shard}: need 0 <= i < k")
    return i, k


def build_zoo(
    preset: str | Preset,
    num: int,
    out: Path | str,
    *,
    seed: int = 0,
    ranks: Sequence[int] = (4,),
    shard: str | tuple[int, int] | None = None,
    first: int = 0,
    cache_dir: Path | str | None = None,
    options: Mapping[str, Any] | None = None,
    threads: int | None = None,
    progress: bool = True,
    quiet: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Build (or resume, or extend) a zoo of the LoRAs ``first .. num-1`` of ``preset`` in ``out``.

    Returns the manifest, with ``summary`` (label spreads, see :func:`summarize_labels`) added.
    ``shard="i/k"`` builds only the LoRAs with ``index % k == i``; merge shard folders with
    :func:`~loralens.zoo.merge.merge_zoos`. ``first > 0`` makes a held-out zoo: its recipes are those no zoo of
    ``num=first`` with the same seed has (e.g. other ranks, unseen recipes). Rerunning the same
    call after a crash (kill -9 included) completes the zoo; a larger ``num`` extends it.
    ``progress=False`` drops the bar and the summary; ``quiet=True`` prints nothing at all (no
    log lines, and no progress bars or logs of transformers/diffusers/huggingface_hub either).
    """
    with contextlib.ExitStack() as stack:
        if threads:
            stack.enter_context(torch_threads(int(threads)))
        if quiet:
            stack.enter_context(silence_libraries())
        return _build(
            preset,
            num,
            Path(out),
            seed=seed,
            ranks=ranks,
            shard=shard,
            first=first,
            cache_dir=Path(cache_dir) if cache_dir else default_cache_dir(),
            options=options,
            progress=progress and not quiet,
            log=silent if quiet else (log or log_stderr),
        )


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch threads (restored after)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def silent(msg: str) -> None:
    """The log of a quiet build."""


@dataclass
class OpenZoo:
    """A zoo folder made ready to build into: its manifest written, its base saved, its labels
    repaired, and the LoRAs still to build (``todo``), handed over ``group`` at a time."""

    preset: Preset
    manifest: dict[str, Any]
    todo: list[int]
    group: int
    t0: float

    def groups(self) -> list[list[int]]:
        """``todo`` cut into the groups the preset finetunes together."""
        return [self.todo[s : s + self.group] for s in range(0, len(self.todo), self.group)]


def open_zoo(
    preset: str | Preset,
    num: int,
    out: Path,
    *,
    seed: int,
    ranks: Sequence[int],
    shard: str | tuple[int, int] | None,
    first: int,
    cache_dir: Path,
    options: Mapping[str, Any] | None,
    log: Callable[[str], None],
) -> OpenZoo:
    """Check ``out`` against the recipe, prepare the preset (pretrain or load its base), write
    the base and the manifest, drop unfinished adapters and list the LoRAs still to build."""
    preset_obj = get_preset(preset) if isinstance(preset, str) else preset
    opts = preset_obj.options(options)
    ranks = sorted({int(r) for r in ranks})
    if not ranks or min(ranks) < 1:
        raise SettingsError(f"ranks must be positive integers, got {ranks}")
    if not 0 <= int(first) < int(num):
        raise SettingsError(f"first must be in [0, num), got first={first}, num={num}")
    shard_t = parse_shard(shard)
    preset_obj.log = log
    identity = {"preset": preset_obj.name, "seed": int(seed), "options": opts, "ranks": ranks}
    old = read_manifest(out) if (out / MANIFEST).exists() else None
    if old is not None:
        check_identity(old, json.loads(json.dumps(identity)), str(out))
    out.mkdir(parents=True, exist_ok=True)
    (out / ADAPTERS).mkdir(exist_ok=True)

    t0 = time.time()
    preset_obj.prepare(cache_dir, int(seed), opts)
    prepare_s = time.time() - t0
    if not (out / BASE).is_dir():
        with atomic_dir(out / BASE) as tmp:
            preset_obj.save_base(tmp)
    base_hash = hash_base(out / BASE)
    if old is not None:
        check_identity(old, {"base_hash": base_hash}, f"{out} (its base model)")

    columns = preset_obj.label_columns(opts)
    manifest = {
        "format_version": FORMAT_VERSION,
        **identity,
        "num": max(int(num), int(old.get("num", 0)) if old else 0),
        "first": min(int(first), int(old.get("first", 0)) if old else int(first)),
        "shard": f"{shard_t[0]}/{shard_t[1]}" if shard_t else None,
        "base_hash": base_hash,
        "label_columns": columns,
        "binary_columns": preset_obj.binary_columns(opts),
        "hyperparameter_columns": preset_obj.hyperparameter_columns(opts),
        "base_labels": preset_obj.base_labels(),
        "versions": package_versions(),
        "preset_info": preset_obj.manifest_info(),
        "created": (old or {}).get("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
    }
    write_manifest(out, manifest)

    dropped = drop_temp_dirs(out)
    done = rewrite_labels(out, columns)
    todo = [
        i
        for i in range(int(first), int(num))
        if (shard_t is None or i % shard_t[1] == shard_t[0]) and adapter_id(i) not in done
    ]
    log(
        f"zoo {out}: preset {preset_obj.name}, seed {seed}, ranks {ranks}, "
        f"{len(done)} adapters done, {len(todo)} to build"
        + (f", {dropped} unfinished dropped" if dropped else "")
        + f" (base ready in {prepare_s:.1f}s)"
    )
    return OpenZoo(preset_obj, manifest, todo, max(1, int(preset_obj.group_size)), t0)


def train_group(
    preset: Preset,
    out: Path,
    chunk: Sequence[int],
    manifest: Mapping[str, Any],
    on_commit: Callable[[], None] = lambda: None,
) -> None:
    """Finetune the LoRAs ``chunk`` together (one ``preset.train`` call) and commit each into
    ``out`` as soon as it is saved; ``on_commit`` runs after each commit."""
    seed, ranks = int(manifest["seed"]), manifest["ranks"]
    header = ["adapter", *manifest["label_columns"]]
    configs = [preset.sample_config(seed, i, ranks) for i in chunk]
    tmp_dirs = [temp_dir(out, i) for i in chunk]
    committed: set[int] = set()

    def commit(k: int, labels: Mapping[str, Any]) -> None:
        if k in committed:
            return
        row = {"adapter": adapter_id(chunk[k]), **configs[k], **labels}
        commit_adapter(out, tmp_dirs[k], row, header)
        committed.add(k)
        on_commit()

    try:
        results = preset.train(configs, tmp_dirs, on_done=commit)
        if len(results) != len(chunk):
            raise RuntimeError(
                f"preset {preset.name} returned {len(results)} labels for {len(chunk)} LoRAs"
            )
        for k, labels in enumerate(results):
            commit(k, labels)
    except BaseException:  # leave no unfinished folder of this (live) process behind
        for k in set(range(len(chunk))) - committed:
            shutil.rmtree(tmp_dirs[k], ignore_errors=True)
        raise


def finish_zoo(
    out: Path, zoo: OpenZoo, *, progress: bool, log: Callable[[str], None]
) -> dict[str, Any]:
    """Log the build's rate and the label spread; the manifest with ``summary`` added."""
    elapsed = time.time() - zoo.t0
    if zoo.todo:
        log(
            f"built {len(zoo.todo)} LoRAs in {elapsed:.1f}s ({len(zoo.todo) / max(elapsed, 1e-9) * 3600:.0f} LoRAs/hour)"
        )
    manifest = zoo.manifest
    rows = list(finished_adapters(out).values())
    summary = summarize_labels(
        rows, manifest["label_columns"], manifest["binary_columns"], manifest["base_labels"]
    )
    if progress and summary:
        log(f"label spread over {len(rows)} LoRAs (base model alone in the last column):")
        log(format_summary(summary))
    manifest["summary"] = summary
    return manifest


def _build(
    preset: str | Preset,
    num: int,
    out: Path,
    *,
    progress: bool,
    log: Callable[[str], None],
    **recipe: Any,
) -> dict[str, Any]:
    zoo = open_zoo(preset, num, out, log=log, **recipe)
    bar = ProgressBar(len(zoo.todo), enabled=progress, eta_after=zoo.group)
    for chunk in zoo.groups():
        train_group(zoo.preset, out, chunk, zoo.manifest, on_commit=bar.update)
    return finish_zoo(out, zoo, progress=progress, log=log)


def build_small_zoo(
    out: Path | str,
    num: int = 48,
    *,
    seed: int = 0,
    ranks: Sequence[int] = (4,),
    size: str = "small",
    threads: int | None = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """A small skills-lm zoo for demos and notebooks (resumable; reuses the cached base model).

    ``size="tiny"`` pretrains a 2-layer, 32-wide base in seconds (for smoke tests); the default
    ``"small"`` base is the one of the benchmark zoos (pretrained once, ~5-10 min on 2 cores,
    then cached). Returns :func:`build_zoo`'s manifest; labels are in ``out/labels.csv``.
    """
    options: dict[str, Any] = {"size": size}
    if size == "tiny":
        options.update(ft_per_source=16, eval_per_source=8, challenge_per_source=8)
    return build_zoo(
        "skills-lm",
        num,
        out,
        seed=seed,
        ranks=ranks,
        options=options,
        threads=threads,
        progress=progress,
    )
