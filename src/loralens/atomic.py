"""File-system safety: a file or a directory appears whole under its final name or not at all,
one writer at a time, no orphans left by killed writers, only regular files are opened, and an
output is never written through a link nor over something loralens did not write."""

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
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, TypeVar

from loralens.errors import LoRALensError, OutputError, OutputExistsError

T = TypeVar("T")
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


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
        (stat.S_ISLNK, "a symbolic link"),
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


def open_regular(path: Path | str, *, dir_fd: int | None = None, follow: bool = True) -> BinaryIO:
    """Open ``path`` (relative to the directory ``dir_fd`` if given) for reading in binary
    mode, only if it is a regular file; with ``follow=False`` a link there is refused too
    (``O_NOFOLLOW``: for files inside a folder loralens wrote, where no link belongs).

    Opened without blocking and checked on the open descriptor (no race with a swap of the
    name), so a named pipe with no writer is refused at once instead of hanging the reader.
    """
    mode = os.stat(path, dir_fd=dir_fd, follow_symlinks=follow).st_mode
    if not stat.S_ISREG(mode):  # a device is refused before it is opened
        raise SpecialFileError(path, file_kind(mode))
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags | (0 if follow else _NOFOLLOW), dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP and not follow:  # a link put there since the stat
            raise SpecialFileError(path, "a symbolic link") from None
        raise
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
# outputs: written under a fresh temporary name, published whole, never through a link, and
# never over anything this command did not write


@contextlib.contextmanager
def output_errors(path: Path | str) -> Iterator[None]:
    """OS errors while writing the output ``path`` (a read-only or full folder, an I/O error)
    as one :class:`OutputError` naming it; what loralens refuses on purpose passes unchanged."""
    try:
        yield
    except LoRALensError:
        raise
    except OSError as e:
        raise OutputError(f"{path}: cannot be written ({e.strerror or e})") from None


def _in_the_way(path: Path, mode: int) -> OutputExistsError:
    return OutputExistsError(
        f"{path} is {file_kind(mode)}: loralens writes its outputs as regular files, never "
        "through a link or into a special file"
    )


def output_exists(path: Path | str, *, folder: bool = False) -> bool:
    """Whether something is at the output ``path`` (never followed): False when nothing is,
    True for a regular file (or, for an output that is a ``folder``, a folder); anything else
    (a link, even a dangling one, a named pipe, a device, a socket) is refused
    (:class:`OutputExistsError` naming it)."""
    path = Path(path)
    with output_errors(path):
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return False
    if not (stat.S_ISREG(mode) or (folder and stat.S_ISDIR(mode))):
        raise _in_the_way(path, mode)
    return True


def replaceable(
    path: Path | str,
    *,
    overwrite: bool,
    ours: Callable[[Path], bool],
    what: str,
    folder: bool = False,
) -> bool:
    """Whether writing the output ``path`` replaces what is there: False when nothing is; True
    with ``overwrite`` when ``ours(path)`` recognises it as what this command writes (``what``,
    e.g. 'an index folder'); anything else is refused (:class:`OutputExistsError` naming it):
    ``--overwrite`` replaces only what the command itself writes."""
    path = Path(path)
    if not output_exists(path, folder=folder):
        return False
    if not overwrite:
        raise OutputExistsError(f"{path} already exists (use --overwrite to replace it)")
    if not ours(path):
        raise OutputExistsError(
            f"{path} exists and is not {what}: --overwrite replaces only what this command writes"
        )
    return True


def _fresh(folder: Path, prefix: str, make: Callable[[Path], T]) -> tuple[T, Path]:
    """``make(p)`` for a new unpredictable name ``p`` in ``folder`` (:func:`owned_name`), made
    exclusively: a name someone put there first, link or not, is never used."""
    for _ in range(100):
        p = folder / owned_name(prefix)
        try:
            return make(p), p
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(folder))


def _create(p: Path) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    return os.open(p, flags, 0o666)


def publish(tmp: Path | str, final: Path | str, *, replace: bool) -> None:
    """Give ``tmp`` (a file or folder this process wrote beside ``final``) the name ``final``
    in one step. Unless ``replace``, nothing at ``final`` is ever replaced, not even something
    that appeared there a moment ago (:class:`OutputExistsError`); with it, a file at
    ``final`` is replaced by name (a link there is replaced, never followed)."""
    tmp, final = Path(tmp), Path(final)
    try:
        if replace:
            os.replace(tmp, final)
        elif not _renameat2(tmp, final, _NOREPLACE):
            _publish_new(tmp, final)
    except FileExistsError:
        raise OutputExistsError(
            f"{final} appeared while it was being written: not replacing it"
        ) from None
    fsync_dir(final.parent)


def _publish_new(tmp: Path, final: Path) -> None:
    """``publish`` without replacing, where the kernel has no renameat2: a hard link (fails on
    anything at ``final``); a folder, or a file system without hard links, by a rename after a
    check (a folder is only ever renamed over an empty folder)."""
    if not tmp.is_dir():
        try:
            os.link(tmp, final, follow_symlinks=False)
            os.unlink(tmp)
            return
        except FileExistsError:
            raise
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
    if os.path.lexists(final):
        raise FileExistsError(errno.EEXIST, "exists", str(final))
    os.rename(tmp, final)


@contextlib.contextmanager
def new_file(path: Path | str, *, replace: bool = False) -> Iterator[BinaryIO]:
    """A binary file to write the output ``path`` through: a temporary file beside it, made
    exclusively under an unpredictable name, fsynced and published at ``path`` when the block
    ends (:func:`publish`; only as a new name unless ``replace``), removed on an error. OS
    errors, the block's writes included, are :class:`OutputError` naming ``path``."""
    path = Path(path)
    with output_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _fresh(path.parent, f".{path.name}.tmp-", _create)
    try:
        with output_errors(path), os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        with output_errors(path):
            publish(tmp, path, replace=replace)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_file_atomic(path: Path | str, data: bytes | str, *, replace: bool = False) -> None:
    """Write ``data`` to the output ``path`` whole or not at all (:func:`new_file`); unless
    ``replace``, a file already at ``path`` is never replaced (:class:`OutputExistsError`)."""
    with new_file(path, replace=replace) as fh:
        fh.write(data.encode() if isinstance(data, str) else data)


@contextlib.contextmanager
def new_dir(final: Path | str, *, replace: bool = False) -> Iterator[Path]:
    """A folder to write the output ``final`` through: a temporary folder beside it, made
    exclusively, fsynced and published at ``final`` when the block ends: only as a new name
    unless ``replace``, else swapped with the folder there (:func:`swap_in`), which is then
    removed. Removed on an error; OS errors are :class:`OutputError` naming ``final``."""
    final = Path(final)
    with output_errors(final):
        final.parent.mkdir(parents=True, exist_ok=True)
        _, tmp = _fresh(final.parent, f".{final.name}.tmp-", os.mkdir)
    try:
        with output_errors(final):
            yield tmp
            fsync_tree(tmp)
            if not replace:
                publish(tmp, final, replace=False)
            elif (old := swap_in(tmp, final, f".{final.name}.old-")) is not None:
                shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def open_append(path: Path | str) -> BinaryIO:
    """The output ``path`` opened to append to, made if missing: a regular file only, never
    through a link (``O_NOFOLLOW``), never blocking on a named pipe; OS errors are
    :class:`OutputError` naming it."""
    path = Path(path)
    output_exists(path)  # a link, pipe, device or folder there is refused before opening
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | _NOFOLLOW
    with output_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0), 0o666)
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENXIO):  # a link or a pipe put there since
                output_exists(path)
            raise
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            raise _in_the_way(path, mode)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "ab")


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
    return f"{prefix}{uuid.uuid4().hex[:12]}-{os.getpid()}"


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


_NOREPLACE, _EXCHANGE = 1, 2  # renameat2's RENAME_NOREPLACE and RENAME_EXCHANGE


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names ``a`` and ``b`` in one step; False where the system cannot."""
    return _renameat2(a, b, _EXCHANGE)


def _renameat2(a: Path, b: Path, flag: int) -> bool:
    """Rename ``a`` to ``b`` with a Linux renameat2 ``flag`` (no replacing, or a swap); False
    where the system or file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), flag) == 0:
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
