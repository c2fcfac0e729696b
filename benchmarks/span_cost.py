"""Cost of the fit check's span score (issue 16) on synthetic layers: fitting the bases on a
sample of training LoRAs, the 5 out-of-fold bases, and scoring the sample, per layer.

    python benchmarks/span_cost.py [--threads 1]

Layouts: six 144 x 48 layers at rank 4 (a gpt2-dev-like LoRA), two 4096 x 4096 layers at
rank 8, and a 64-layer 4096-wide LoRA at rank 8 (two of its layers timed: every layer costs the
same). The sample size is what calibration uses (``span_sample_size``).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from loralens.learn.trust.span import Span, fit_out_of_fold, span_sample_size
from loralens.lora import LoRABatch
from loralens.models.basis import side_factors

LAYOUTS = {
    "6 x (144 x 48), rank 4": ([(144, 48)] * 6, 4),
    "2 x (4096 x 4096), rank 8": ([(4096, 4096)] * 2, 8),
    "64 x (4096 x 4096), rank 8": ([(4096, 4096)] * 64, 8),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for name, (shapes, r) in LAYOUTS.items():
        n = span_sample_size(shapes, [r] * len(shapes))
        timed = shapes[:2] if len(shapes) > 8 else shapes
        g = torch.Generator().manual_seed(0)
        u = [torch.randn(n, o, r, generator=g) for o, _ in timed]
        v = [torch.randn(n, i, r, generator=g) for _, i in timed]
        batch = LoRABatch(
            names=[str(k) for k in range(len(timed))],
            U=u,
            V=v,
            ranks=torch.full((n, len(timed)), r),
        )
        t0 = time.perf_counter()
        factors = side_factors([batch])
        span = Span.fit(factors)
        fit_out_of_fold(factors, np.arange(n) % 5)
        span.scores(batch)
        per_layer = (time.perf_counter() - t0) / len(timed)
        print(f"{name}: {n} LoRAs sampled, {per_layer:.3f} s per layer")


if __name__ == "__main__":
    main()
