"""``ll.resize`` (QR of the factors + SVD of an r x r core) against kohya's resize route (SVD of the
dense delta W), for speed and error, at shapes of real LoRAs.

    PYTHONPATH=src python3 benchmarks/resize_bench.py            # all shapes
    PYTHONPATH=src python3 benchmarks/resize_bench.py --quick    # small shapes only

Each layer's factors are random with a decaying spectrum (U's columns scaled by 0.9^i), as
trained LoRAs have. Times are the best CPU time of ``--repeats`` calls on 1 thread (the dense
route once per shape above 10^7 entries); kohya's script runs the dense SVD in float32 on CPU,
so the dense route does too. Both results are compared with the true delta W in float64 through
their factors (|A - B|_F from r x r Grams), next to the Eckart-Young optimum: the root-sum-square
of the dropped singular values.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from loralens.lora import LoRALayer
from loralens.resize import resize_layer

#: (what, out, in, rank, new rank)
SHAPES = [
    ("SDXL attn 640x640", 640, 640, 32, 8),
    ("SDXL attn2.to_k 1280x2048", 1280, 2048, 32, 8),
    ("SDXL ff.net.0.proj 10240x1280", 10240, 1280, 32, 8),
    ("SDXL conv 1280x(1280*3*3)", 1280, 11520, 16, 4),
    ("LLM/Flux attention 4096x4096", 4096, 4096, 64, 16),
    ("Flux single linear1 21504x3072", 21504, 3072, 16, 4),
]
QUICK = 3  # --quick: the first three shapes


def best_cpu(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        c0 = time.process_time()
        out = fn()
        best = min(best, time.process_time() - c0)
    return best, out


def fro_diff(U1, V1, U2, V2) -> float:
    """|U1 V1^T - U2 V2^T|_F in float64 without forming either product."""
    U = torch.cat([U1.double(), -U2.double()], 1)
    V = torch.cat([V1.double(), V2.double()], 1)
    return float(((U.T @ U) * (V.T @ V)).sum().clamp(min=0).sqrt())


def dense_resize(U: torch.Tensor, V: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """kohya's route: form delta W (float32), SVD it, keep k."""
    P, s, Qh = torch.linalg.svd(U @ V.T, full_matrices=False)
    root = s[:k].sqrt()
    return P[:, :k] * root, Qh[:k].T * root


def bench(what: str, out: int, inp: int, r: int, k: int, repeats: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    decay = 0.9 ** torch.arange(r, dtype=torch.float32)
    U = torch.randn(out, r, generator=g) * decay / r**0.5
    V = torch.randn(inp, r, generator=g) / inp**0.5
    layer = LoRALayer("m", U, V)
    t_factor, (small, row) = best_cpu(lambda: resize_layer(layer, rank=k), repeats)
    dense_repeats = 1 if out * inp > 10**7 else repeats
    t_dense, (Ud, Vd) = best_cpu(lambda: dense_resize(U, V, k), dense_repeats)
    return {
        "what": what,
        "shape": [out, inp],
        "rank": r,
        "new_rank": k,
        "factor_s": t_factor,
        "dense_s": t_dense,
        "speedup": t_dense / t_factor,
        "optimal_error": row["error"],
        "factor_error": fro_diff(U, V, small.U, small.V),
        "dense_error": fro_diff(U, V, Ud, Vd),
        "fro_norm": row["fro_norm"],
    }


HEADER = (
    "| layer | rank | factor route | dense SVD (kohya) | speedup | rel. error: optimal / factor / dense |\n"
    "|---|---|---|---|---|---|"
)


def markdown_row(r: dict) -> str:
    rel = [r[k] / r["fro_norm"] for k in ("optimal_error", "factor_error", "dense_error")]
    return (
        f"| {r['what']} | {r['rank']} -> {r['new_rank']} | {r['factor_s'] * 1e3:.1f} ms | "
        f"{r['dense_s'] * 1e3:.0f} ms | **{r['speedup']:.0f}x** | "
        + " / ".join(f"{x:.6f}" for x in rel)
        + " |"
    )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="the three smallest shapes only")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="one JSON object per line, not a table")
    a = p.parse_args()
    torch.set_num_threads(1)
    shapes = SHAPES[:QUICK] if a.quick else SHAPES
    if not a.json:
        print(HEADER, flush=True)
    for i, shape in enumerate(shapes):  # a row as soon as it is measured
        row = bench(*shape, repeats=a.repeats, seed=a.seed + i)
        print(json.dumps(row) if a.json else markdown_row(row), flush=True)


if __name__ == "__main__":
    main()
