"""The generic zoo builder: resumable, sharded, mergeable; knows nothing about models.

Layout of a zoo folder ``OUT``::

    OUT/zoo.json              manifest: preset, options, seed, ranks, versions, base_hash, ...
    OUT/base/                 the base model (PEFT loads every adapter onto it)
    OUT/adapters/<id>/        one PEFT adapter folder per LoRA (+ labels.json, its labels row)
    OUT/labels.csv            one row per finished adapter, first column ``adapter``

Crash safety (kill -9 at any moment): each adapter is written into ``adapters/.tmp-<id>-*``
together with its ``labels.json``, fsynced, then renamed into place (atomic); only then is its
row appended to labels.csv (one write, fsynced). On every start the builder drops leftover temp
folders and rewrites labels.csv (atomically) from the ``labels.json`` of the finished adapter
folders, so a row half-written by a killed process, or missing because the kill came between the
rename and the append, is repaired. LoRA ``i`` depends only on ``(seed, i)`` (see
``Preset.sample_config``), so ``--num`` extends a zoo and shards (``index % k == i``) agree.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from loralens.atomic import atomic_dir, fsync_dir, fsync_tree, write_file_atomic
from loralens.cache import default_cache_dir
from loralens.zoo.preset import Preset, get_preset

MANIFEST = "zoo.json"
LABELS = "labels.csv"
ADAPTERS = "adapters"
BASE = "base"
ROW_FILE = "labels.json"
FORMAT_VERSION = 1
# what must agree between a zoo and a build that resumes/extends it, and between merged shards
IDENTITY_KEYS = ("preset", "seed", "options", "ranks")


class ZooConflictError(ValueError):
    """A zoo folder (or a shard to merge) was made with another preset, seed, options or base model."""


def adapter_id(index: int) -> str:
    """The folder name of LoRA ``index`` (zero-padded so that names sort by index)."""
    return f"{index:06d}"


def parse_shard(shard: str | tuple[int, int] | None) -> tuple[int, int] | None:
    """``"i/k"`` -> (i, k) with 0 <= i < k."""
    if shard is None or isinstance(shard, tuple):
        return shard
    try:
        i, k = (int(x) for x in str(shard).split("/"))
    except ValueError as err:
        raise ValueError(f"--shard must look like i/k (e.g. 0/4), got {shard!r}") from err
    if not 0 <= i < k:
        raise ValueError(f"--shard {shard}: need 0 <= i < k")
    return i, k


def package_versions() -> dict[str, str]:
    """Versions of the libraries a zoo depends on (stored in the manifest)."""
    from importlib import metadata

    out = {}
    for pkg in ("loralens", "torch", "peft", "transformers", "diffusers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return out


def hash_base(base_dir: Path) -> str:
    """sha256 over the ``*.safetensors`` files of a saved base model (names and bytes)."""
    import hashlib

    h = hashlib.sha256()
    files = sorted(p for p in Path(base_dir).rglob("*.safetensors"))
    if not files:  # a preset that saves .bin or something else: hash every file
        files = sorted(p for p in Path(base_dir).rglob("*") if p.is_file())
    for p in files:
        h.update(str(p.relative_to(base_dir)).encode())
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# small file helpers


def read_manifest(zoo: Path | str) -> dict[str, Any]:
    path = Path(zoo) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{zoo} is not a zoo (no {MANIFEST})")
    return json.loads(path.read_text())


def _csv_line(columns: Sequence[str], row: Mapping[str, Any]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow([_fmt(row.get(c, "")) for c in columns])
    return buf.getvalue()


def _fmt(value: Any) -> Any:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float):
        return repr(value)
    return value


def finished_adapters(zoo: Path) -> dict[str, dict[str, Any]]:
    """id -> labels row of every finished adapter folder (those with a readable labels.json)."""
    adir = Path(zoo) / ADAPTERS
    out: dict[str, dict[str, Any]] = {}
    if not adir.is_dir():
        return out
    for d in sorted(adir.iterdir()):
        if d.name.startswith(".") or not d.is_dir():
            continue
        try:
            out[d.name] = json.loads((d / ROW_FILE).read_text())
        except (OSError, ValueError):
            continue  # not one of ours, or damaged by something other than a kill: rebuilt
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _drop_temp_dirs(zoo: Path) -> int:
    """Remove unfinished adapter folders, sparing those of live builders sharing this zoo."""
    adir = zoo / ADAPTERS
    n = 0
    if adir.is_dir():
        for d in adir.iterdir():
            if not d.name.startswith(".tmp-"):
                continue
            pid = d.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and _pid_alive(int(pid)):
                continue
            shutil.rmtree(d, ignore_errors=True)
            n += 1
    return n


def rewrite_labels(zoo: Path, columns: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Rewrite labels.csv atomically from the finished adapter folders; returns them."""
    done = finished_adapters(zoo)
    header = ["adapter", *columns]
    text = _csv_line(header, {c: c for c in header}) + "".join(
        _csv_line(header, done[k]) for k in sorted(done)
    )
    write_file_atomic(zoo / LABELS, text)
    return done


# ---------------------------------------------------------------------------------------------
# progress


class _Progress:
    """A one-line progress bar with ETA and LoRAs/minute (plain lines when not on a terminal)."""

    def __init__(self, total: int, enabled: bool = True, stream=None, every_s: float = 15.0):
        self.total, self.done = total, 0
        self.enabled = enabled and total > 0
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.time()
        self.last = 0.0
        self.every_s = every_s

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.time()
        if not self.enabled:
            return
        if self.tty or now - self.last >= self.every_s or self.done == self.total:
            self.last = now
            self._print(now)

    def line(self, now: float | None = None) -> str:
        elapsed = (now or time.time()) - self.start
        rate = self.done / elapsed * 60 if elapsed > 0 else 0.0
        left = (self.total - self.done) / (rate / 60) if rate > 0 else math.inf
        width = 28
        fill = int(width * self.done / self.total) if self.total else width
        bar = "#" * fill + "-" * (width - fill)
        eta = _hms(left) if math.isfinite(left) else "?"
        return (
            f"[{bar}] {self.done}/{self.total} LoRAs  {rate:.1f} LoRAs/min  "
            f"elapsed {_hms(elapsed)}  ETA {eta}"
        )

    def _print(self, now: float) -> None:
        end = "" if self.tty and self.done < self.total else "\n"
        prefix = "\r" if self.tty else ""
        print(prefix + self.line(now), end=end, file=self.stream, flush=True)


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# ---------------------------------------------------------------------------------------------
# summary of labels


def summarize_labels(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    binary: Sequence[str] = (),
    base: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Per column: n, min/median/max/std (numbers) or rate (0/1 columns), and the base's value."""
    base = base or {}
    out = []
    for col in columns:
        vals = []
        for r in rows:
            try:
                v = float(r.get(col, ""))
            except (TypeError, ValueError):
                continue
            if math.isfinite(v):
                vals.append(v)
        if not vals:
            continue
        entry: dict[str, Any] = {"column": col, "n": len(vals), "base": base.get(col)}
        if col in binary:
            entry["rate"] = sum(vals) / len(vals)
        else:
            entry.update(
                min=min(vals),
                median=statistics.median(vals),
                max=max(vals),
                std=statistics.pstdev(vals) if len(vals) > 1 else 0.0,
            )
        out.append(entry)
    return out


def format_summary(summary: Sequence[Mapping[str, Any]]) -> str:
    def f(x: Any) -> str:
        if x is None or x == "":
            return "-"
        if isinstance(x, float):
            return f"{x:.4g}"
        return str(x)

    lines = [
        f"{'label':<24} {'n':>6} {'min':>10} {'median':>10} {'max':>10} {'std':>10} {'base':>10}"
    ]
    for e in summary:
        if "rate" in e:
            lines.append(
                f"{e['column']:<24} {e['n']:>6} {'rate ' + f(e['rate']):>43} {f(e['base']):>10}"
            )
        else:
            lines.append(
                f"{e['column']:<24} {e['n']:>6} {f(e['min']):>10} {f(e['median']):>10} "
                f"{f(e['max']):>10} {f(e['std']):>10} {f(e['base']):>10}"
            )
    return "\n".join(lines)


def zoo_summary(zoo: Path | str) -> list[dict[str, Any]]:
    """The label summary of a finished (or partial) zoo, read from its folder."""
    zoo = Path(zoo)
    man = read_manifest(zoo)
    rows = list(finished_adapters(zoo).values())
    return summarize_labels(
        rows, man.get("label_columns", []), man.get("binary_columns", []), man.get("base_labels")
    )


# ---------------------------------------------------------------------------------------------
# build


def _check_identity(have: Mapping[str, Any], want: Mapping[str, Any], where: str) -> None:
    diffs = [
        f"{k}: {have.get(k)!r} != {want.get(k)!r}"
        for k in (*IDENTITY_KEYS, "base_hash")
        if k in have and k in want and have.get(k) != want.get(k)
    ]
    if diffs:
        raise ZooConflictError(
            f"{where} was built differently; refusing to mix: " + "; ".join(diffs)
        )


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
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Build (or resume, or extend) a zoo of the LoRAs ``first .. num-1`` of ``preset`` in ``out``.

    Returns the manifest, with ``summary`` (label spreads, see :func:`summarize_labels`) added.
    ``shard="i/k"`` builds only the LoRAs with ``index % k == i``; merge shard folders with
    :func:`merge_zoos`. ``first > 0`` makes a held-out zoo: its recipes are those no zoo of
    ``num=first`` with the same seed has (e.g. other ranks, unseen recipes). Rerunning the same
    call after a crash (kill -9 included) completes the zoo; a larger ``num`` extends it.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if threads:
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(int(threads))
        try:
            return build_zoo(
                preset,
                num,
                out,
                seed=seed,
                ranks=ranks,
                shard=shard,
                first=first,
                cache_dir=cache_dir,
                options=options,
                progress=progress,
                log=log,
            )
        finally:
            torch.set_num_threads(before)
    preset_obj = get_preset(preset) if isinstance(preset, str) else preset
    opts = preset_obj.options(options)
    ranks = sorted({int(r) for r in ranks})
    if not ranks or min(ranks) < 1:
        raise ValueError(f"ranks must be positive integers, got {ranks}")
    if not 0 <= int(first) < int(num):
        raise ValueError(f"first must be in [0, num), got first={first}, num={num}")
    shard_t = parse_shard(shard)
    out = Path(out)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    identity = {"preset": preset_obj.name, "seed": int(seed), "options": opts, "ranks": ranks}
    old = read_manifest(out) if (out / MANIFEST).exists() else None
    if old is not None:
        _check_identity(old, json.loads(json.dumps(identity)), str(out))
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
        _check_identity(old, {"base_hash": base_hash}, f"{out} (its base model)")

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
        "base_labels": preset_obj.base_labels(),
        "versions": package_versions(),
        "preset_info": preset_obj.manifest_info(),
        "created": (old or {}).get("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())),
    }
    write_file_atomic(out / MANIFEST, json.dumps(manifest, indent=2, default=str) + "\n")

    dropped = _drop_temp_dirs(out)
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

    bar = _Progress(len(todo), enabled=progress)
    header = ["adapter", *columns]
    labels_path = out / LABELS
    group = max(1, int(preset_obj.group_size))
    for start in range(0, len(todo), group):
        chunk = todo[start : start + group]
        configs = [preset_obj.sample_config(int(seed), i, ranks) for i in chunk]
        tmp_dirs = []
        for i in chunk:
            d = out / ADAPTERS / f".tmp-{adapter_id(i)}-{os.getpid()}"
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir()
            tmp_dirs.append(d)
        committed: set[int] = set()

        def commit(
            k: int,
            labels: Mapping[str, Any],
            chunk=chunk,
            configs=configs,
            tmp_dirs=tmp_dirs,
            committed=committed,
        ) -> None:
            if k in committed:
                return
            aid = adapter_id(chunk[k])
            row = {"adapter": aid, **configs[k], **labels}
            (tmp_dirs[k] / ROW_FILE).write_text(json.dumps(row, default=_json_default) + "\n")
            fsync_tree(tmp_dirs[k])
            final = out / ADAPTERS / aid
            if final.exists():  # built meanwhile by another process sharing this folder
                shutil.rmtree(tmp_dirs[k], ignore_errors=True)
            else:
                os.rename(tmp_dirs[k], final)
                fsync_dir(final.parent)
                with open(labels_path, "a") as fh:
                    fh.write(_csv_line(header, row))
                    fh.flush()
                    os.fsync(fh.fileno())
            committed.add(k)
            bar.update()

        results = preset_obj.train(configs, tmp_dirs, on_done=commit)
        if len(results) != len(chunk):
            raise RuntimeError(
                f"preset {preset_obj.name} returned {len(results)} labels for {len(chunk)} LoRAs"
            )
        for k, labels in enumerate(results):
            commit(k, labels)

    elapsed = time.time() - t0
    if todo:
        log(
            f"built {len(todo)} LoRAs in {elapsed:.1f}s ({len(todo) / max(elapsed, 1e-9) * 3600:.0f} LoRAs/hour)"
        )
    rows = list(finished_adapters(out).values())
    summary = summarize_labels(rows, columns, manifest["binary_columns"], manifest["base_labels"])
    if progress and summary:
        log(f"label spread over {len(rows)} LoRAs (base model alone in the last column):")
        log(format_summary(summary))
    manifest["summary"] = summary
    return manifest


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)


# ---------------------------------------------------------------------------------------------
# merge


def merge_zoos(
    out: Path | str, shard_dirs: Sequence[Path | str], *, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Join shard folders (and ``out`` itself, if it is already a zoo) into ``out``.

    Refuses (``ZooConflictError``) shards made with another preset, seed, options, ranks or base
    model. Adapters present in several shards are taken once.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out = Path(out)
    srcs = [Path(s) for s in shard_dirs]
    if not srcs:
        raise ValueError("merge needs at least one shard folder")
    manifests = [read_manifest(s) for s in srcs]
    ref = read_manifest(out) if (out / MANIFEST).exists() else manifests[0]
    for s, m in zip(srcs, manifests):
        _check_identity(ref, m, str(s))
    out.mkdir(parents=True, exist_ok=True)
    (out / ADAPTERS).mkdir(exist_ok=True)
    if not (out / BASE).is_dir():
        with atomic_dir(out / BASE) as tmp:
            shutil.copytree(srcs[0] / BASE, tmp, dirs_exist_ok=True)
    base_hash = hash_base(out / BASE)
    _check_identity(ref, {"base_hash": base_hash}, f"{out} (its base model)")
    _drop_temp_dirs(out)
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
    write_file_atomic(out / MANIFEST, json.dumps(manifest, indent=2, default=str) + "\n")
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
