"""A zoo folder on disk: its layout, manifest, labels.csv, and what makes two zoos the same zoo.

Layout of a zoo folder ``OUT``::

    OUT/zoo.json              manifest: preset, options, seed, ranks, versions, base_hash, ...
    OUT/base/                 the base model (PEFT loads every adapter onto it)
    OUT/adapters/<id>/        one PEFT adapter folder per LoRA (+ labels.json, its labels row)
    OUT/labels.csv            one row per finished adapter, first column ``adapter``

Crash safety (kill -9 at any moment): each adapter is written into ``adapters/.tmp-<id>-<pid>``
together with its ``labels.json``, fsynced, then renamed into place (atomic); only then is its
row appended to labels.csv (one write, fsynced; :func:`commit_adapter`). On every start a build
drops leftover temp folders (:func:`drop_temp_dirs`) and rewrites labels.csv atomically from
the ``labels.json`` of the finished adapter folders (:func:`rewrite_labels`), so a row
half-written by a killed process, or missing because the kill came between the rename and the
append, is repaired.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from loralens.atomic import fsync_dir, fsync_tree, pid_alive, write_file_atomic
from loralens.errors import OutputExistsError

MANIFEST = "zoo.json"
LABELS = "labels.csv"
ADAPTERS = "adapters"
BASE = "base"
ROW_FILE = "labels.json"
FORMAT_VERSION = 1
#: what must agree between a zoo and a build that resumes/extends it, and between merged shards
IDENTITY_KEYS = ("preset", "seed", "options", "ranks")


class ZooConflictError(OutputExistsError):
    """A zoo folder (or a shard to merge) was made with another preset, seed, options or base model."""


def adapter_id(index: int) -> str:
    """The folder name of LoRA ``index`` (zero-padded so that names sort by index)."""
    return f"{index:06d}"


def read_manifest(zoo: Path | str) -> dict[str, Any]:
    """The zoo.json of ``zoo``; ``FileNotFoundError`` if it is not a zoo folder."""
    path = Path(zoo) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{zoo} is not a zoo (no {MANIFEST})")
    return json.loads(path.read_text())


def write_manifest(zoo: Path, manifest: Mapping[str, Any]) -> None:
    """Write zoo.json atomically."""
    write_file_atomic(
        zoo / MANIFEST, json.dumps(manifest, indent=2, default=str) + "\n", replace=True
    )


def check_identity(have: Mapping[str, Any], want: Mapping[str, Any], where: str) -> None:
    """Raise :class:`ZooConflictError` naming every identity key (or ``base_hash``) that both
    manifests have and that differs."""
    diffs = [
        f"{k}: {have.get(k)!r} != {want.get(k)!r}"
        for k in (*IDENTITY_KEYS, "base_hash")
        if k in have and k in want and have.get(k) != want.get(k)
    ]
    if diffs:
        raise ZooConflictError(
            f"{where} was built differently; refusing to mix: " + "; ".join(diffs)
        )


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


def csv_line(columns: Sequence[str], row: Mapping[str, Any]) -> str:
    """One labels.csv line of ``row`` (booleans as 0/1, floats exactly, missing values empty)."""
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


def rewrite_labels(zoo: Path, columns: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Rewrite labels.csv atomically from the finished adapter folders; returns them."""
    done = finished_adapters(zoo)
    header = ["adapter", *columns]
    text = csv_line(header, {c: c for c in header}) + "".join(
        csv_line(header, done[k]) for k in sorted(done)
    )
    write_file_atomic(zoo / LABELS, text, replace=True)
    return done


def temp_dir(zoo: Path, index: int) -> Path:
    """A fresh, empty folder for this process to write LoRA ``index`` into."""
    d = zoo / ADAPTERS / f".tmp-{adapter_id(index)}-{os.getpid()}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    return d


def commit_adapter(zoo: Path, tmp: Path, row: Mapping[str, Any], header: Sequence[str]) -> None:
    """Make the adapter written in ``tmp`` finished: its ``row`` (``row["adapter"]`` is its id)
    into ``labels.json``, fsync, rename into place, append the row to labels.csv. If the adapter
    was finished meanwhile by another process sharing the folder, ``tmp`` is dropped instead."""
    (tmp / ROW_FILE).write_text(json.dumps(row, default=_json_default) + "\n")
    fsync_tree(tmp)
    final = zoo / ADAPTERS / str(row["adapter"])
    if final.exists():
        shutil.rmtree(tmp, ignore_errors=True)
        return
    os.rename(tmp, final)
    fsync_dir(final.parent)
    with open(zoo / LABELS, "a") as fh:
        fh.write(csv_line(header, row))
        fh.flush()
        os.fsync(fh.fileno())


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)


def drop_temp_dirs(zoo: Path) -> int:
    """Remove unfinished adapter folders, sparing those of live builders sharing this zoo."""
    adir = zoo / ADAPTERS
    n = 0
    if adir.is_dir():
        for d in adir.iterdir():
            if not d.name.startswith(".tmp-"):
                continue
            pid = d.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and pid_alive(int(pid)):
                continue
            shutil.rmtree(d, ignore_errors=True)
            n += 1
    return n
