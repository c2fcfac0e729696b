"""File-system safety: a file or a directory appears whole under its final name or not at all,
one writer at a time, no orphans left by killed writers, and only regular files are opened."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import os
import shutil
import stat
import sys
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from loralens.errors import LoRALensError


def fsync_dir(path: Path | str) -> None:
    """fsync a directory, so that a rename inside it survives a crash (no-op where unsupported)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_tree(path: Path | str) -> None:
    """fsync every file under ``path`` and the directories themselves."""
    for root, _dirs, files in os.walk(path):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(root)


def write_file_atomic(path: Path | str, data: bytes | str) -> None:
    """Write ``data`` to a temp file beside ``path``, fsync it, rename it into place, fsync the dir."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data.encode() if isinstance(data, str) else data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_dir(final: Path | str) -> Iterator[Path]:
    """Write a directory atomically: yields a temp dir next to ``final``, renamed into place on success.

    If ``final`` already exists when the block ends (another process won the race), the temp dir
    is dropped and the existing one kept. On an exception the temp dir is removed.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(tmp)
        else:
            os.rename(tmp, final)
            fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ---------------------------------------------------------------------------------------------
# only regular files are opened


class SpecialFileError(LoRALensError, OSError):
    """A path that must be a regular file is a named pipe, socket, device or folder
    (``kind`` says which, e.g. 'a named pipe')."""

    def __init__(self, path: Path | str, kind: str):
        super().__init__(f"{path} is {kind}, not a regular file")
        self.kind = kind


def file_kind(mode: int) -> str:
    """What a file of this stat mode is, in words (e.g. 'a named pipe')."""
    for test, what in (
        (stat.S_ISFIFO, "a named pipe"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISDIR, "a folder"),
    ):
        if test(mode):
            return what
    return "not a regular file"


def special_kind(path: Path | str) -> str:
    """'' when ``path`` (symlinks followed) is a regular file or folder, else what it is instead
    (e.g. 'a named pipe'); raises FileNotFoundError when it does not exist."""
    mode = os.stat(path).st_mode
    return "" if stat.S_ISREG(mode) or stat.S_ISDIR(mode) else file_kind(mode)


def open_regular(path: Path | str, *, dir_fd: int | None = None) -> BinaryIO:
    """Open ``path`` (relative to the directory ``dir_fd`` if given) for reading in binary
    mode, only if it is a regular file.

    Opened without blocking and checked on the open descriptor (no race with a swap of the
    name), so a named pipe with no writer is refused at once instead of hanging the reader.
    """
    mode = os.stat(path, dir_fd=dir_fd).st_mode  # a device is refused before it is opened
    if not stat.S_ISREG(mode):
        raise SpecialFileError(path, file_kind(mode))
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags, dir_fd=dir_fd)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise SpecialFileError(path, file_kind(mode))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


# ---------------------------------------------------------------------------------------------
# one writer at a time, swaps that leave the old or the new, never none, and orphan clean-up


def file_sha256(path: Path | str, chunk_bytes: int = 8 * 2**20) -> tuple[int, str]:
    """(size in bytes, sha256 hex digest) of a regular file, read in chunks."""
    digest, size = hashlib.sha256(), 0
    with open_regular(path) as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owned_name(prefix: str) -> str:
    """A fresh name ``<prefix><random>-<pid>``: the trailing pid says which process owns it."""
    return f"{prefix}{uuid.uuid4().hex[:8]}-{os.getpid()}"


def _orphaned(name: str) -> bool:
    """Whether the owner of ``...-<pid>`` is gone (or unknown, or this very process)."""
    pid = name.rsplit("-", 1)[-1]
    return not (pid.isdigit() and int(pid) != os.getpid() and pid_alive(int(pid)))


def remove_orphans(parent: Path | str, prefixes: Sequence[str]) -> int:
    """Remove the entries of ``parent`` whose names start with one of ``prefixes`` and end in the
    pid of a process that is gone (see :func:`owned_name`), sparing those of live processes;
    returns how many were removed."""
    parent = Path(parent)
    if not parent.is_dir():
        return 0
    n = 0
    for p in parent.iterdir():
        if not p.name.startswith(tuple(prefixes)) or not _orphaned(p.name):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        n += 1
    return n


class LockBeside:
    """An exclusive ``flock`` on ``.<name>.lock`` beside ``target``: one writer of it at a time.

    The kernel drops the lock when its holder dies, so a killed writer never blocks the next.
    The lock file is removed on release; a waiter that then holds a lock on the removed file
    notices (the name no longer leads to its file) and locks anew.
    """

    def __init__(self, target: Path | str):
        target = Path(target)
        self.path = target.parent / f".{target.name}.lock"
        self._fd: int | None = None

    def acquire(self) -> LockBeside:
        flags = os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
        while self._fd is None:
            fd = os.open(self.path, flags, 0o644)
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                os.close(fd)
                raise SpecialFileError(self.path, file_kind(st.st_mode))
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.path.samestat(st, os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
            else:
                os.close(fd)
        return self

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self._fd)  # closing drops the flock
        self._fd = None

    def __enter__(self) -> LockBeside:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names ``a`` and ``b`` in one step (Linux renameat2 RENAME_EXCHANGE); False
    where the system or file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def swap_in(new: Path | str, final: Path | str, trash_prefix: str) -> Path | None:
    """Put the directory ``new`` at ``final`` (a sibling); returns where the directory that was
    at ``final`` now lies (for the caller to remove), or None if there was none.

    The swap is one atomic exchange where the kernel supports it; elsewhere the old directory
    is first renamed to ``<trash_prefix><random>-<pid>`` (see :func:`restore_interrupted_swap`).
    """
    new, final = Path(new), Path(final)
    if not final.exists():
        os.rename(new, final)
        fsync_dir(final.parent)
        return None
    if final.is_dir() and not any(final.iterdir()):
        os.rename(new, final)  # over an empty directory: one rename
        fsync_dir(final.parent)
        return None
    if _exchange(new, final):
        fsync_dir(final.parent)
        return new
    trash = final.parent / owned_name(trash_prefix)
    os.rename(final, trash)
    try:
        os.rename(new, final)
    except BaseException:
        os.rename(trash, final)
        raise
    fsync_dir(final.parent)
    return trash


def restore_interrupted_swap(final: Path | str, trash_prefix: str) -> bool:
    """If a writer died between the two renames of :func:`swap_in` (``final`` is missing and
    its old directory lies under a trash name of a dead process), put the old one back."""
    final = Path(final)
    if final.exists() or not final.parent.is_dir():
        return False
    for p in sorted(final.parent.iterdir()):
        if p.name.startswith(trash_prefix) and p.is_dir() and _orphaned(p.name):
            os.rename(p, final)
            fsync_dir(final.parent)
            return True
    return False
