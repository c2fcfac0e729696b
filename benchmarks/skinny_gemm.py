"""Where GL-net and svals spend their time at GPT-3 widths: the skinny products on one layer.

    python benchmarks/skinny_gemm.py --width 12288 --rank 4 --hidden 8

Times (best CPU time of many calls, 1 thread) the per-layer operations of GL-net's forward and
of the svals featurizer on one rank-r factor of one LoRA, next to a plain sum over the same
bytes (the memory floor) and the same products through numpy's BLAS, on both layouts of the
factor: row-major U (n x r, how PEFT stores lora_B) and rank-major U (U^T contiguous, how
``ll.collate`` and the store lay factors out since format v2).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from loralens import fused


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
    p.add_argument("--cold-layers", type=int, default=48, help="layers of the cold-data part")
    p.add_argument("--batch", type=int, default=32, help="LoRAs per layer in the cold-data part")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    u = torch.randn(1, a.width, a.rank, generator=g)
    ur = u.mT.contiguous().mT  # the same values, rank-major
    phi = torch.randn(a.hidden, a.width, generator=g)
    un, pn = u[0].numpy(), phi.numpy()
    rows = {
        "sum over U (memory floor, data in cache)": lambda: u.sum(),
        "U^T U, torch, row-major": lambda: u.transpose(1, 2) @ u,
        "U^T U, torch, rank-major (delta_norms, svals)": lambda: ur.transpose(1, 2) @ ur,
        "U^T U, numpy, row-major": lambda: un.T @ un,
        "Phi U, torch, row-major": lambda: torch.matmul(phi, u),
        "Phi U, torch, rank-major (GL-net's layer)": lambda: torch.matmul(phi, ur),
        "Phi U, numpy, row-major": lambda: pn @ un,
        "QR of U, R only, row-major": lambda: torch.linalg.qr(u, mode="r"),
        "QR of U, R only, rank-major (svals fallback)": lambda: torch.linalg.qr(ur, mode="r"),
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
    cold(a)


def cold(a: argparse.Namespace) -> None:
    """GL-net's first layer as it meets a batch: many layers' rank-major factors, cold in DRAM."""
    B, r, d = a.batch, a.rank, a.width
    g = torch.Generator().manual_seed(1)
    U = [torch.randn(B, r, d, generator=g).mT for _ in range(a.cold_layers)]
    P = [torch.randn(a.hidden, d, generator=g) for _ in range(a.cold_layers)]

    def per_layer(*ops):
        def run():
            for p, u in zip(P, U):
                for op in ops:
                    op(p, u)

        return run

    gram = lambda p, u: u.mT @ u  # noqa: E731
    rows = {
        "read (sum)": per_layer(lambda p, u: u.sum()),
        "U^T U": per_layer(gram),
        "Phi U, matmul": per_layer(lambda p, u: torch.matmul(p, u)),
        "Phi U, bmm with Phi broadcast": per_layer(lambda p, u: torch.bmm(p.expand(B, -1, -1), u)),
        "Phi U as Phi @ (U^T)^T, one GEMM": per_layer(lambda p, u: p @ u.mT.reshape(B * r, d).T),
        "Phi U then U^T U, per layer": per_layer(lambda p, u: torch.matmul(p, u), gram),
        "[Phi; U^T] U, one bmm per layer": per_layer(
            lambda p, u: torch.bmm(torch.cat([p.expand(B, -1, -1), u.mT], 1), u)
        ),
        # loralens.fused: what features.svals and GL-net's first layer run, all layers in one call
        "fused kernel: U^T U": lambda: fused.grams(U),
        "fused kernel: U^T U and Phi U, one read": lambda: fused.grams_and_projections(U, P),
    }
    print(f"fused C kernel available: {fused.available()}")
    print(
        f"\ncold: {a.cold_layers} layers x {B} LoRAs of {d} x {r} rank-major factors "
        f"({a.cold_layers * B * d * r * 4 / 2**20:.0f} MiB), CPU us per LoRA-factor, best of 3"
    )
    for name, fn in rows.items():
        t = best_cpu(fn, repeats=3)
        print(f"{name:45s} {t * 1e6 / (B * a.cold_layers):8.1f} us CPU")


if __name__ == "__main__":
    main()
