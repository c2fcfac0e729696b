"""Joining zoo shards (built with ``--shard i/k``) into one zoo folder."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from loralens.atomic import atomic_dir
from loralens.errors import SettingsError
from loralens.zoo.folder import (
    ADAPTERS,
    BASE,
    MANIFEST,
    adapter_id,
    check_identity,
    drop_temp_dirs,
    finished_adapters,
    hash_base,
    read_manifest,
    rewrite_labels,
    write_manifest,
)
from loralens.zoo.progress import log_stderr
from loralens.zoo.summary import summarize_labels


def merge_zoos(
    out: Path | str, shard_dirs: Sequence[Path | str], *, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Join shard folders (and ``out`` itself, if it is already a zoo) into ``out``.

    Refuses (``ZooConflictError``) shards made with another preset, seed, options, ranks or base
    model. Adapters present in several shards are taken once.
    """
    log = log or log_stderr
    out = Path(out)
    srcs = [Path(s) for s in shard_dirs]
    if not srcs:
        raise SettingsError("merge needs at least one shard folder")
    manifests = [read_manifest(s) for s in srcs]
    ref = read_manifest(out) if (out / MANIFEST).exists() else manifests[0]
    for s, m in zip(srcs, manifests):
        check_identity(ref, m, str(s))
    out.mkdir(parents=True, exist_ok=True)
    (out / ADAPTERS).mkdir(exist_ok=True)
    if not (out / BASE).is_dir():
        with atomic_dir(out / BASE) as tmp:
            shutil.copytree(srcs[0] / BASE, tmp, dirs_exist_ok=True)
    base_hash = hash_base(out / BASE)
    check_identity(ref, {"base_hash": base_hash}, f"{out} (its base model)")
    drop_temp_dirs(out)
    have = set(finished_adapters(out))
    copied = 0
    for s in srcs:
        for aid in sorted(finished_adapters(s)):
            if aid in have:
                continue
            with atomic_dir(out / ADAPTERS / aid) as tmp:
                shutil.copytree(s / ADAPTERS / aid, tmp, dirs_exist_ok=True)
            have.add(aid)
            copied += 1
    manifest = {k: v for k, v in ref.items() if k != "summary"}
    manifest.update(
        num=max(int(m.get("num", 0)) for m in [ref, *manifests]),
        first=min(int(m.get("first", 0)) for m in [ref, *manifests]),
        shard=None,
        base_hash=base_hash,
        merged_from=sorted({*ref.get("merged_from", []), *(str(s.resolve()) for s in srcs)}),
    )
    write_manifest(out, manifest)
    done = rewrite_labels(out, manifest["label_columns"])
    log(f"merged {len(srcs)} shard(s) into {out}: {copied} adapters copied, {len(done)} in all")
    wanted = range(manifest["first"], manifest["num"])
    missing = [adapter_id(i) for i in wanted if adapter_id(i) not in done]
    if missing:
        log(f"note: {len(missing)} of {len(wanted)} LoRAs are still missing (e.g. {missing[:3]})")
    manifest["summary"] = summarize_labels(
        list(done.values()),
        manifest["label_columns"],
        manifest.get("binary_columns", []),
        manifest.get("base_labels"),
    )
    return manifest
