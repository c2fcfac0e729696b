"""From a received file to an adapter path: a ``.safetensors`` file as it is, or a ``.zip`` /
``.tar`` of a PEFT folder unpacked under caps.

The file's kind comes from its first bytes, never its name. Archives are unpacked member by
member by this module (never ``extractall``): at most ``max_members`` members and
``max_unpacked_bytes`` bytes, counted while writing; no absolute paths, ``..``, links, device
files, FIFOs or encrypted members. Every refusal is a :class:`Refused` with a 4xx status.
"""

from __future__ import annotations

import lzma
import os
import re
import stat
import struct
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from loralens.atomic import SpecialFileError, open_regular
from loralens.serve.errors import Refused

CHUNK = 1 << 20
ACCEPTED = "a .safetensors file, or a .zip / .tar of a PEFT adapter folder"
PEFT_CONFIG = "adapter_config.json"
#: what a corrupt compressed stream raises while it is read
_CORRUPT = (EOFError, OSError, ValueError, zlib.error, lzma.LZMAError)


@dataclass(frozen=True)
class Limits:
    """Caps on what one archive may unpack to."""

    max_members: int = 256
    max_unpacked_bytes: int = 1 << 30
    max_depth: int = 16


def kind_of(path: Path, name: str) -> str | None:
    """'safetensors', 'zip', 'tar' or None, from the first bytes of the file ``name`` at
    ``path``; a named pipe, device or socket is refused, never opened."""
    try:
        with open_regular(path) as f:
            head = f.read(512)
    except SpecialFileError as e:
        raise Refused(422, f"{name}: {e.kind}, not a regular file") from None
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    if head[:2] == b"\x1f\x8b" or head[:3] == b"BZh" or head[:6] == b"\xfd7zXZ\x00":
        return "tar"  # a compressed tar; anything else inside is refused by tarfile
    if head[8:9] == b"{":
        return "safetensors"  # the reader checks the header length and everything else
    return None


#: What a file's name says it is, where its first bytes say nothing: a corrupt or truncated
#: file is then refused by that kind's reader, with the message `loralens screen` gives it.
_NAMED = {
    ".safetensors": "safetensors",
    ".zip": "zip",
    ".tar": "tar",
    ".tgz": "tar",
    ".gz": "tar",
    ".bz2": "tar",
    ".xz": "tar",
}


def file_kind(path: Path, name: str) -> str | None:
    """:func:`kind_of` the file's bytes, else the kind its name's suffix claims (None: neither
    says it is a safetensors file or an archive). Uploads and local files are judged by this
    one rule, so the same bad file gets the same message from the service and from
    ``loralens screen``."""
    return kind_of(path, name) or _NAMED.get(Path(name).suffix.lower())


def prepare_adapter(upload: Path, name: str, dest: Path, limits: Limits) -> tuple[Path, str]:
    """Place the received file ``upload`` (the client called it ``name``) under ``dest`` as an
    adapter loralens can read: (its path, the name to show for that path)."""
    kind = file_kind(upload, name)
    dest.mkdir()
    if kind == "safetensors":
        target = dest / (Path(name).stem + ".safetensors")
        os.replace(upload, target)
        return target, name
    if kind is None:
        raise Refused(415, f"{name}: not {ACCEPTED}")
    found = _unpack(kind, upload, dest, limits, name)
    upload.unlink()  # the unpacked copy is all that is needed now
    return found


def local_adapter(path: Path, name: str, dest: Path, limits: Limits) -> tuple[Path, str]:
    """An adapter on this machine: a folder or file as it is (the reader judges it), an archive
    unpacked under ``dest`` by the same rules as an upload (the archive itself is left alone)."""
    kind = None if path.is_dir() else file_kind(path, name)
    if kind not in ("zip", "tar"):
        return path, name
    dest.mkdir()
    return _unpack(kind, path, dest, limits, name)


def _unpack(kind: str, archive: Path, dest: Path, limits: Limits, name: str) -> tuple[Path, str]:
    (_unzip if kind == "zip" else _untar)(archive, dest, limits, name)
    return _adapter_in(dest, name)


def _adapter_in(dest: Path, name: str) -> tuple[Path, str]:
    """The one PEFT folder (or lone .safetensors file) that an unpacked archive holds."""
    folders = sorted(p.parent for p in dest.rglob(PEFT_CONFIG) if p.is_file())
    if len(folders) > 1:
        shown = ", ".join(str(p.relative_to(dest)) or "." for p in folders[:5])
        raise Refused(422, f"{name}: holds {len(folders)} adapters ({shown}); upload one")
    if not folders:
        files = sorted(p for p in dest.rglob("*.safetensors") if p.is_file())
        if len(files) != 1:
            raise Refused(422, f"{name}: holds no {PEFT_CONFIG} (expected {ACCEPTED})")
        folders = files
    rel = folders[0].relative_to(dest).as_posix()
    return folders[0], name if rel == "." else f"{name}/{rel}"


def _member_parts(raw: str, name: str, limits: Limits) -> list[str]:
    """The path parts of an archive member, refusing anything that could land outside."""
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if (
        raw.startswith("/")
        or "\\" in raw
        or "\x00" in raw
        or ".." in parts
        or re.match(r"[A-Za-z]:", raw)
    ):
        raise Refused(422, f"{name}: member {raw!r} points outside the archive")
    if len(parts) > limits.max_depth:
        raise Refused(422, f"{name}: member {raw!r} is nested too deep")
    return parts


class _Budget:
    """Counts members and unpacked bytes against the limits."""

    def __init__(self, limits: Limits, name: str) -> None:
        self.limits, self.name, self.members, self.bytes = limits, name, 0, 0

    def member(self) -> None:
        self.members += 1
        if self.members > self.limits.max_members:
            raise Refused(
                413, f"{self.name}: more than {self.limits.max_members} members in the archive"
            )

    def add(self, n: int) -> None:
        self.bytes += n
        if self.bytes > self.limits.max_unpacked_bytes:
            mb = self.limits.max_unpacked_bytes / 2**20
            raise Refused(413, f"{self.name}: unpacks to more than {mb:g} MB")


def _write_member(src: BinaryIO, target: Path, budget: _Budget, name: str, raw: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        raise Refused(422, f"{name}: member {raw!r} appears twice")
    with open(target, "xb") as out:
        while chunk := src.read(CHUNK):
            budget.add(len(chunk))
            out.write(chunk)


def _zip_directory_ok(path: Path, name: str, limits: Limits) -> None:
    """Refuse a zip whose central directory is too large before ``zipfile`` parses it all."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - 65557))
        tail = f.read()
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or len(tail) < at + 22:
        raise Refused(422, f"{name}: not a readable zip archive (no end of central directory)")
    entries, cd_size = struct.unpack("<HI", tail[at + 10 : at + 16])
    if entries == 0xFFFF or cd_size == 0xFFFFFFFF:
        raise Refused(413, f"{name}: zip64 archives are not accepted")
    if entries > limits.max_members or cd_size > limits.max_members * 4096:
        raise Refused(413, f"{name}: more than {limits.max_members} members in the archive")


def _unzip(path: Path, dest: Path, limits: Limits, name: str) -> None:
    _zip_directory_ok(path, name, limits)
    budget = _Budget(limits, name)
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            for info in infos:
                budget.member()
                mode = info.external_attr >> 16
                _check_mode(mode, info.filename, name)
                if info.flag_bits & 0x1:
                    raise Refused(422, f"{name}: member {info.filename!r} is encrypted")
            if sum(i.file_size for i in infos) > limits.max_unpacked_bytes:
                budget.add(sum(i.file_size for i in infos))  # refuses, naming the cap
            for info in infos:
                parts = _member_parts(info.filename, name, limits)
                if not parts:
                    continue
                if info.is_dir():
                    dest.joinpath(*parts).mkdir(parents=True, exist_ok=True)
                    continue
                with zf.open(info) as src:
                    _write_member(src, dest.joinpath(*parts), budget, name, info.filename)
    except (zipfile.BadZipFile, NotImplementedError, *_CORRUPT) as e:
        raise Refused(422, f"{name}: not a readable zip archive ({e})") from None


def _check_mode(mode: int, raw: str, name: str) -> None:
    """Refuse links and special files recorded in a zip member's Unix mode bits."""
    if stat.S_ISLNK(mode):
        raise Refused(422, f"{name}: member {raw!r} is a link; links are not accepted")
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise Refused(422, f"{name}: member {raw!r} is a device or special file")


def _untar(path: Path, dest: Path, limits: Limits, name: str) -> None:
    budget = _Budget(limits, name)
    try:
        with tarfile.open(path, mode="r:*") as tar:
            for m in tar:  # lazily: a huge member count stops at the cap
                budget.member()
                if m.issym() or m.islnk():
                    raise Refused(
                        422, f"{name}: member {m.name!r} is a link; links are not accepted"
                    )
                if not (m.isfile() or m.isdir()) or m.issparse():
                    raise Refused(422, f"{name}: member {m.name!r} is a device or special file")
                parts = _member_parts(m.name, name, limits)
                if not parts:
                    continue
                if m.isdir():
                    dest.joinpath(*parts).mkdir(parents=True, exist_ok=True)
                    continue
                if budget.bytes + m.size > limits.max_unpacked_bytes:
                    budget.add(m.size)  # refuses, naming the cap
                src = tar.extractfile(m)
                assert src is not None  # a regular file always has data
                _write_member(src, dest.joinpath(*parts), budget, name, m.name)
    except (tarfile.TarError, *_CORRUPT) as e:
        raise Refused(422, f"{name}: not a readable tar archive ({e})") from None


__all__ = ["ACCEPTED", "Limits", "file_kind", "kind_of", "local_adapter", "prepare_adapter"]
