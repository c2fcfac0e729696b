"""Grams and projections of LoRA factors in one pass over their memory (C kernel, with a BLAS
fallback).

The big-model costs of loralens are U^T U (for norms and singular values) and Phi U (GL-net's
first layer), each a skinny product that reads a wide factor for a few FLOPs per byte. BLAS does
them in two passes, each packing its operands; ``fused.c`` does both from one read of U. It is
compiled with the system C compiler on first use and cached (``$LORALENS_CACHE/native``); where
there is no compiler, or ``LORALENS_NATIVE=0``, the same results come from torch's BLAS.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import os
import platform
import shutil
import stat
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from loralens.atomic import file_sha256, write_file_atomic
from loralens.cache import default_cache_dir
from loralens.errors import LoRALensWarning

#: Ranks and projection heights the kernel takes (its accumulators live on the C stack).
MAX_RANK = 32
MAX_HEIGHT = 64
#: Below this many factor entries per call, threads cost more than they save.
_THREAD_MIN_ENTRIES = 1 << 20

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def _cpu_fingerprint() -> str:
    """What -march=native depends on: the CPU's feature flags where Linux lists them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compile(src: Path, out: Path) -> None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise RuntimeError("no C compiler found (set CC, or install gcc or clang)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        so = Path(tmp) / out.name
        base = [cc, "-O3", "-fPIC", "-shared", "-o", str(so), str(src)]
        # -march=native where the compiler knows it, else its defaults.
        for flags in (["-march=native"], []):
            done = subprocess.run(base + flags, capture_output=True, text=True)
            if done.returncode == 0:
                os.replace(so, out)
                return
        raise RuntimeError(f"{cc} failed on {src}:\n{done.stderr.strip()}")


def _trusted(so: Path) -> bool:
    """Whether a cached kernel may be loaded: a regular file we own, in a folder we own, neither
    writable by every user, whose sha256 matches the one recorded when we compiled it. Loading a
    shared library runs its code, so anything else is compiled afresh, never loaded."""
    for path in (so.parent, so):
        st = os.lstat(path)
        if st.st_uid != os.getuid() or st.st_mode & 0o002:
            return False
    if not stat.S_ISREG(os.lstat(so).st_mode):
        return False
    record = so.with_suffix(".sha256")
    return record.is_file() and record.read_text().strip() == file_sha256(so)[1]


def kernel_path(src: Path) -> Path:
    """Where the kernel compiled from ``src`` for this CPU is cached."""
    key = hashlib.sha256(
        src.read_bytes() + _cpu_fingerprint().encode() + platform.machine().encode()
    ).hexdigest()[:16]
    return default_cache_dir() / "native" / f"fused-{key}.so"


def _load() -> ctypes.CDLL | None:
    """The compiled kernel, or None (no compiler, disabled, or it failed: warned once)."""
    global _lib, _tried
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if os.environ.get("LORALENS_NATIVE", "1") == "0":
            return None
        try:
            src = resources.files("loralens") / "fused.c"
            with resources.as_file(src) as path:
                so = kernel_path(path)
                if not (so.exists() and _trusted(so)):
                    _compile(path, so)
                    write_file_atomic(
                        so.with_suffix(".sha256"), file_sha256(so)[1].encode(), replace=True
                    )
                    if not _trusted(so):
                        raise RuntimeError(
                            f"{so.parent} is writable by every user: not loading code from it"
                        )
            lib = ctypes.CDLL(str(so))
            fn = lib.loralens_gram_project
            fn.restype = None
            fn.argtypes = [ctypes.c_void_p, ctypes.c_int64]
            _lib = lib
        except (OSError, RuntimeError) as e:
            warnings.warn(
                f"loralens: the fused C kernel is unavailable ({e}); using torch's BLAS, "
                "about 2x slower on wide LoRAs. LORALENS_NATIVE=0 silences this.",
                LoRALensWarning,
                stacklevel=3,
            )
        return _lib


def available() -> bool:
    """Whether the C kernel is compiled and loaded (compiles it on the first call)."""
    return _load() is not None


def linalg_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype linear algebra on factors runs in: float64 for float64 input, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fits(f: torch.Tensor, p: torch.Tensor | None) -> bool:
    """Whether the kernel takes the (B, K, r) factor ``f`` (and (h, K) matrix ``p``): float32 on
    CPU, each of the r columns contiguous (rank-major storage), no gradient through ``f``."""
    _, K, r = f.shape
    return (
        f.device.type == "cpu"
        and f.dtype == torch.float32
        and not f.requires_grad
        and 0 < r <= MAX_RANK
        and K > 0
        and f.stride(1) == 1
        and (r == 1 or f.stride(2) == K)
        and (
            p is None
            or (p.dtype == torch.float32 and p.is_contiguous() and 0 < p.shape[0] <= MAX_HEIGHT)
        )
    )


def _jobs(
    layers: Sequence[int],
    factors: Sequence[torch.Tensor],
    mats: Sequence[torch.Tensor | None],
    grams: torch.Tensor,
    projs: Sequence[torch.Tensor | None],
    threads: int,
) -> list[list[int]]:
    """Rows of ``loralens_job`` (fused.c) for the given layers; with fewer layers than threads,
    each layer's batch is split so that every thread has work."""
    B = grams.shape[0]
    parts = max(1, min(B, -(-2 * threads // max(len(layers), 1))))
    cuts = [B * t // parts for t in range(parts + 1)]
    gsb, gsl, gld = grams.stride(0), grams.stride(1), grams.stride(2)
    rows = []
    for i in layers:
        f, p, q = factors[i], mats[i], projs[i]
        _, K, r = f.shape
        h = 0 if p is None else int(p.shape[0])
        for lo, hi in itertools.pairwise(cuts):
            if hi > lo:
                rows.append(
                    [
                        f.data_ptr() + 4 * lo * f.stride(0),
                        hi - lo,
                        r,
                        K,
                        f.stride(0),
                        0 if p is None else p.data_ptr(),
                        h,
                        grams.data_ptr() + 8 * (lo * gsb + i * gsl),
                        gsb,
                        gld,
                        0 if q is None else q.data_ptr() + 4 * lo * h * r,
                    ]
                )
    return rows


def _call(rows: list[list[int]], threads: int) -> None:
    """Run the jobs, split over ``threads`` Python threads (ctypes drops the GIL in the call)."""
    global _pool, _pool_size
    fn = _lib.loralens_gram_project  # type: ignore[union-attr]
    tables = [np.array(rows[t::threads], dtype=np.int64) for t in range(threads)]
    tables = [t for t in tables if len(t)]
    if len(tables) == 1:
        fn(tables[0].ctypes.data, len(tables[0]))
        return
    with _lock:
        if _pool is None or _pool_size < len(tables):
            _pool = ThreadPoolExecutor(len(tables), thread_name_prefix="loralens-fused")
            _pool_size = len(tables)
    list(_pool.map(lambda t: fn(t.ctypes.data, len(t)), tables))


def _compute(
    factors: Sequence[torch.Tensor], mats: Sequence[torch.Tensor | None]
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """(B, L, R, R) float64 Grams (zero-padded to the widest rank R) and the products
    mats[i] @ factors[i]: the kernel for the layers it takes, torch's BLAS for the rest."""
    B = int(factors[0].shape[0])
    R = max([int(f.shape[2]) for f in factors] + [1])
    grams = torch.zeros(B, len(factors), R, R, dtype=torch.float64, device=factors[0].device)
    projs: list[torch.Tensor | None] = [None] * len(factors)
    fast = [i for i, (f, p) in enumerate(zip(factors, mats)) if _fits(f, p)]
    if fast and B and available():
        for i in fast:
            if mats[i] is not None:
                projs[i] = torch.empty(B, mats[i].shape[0], factors[i].shape[2])  # type: ignore[union-attr]
        entries = sum(factors[i].numel() for i in fast)
        threads = torch.get_num_threads() if entries >= _THREAD_MIN_ENTRIES else 1
        _call(_jobs(fast, factors, mats, grams, projs, threads), threads)
    else:
        fast = []
    for i in sorted(set(range(len(factors))) - set(fast)):
        f, p = factors[i], mats[i]
        fw = f.to(linalg_dtype(f.dtype))
        r = f.shape[2]
        grams[:, i, :r, :r] = fw.mT @ fw
        projs[i] = None if p is None else torch.matmul(p, f)
    return grams, projs


class _GramsAndProjections(torch.autograd.Function):
    """:func:`grams_and_projections` as one autograd node: differentiable in the matrices."""

    @staticmethod
    def forward(ctx, n: int, *tensors: torch.Tensor):  # type: ignore[override]
        factors, mats = tensors[:n], tensors[n:]
        ctx.save_for_backward(*factors)
        grams, projs = _compute(factors, [p.detach() for p in mats])
        ctx.mark_non_differentiable(grams)
        return (grams, *projs)

    @staticmethod
    def backward(ctx, _grad_grams: torch.Tensor, *grad_projs: torch.Tensor):  # type: ignore[override]
        factors = ctx.saved_tensors
        grads = [torch.einsum("bhr,bkr->hk", g, f) for g, f in zip(grad_projs, factors)]
        return (None, *(None for _ in factors), *grads)


def grams(factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The Grams f^T f of a list of (B, K_i, r_i) factor batches (one per layer), as one
    (B, L, R, R) float64 stack zero-padded to the widest rank R. Float32 at least."""
    return _compute(factors, [None] * len(factors))[0]


def grams_and_projections(
    factors: Sequence[torch.Tensor], mats: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """:func:`grams` and, per layer, mats[i] @ factors[i] as (B, h_i, r_i), from one read of
    each factor where the kernel applies. Differentiable in ``mats`` (the factors are data;
    a factor that needs a gradient sends every layer through torch)."""
    if any(f.requires_grad for f in factors):
        projs = [torch.matmul(p, f) for p, f in zip(mats, factors)]
        return _compute([f.detach() for f in factors], [None] * len(factors))[0], projs
    grams_, *projs = _GramsAndProjections.apply(len(factors), *factors, *mats)
    return grams_, projs
