"""Where loralens keeps what it builds once per machine, and when it trusts what it finds there.

A cache *entry* (a pretrained base model, a dataset) is a folder of ``.safetensors`` and
``.json`` files only: formats whose reading runs no code. :func:`cache_entry` builds it in a
temp folder, writes a manifest (:data:`ENTRY_MANIFEST`: every file's size and sha256) last,
and renames the folder into place (:func:`loralens.atomic.atomic_dir`), so an entry is whole
or absent. Before an entry is used, every file is checked against its manifest; an entry that
fails (a file changed, missing or added since it was written, a pickle or any other file type,
a link or special file, no manifest) is refused with a :class:`CacheError` naming the file,
never loaded and never rebuilt over: a changed entry means corruption or tampering, which the
user should see, and deleting a folder that another process (a zoo shard) may be reading is not
safe. The error says which folder to delete to rebuild it.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from loralens.atomic import atomic_dir, file_sha256, write_file_atomic
from loralens.errors import InputError

#: the manifest inside every cache entry, written last
ENTRY_MANIFEST = "loralens-cache.json"
#: the only file types an entry may hold
ENTRY_SUFFIXES = (".safetensors", ".json")
_FORMAT = 1
_MAX_MANIFEST_BYTES = 1 << 20


class CacheError(InputError):
    """A cache entry that cannot be trusted; the message names the file and the folder to delete."""


def default_cache_dir() -> Path:
    """$LORALENS_CACHE, else ~/.cache/loralens."""
    env = os.environ.get("LORALENS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "loralens"


def cache_entry(path: Path | str, build: Callable[[Path], None]) -> Path:
    """The verified cache entry ``path``; if it does not exist, ``build(tmp)`` writes it first.

    ``build`` writes ``.safetensors`` and ``.json`` files into the empty folder ``tmp``; the
    manifest is added after it returns and the folder renamed to ``path`` (the first of two
    racing processes wins). An existing entry is verified, never rebuilt: see the module
    docstring. Raises :class:`CacheError`.
    """
    path = Path(path)
    if not os.path.lexists(path):
        with atomic_dir(path) as tmp:
            build(tmp)
            write_file_atomic(tmp / ENTRY_MANIFEST, json.dumps(_describe(tmp), indent=1) + "\n")
    verify_entry(path)
    return path


def verify_entry(path: Path | str) -> None:
    """Raise :class:`CacheError` unless the entry ``path`` holds exactly the files its manifest
    lists, each a regular ``.safetensors``/``.json`` file of the recorded size and sha256."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        _refuse(path, path, "is not a plain folder")
    recorded = _read_manifest(path)
    found = _files(path)
    for rel in sorted(set(recorded) - set(found)):
        _refuse(path, path / rel, "is listed in the entry's manifest but missing")
    for rel in sorted(set(found) - set(recorded)):
        _refuse(path, found[rel], "was not written with this entry (not in its manifest)")
    for rel, file in sorted(found.items()):
        rec = recorded[rel]
        if not isinstance(rec, dict) or file.stat().st_size != rec.get("size"):
            _refuse(path, file, "has changed since it was written (size differs from the manifest)")
        if file_sha256(file)[1] != rec.get("sha256"):
            _refuse(
                path, file, "has changed since it was written (sha256 differs from the manifest)"
            )


def _describe(entry: Path) -> dict[str, Any]:
    files = {
        rel: {"size": f.stat().st_size, "sha256": file_sha256(f)[1]}
        for rel, f in _files(entry).items()
    }
    return {"format": _FORMAT, "files": files}


def _files(entry: Path) -> dict[str, Path]:
    """Every file below ``entry`` but the manifest, by relative path; refuses anything but
    folders and regular files of the allowed types (links and FIFOs are never opened)."""
    out: dict[str, Path] = {}
    for root, dirs, names in os.walk(entry):
        for name in sorted(dirs + names):
            p = Path(root) / name
            mode = p.lstat().st_mode
            if stat.S_ISDIR(mode):
                continue
            if not stat.S_ISREG(mode):
                _refuse(entry, p, "is a link or special file, not a regular file")
            rel = p.relative_to(entry).as_posix()
            if rel == ENTRY_MANIFEST:
                continue
            if p.suffix not in ENTRY_SUFFIXES:
                _refuse(
                    entry,
                    p,
                    "is not a .safetensors or .json file (loralens never loads pickles or other "
                    "formats from its cache)",
                )
            out[rel] = p
    return out


def _read_manifest(entry: Path) -> dict[str, Any]:
    man = entry / ENTRY_MANIFEST
    if not os.path.lexists(man):
        _refuse(entry, man, "is missing (an entry from an older loralens, or not written by it)")
    if not stat.S_ISREG(man.lstat().st_mode) or man.stat().st_size > _MAX_MANIFEST_BYTES:
        _refuse(entry, man, "is not a regular file of at most 1 MiB")
    try:
        data = json.loads(man.read_bytes())
    except (ValueError, RecursionError) as err:
        _refuse(entry, man, f"is not valid JSON ({err})")
    if (
        not isinstance(data, dict)
        or data.get("format") != _FORMAT
        or not isinstance(data.get("files"), dict)
    ):
        _refuse(entry, man, f"is not a format-{_FORMAT} cache manifest")
    return data["files"]


def _refuse(entry: Path, file: Path, problem: str) -> NoReturn:
    raise CacheError(
        f"cache entry {entry}: {file} {problem}; refusing to use it. "
        f"Delete the folder {entry} to rebuild it."
    )
