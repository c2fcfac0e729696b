"""What reading a LoHa costs on each side of the exact reduction: SDXL-sized layers (1280 x 1280)
at r = 32 (r^2 = 1024 <= 1280: face-splitting factors, rank 1024) and r = 40 (r^2 = 1600 > 1280:
delta W formed, rank 1280; refused before issue 15).

    python benchmarks/lycoris_reduction.py OUT_DIR --layers 8 --width 1280 --ranks 32 40 --seed 0

prints, per rank, the rank read, the reduction recorded, and the best of 3 wall times of
``ll.load_lora`` and ``ll.inspect_adapter``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def write_loha(path: Path, layers: int, width: int, rank: int, seed: int) -> None:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    t = {}
    for i in range(layers):
        m = f"lora_unet_mid_block_attentions_0_transformer_blocks_{i}_attn1_to_q"
        for role, shape in (
            ("hada_w1_a", (width, rank)),
            ("hada_w1_b", (rank, width)),
            ("hada_w2_a", (width, rank)),
            ("hada_w2_b", (rank, width)),
        ):
            t[f"{m}.{role}"] = torch.randn(shape, generator=g) * 0.05
        t[f"{m}.alpha"] = torch.tensor(float(rank))
    save_file(t, path)


def best_of(fn, n: int = 3) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    import loralens as ll

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--ranks", type=int, nargs="+", default=[32, 40])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for r in args.ranks:
        path = args.out / f"loha_r{r}.safetensors"
        write_loha(path, args.layers, args.width, r, args.seed)
        layer = ll.load_lora(path).layers[0]
        load = best_of(lambda path=path: ll.load_lora(path))
        inspect = best_of(lambda path=path: ll.inspect_adapter(path))
        print(
            f"r={r}: rank read {layer.rank}, reduction {layer.meta.get('exact_reduction')}, "
            f"load_lora {load:.2f} s, inspect {inspect:.2f} s ({args.layers} layers)"
        )


if __name__ == "__main__":
    main()
