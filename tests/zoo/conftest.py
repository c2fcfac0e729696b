"""Fixtures of the zoo tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread, as the zoo builder and CLI use: threads thrash on a busy 2-core CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def kill9_build():
    """Start ``build_zoo(preset, num, out, **kwargs)`` in a subprocess and kill -9 it once
    ``after`` adapters are finished (or it ends, or ``timeout`` s pass): a crash mid-build."""
    import os
    import signal
    import subprocess
    import sys
    import time

    def run(preset: str, num: int, out, *, after: int, timeout: float, **kwargs) -> None:
        code = (
            "from loralens.zoo.builder import build_zoo; "
            f"build_zoo({preset!r}, {num}, {str(out)!r}, progress=False, threads=1, **{kwargs!r})"
        )
        proc = subprocess.Popen(
            [sys.executable, "-c", code], env=dict(os.environ), stderr=subprocess.DEVNULL
        )
        deadline = time.time() + timeout
        adir = out / "adapters"
        try:
            while time.time() < deadline and proc.poll() is None:
                done = (
                    [p for p in adir.iterdir() if not p.name.startswith(".")]
                    if adir.is_dir()
                    else []
                )
                if len(done) >= after:
                    break
                time.sleep(0.05)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()

    return run


@pytest.fixture
def file_snapshot():
    """``snap(root, under=None)``: (inode, mtime_ns, sha256) of every file below ``root`` (or
    below ``root/adapters/<id>`` for the ids in ``under``), so that a file rewritten, even with
    the same bytes, shows."""
    import hashlib
    from pathlib import Path

    def snap(root: Path, under: list[str] | None = None) -> dict[str, tuple[int, int, str]]:
        dirs = [root] if under is None else [root / "adapters" / a for a in under]
        out = {}
        for d in dirs:
            for p in sorted(d.rglob("*")):
                if p.is_file():
                    st = p.stat()
                    digest = hashlib.sha256(p.read_bytes()).hexdigest()
                    out[str(p.relative_to(root))] = (st.st_ino, st.st_mtime_ns, digest)
        return out

    return snap


class _Payload:
    """Unpickling this creates the file ``marker``: proof that a loader ran the pickle's code."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture
def plant_pickle():
    """``plant(path, marker)``: a torch-zip pickle at ``path`` (like an old cache's ``data.pt``)
    whose unpickling, by any loader that runs code, creates the file ``marker``."""
    import torch

    def plant(path, marker) -> None:
        torch.save({"images": _Payload(marker)}, path)

    return plant
