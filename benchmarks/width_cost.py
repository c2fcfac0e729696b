"""What reading LoRAs through a basis costs at the shapes of real adapters (synthetic factors).

    python benchmarks/width_cost.py --shape llama7b --rank 16 --threads 2 [--json OUT]

For one adapter layout (``sdxl``: the 560 attention modules of an SDXL UNet LoRA, 640 and 1280
wide, cross-attention keys and values reading 2048; ``llama7b``: q_proj and v_proj of Llama-7B's
32 layers, 4096 x 4096; ``gpt3``: 96 layers of 12288 x 12288), in one process:

- the basis fitted on the sample ``train`` takes (``learn.fitting.basis_fit``: at most
  BASIS_REFERENCE LoRAs and BASIS_SAMPLE_BYTES of factors) of random factors: seconds, its
  size (features, bytes) and the energy it keeps (random factors spread over every direction:
  the least a zoo keeps);
- per LoRA: projecting its factors, the ``update`` linear base's features, and a GL-net's
  forward on the projected factors (ms, batch of 8);
- what a run folder holds: the bases, the linear base's weights (one target) and the network;
- the peak resident memory above the interpreter with its imports, and how it grows.

Everything is measured in this process, so the ratios are within one run.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

import loralens as ll
from loralens.learn.fitting.basis_fit import BASIS_REFERENCE, BASIS_SAMPLE_BYTES
from loralens.lora import LoRABatch
from loralens.models.basis import UpdateBasis, bases_bytes
from loralens.models.linear_base import feature_dim, linear_features, spectral_width


def layout(shape: str) -> list[tuple[str, tuple[int, int]]]:
    """(module name, (out, in)) of every layer of the named adapter layout."""
    if shape == "llama7b":
        return [
            (f"model.layers.{i}.self_attn.{m}_proj", (4096, 4096))
            for i in range(32)
            for m in ("q", "v")
        ]
    if shape == "gpt3":
        return [(f"h.{i}.attn", (12288, 12288)) for i in range(96)]
    if shape == "sdxl":
        blocks = [(640, 10), (1280, 60)]  # (channels, transformer blocks)
        out = []
        for c, n in blocks:
            for b in range(n):
                p = f"unet.c{c}.b{b}"
                out += [(f"{p}.attn1.to_{m}", (c, c)) for m in ("q", "k", "v", "out.0")]
                out += [(f"{p}.attn2.to_q", (c, c)), (f"{p}.attn2.to_out.0", (c, c))]
                out += [(f"{p}.attn2.to_{m}", (c, 2048)) for m in ("k", "v")]
        return out
    raise SystemExit(f"unknown shape {shape!r}")


def batch_of(layers, n: int, rank: int, seed: int) -> LoRABatch:
    g = torch.Generator().manual_seed(seed)
    return LoRABatch(
        names=[name for name, _ in layers],
        U=[torch.randn(n, rank, o, generator=g).mT * 1e-2 for _, (o, _) in layers],
        V=[torch.randn(n, rank, i, generator=g).mT for _, (_, i) in layers],
        ranks=torch.full((n, len(layers)), rank),
    )


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", required=True, choices=["sdxl", "llama7b", "gpt3"])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    layers = layout(a.shape)
    shapes = [s for _, s in layers]
    per_lora = 4 * sum((o + i) * a.rank for o, i in shapes)
    sample = max(16, min(BASIS_REFERENCE, BASIS_SAMPLE_BYTES // per_lora))
    start = peak_mib()
    train = batch_of(layers, sample, a.rank, 0)
    after_data = peak_mib()
    t = time.perf_counter()
    basis = UpdateBasis.fit(train, seed=0)
    fit_s = time.perf_counter() - t
    after_fit = peak_mib()
    del train
    new = batch_of(layers, 8, a.rank, 1)
    project_s = timed(lambda: basis.project(new)) / 8
    inner = basis.project(new)
    inner_spec = ll.LayerSpec(
        tuple(n for n, _ in layers), tuple(basis.sizes), (a.rank,) * len(layers)
    )
    k = spectral_width(inner_spec)
    feats_s = timed(lambda: linear_features(inner, "update", k)) / 8
    model = ll.build_model("glnet", like=new, out_dim=1, basis=basis, linear_base="update").eval()
    with torch.no_grad(), model.given_prepared():
        net_s = timed(lambda: model(inner)) / 8
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    result = {
        "shape": a.shape,
        "layers": len(layers),
        "widths": sorted({max(s) for s in shapes}),
        "rank": a.rank,
        "adapter_mib_float32": per_lora / 2**20,
        "basis_sample_loras": sample,
        "basis_fit_s": fit_s,
        "features": sum(x * y for x, y in basis.sizes),
        "side_limit": max(max(s) for s in basis.sizes),
        "energy_kept_random_factors": basis.energy(),
        "bases_mib": bases_bytes(basis) / 2**20,
        "update_base_features": feature_dim("update", inner_spec),
        "project_ms_per_lora": 1e3 * project_s,
        "update_features_ms_per_lora": 1e3 * feats_s,
        "glnet_forward_ms_per_lora": 1e3 * net_s,
        "run_model_mib": state_bytes / 2**20,
        "peak_mib_sample": after_data - start,
        "peak_mib_fit_over_sample": after_fit - after_data,
        "threads": a.threads,
    }
    print(json.dumps(result, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
