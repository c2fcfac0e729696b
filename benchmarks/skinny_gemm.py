"""Where GL-net and svals spend their time at GPT-3 widths: the skinny products on one layer.

    python benchmarks/skinny_gemm.py --width 12288 --rank 4 --hidden 8

Times (best CPU time of many calls, 1 thread) the per-layer operations of GL-net's forward and
of the svals featurizer on one rank-r factor of one LoRA, next to a plain sum over the same
bytes (the memory floor) and the same products through numpy's BLAS, to show how far torch's
CPU BLAS is from the floor on these shapes.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def best_cpu(fn, repeats: int = 50) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        c0 = time.process_time()
        fn()
        best = min(best, time.process_time() - c0)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--width", type=int, default=12288)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--hidden", type=int, default=8, help="GL-net's equivariant width")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    u = torch.randn(1, a.width, a.rank, generator=g)
    phi = torch.randn(a.hidden, a.width, generator=g)
    un, pn = u[0].numpy(), phi.numpy()
    rows = {
        "sum over U (memory floor, data in cache)": lambda: u.sum(),
        "U^T U, torch (delta_norms' Gram)": lambda: u.transpose(1, 2) @ u,
        "U^T U, numpy": lambda: un.T @ un,
        "Phi U, torch.matmul (GL-net's layer)": lambda: torch.matmul(phi, u),
        "Phi U, numpy": lambda: pn @ un,
        "QR of U, R only (svals)": lambda: torch.linalg.qr(u, mode="r"),
        "U transposed to column-major (inside QR)": lambda: u.mT.contiguous(),
    }
    nbytes = u.numel() * 4
    print(
        f"one U: {a.width} x {a.rank} float32 ({nbytes / 1024:.0f} KiB), Phi {a.hidden} x "
        f"{a.width}; torch {torch.__version__}, numpy {np.__version__}, {a.threads} thread(s)"
    )
    for name, fn in rows.items():
        t = best_cpu(fn)
        print(f"{name:45s} {t * 1e6:8.1f} us CPU")


if __name__ == "__main__":
    main()
