"""A/B of GL-net's per-layer input scaling: dividing U and V by s before the first equivariant
layer (the earlier code) vs dividing that layer's small outputs (the current code).

    python benchmarks/glnet_scale_ab.py --shapes 13B,175B --batch-sizes 1,32

Both variants run in the same process on the same model and batch, interleaved, best of
``--reps`` rounds each, so the ratio survives a machine shared with other work. Prints wall and
CPU time per LoRA and checks that the outputs agree.
"""

from __future__ import annotations

import argparse
import time

import torch

import loralens as ll
from loralens.models.base import EPS, layer_rms
from loralens.models.glnet import GLNet
from speedbench.shapes import parse_shape, synthetic_batch


def scale_inputs(self: GLNet, batch: ll.LoRABatch):
    """The earlier ``GLNet._equivariant``: every U and V copied, divided by s, then Phi, Psi."""
    rms = layer_rms(batch).to(batch.dtype)
    s = rms.clamp_min(EPS).sqrt()
    Us = [u / s[:, k, None, None] for k, u in enumerate(batch.U)]
    Vs = [v / s[:, k, None, None] for k, v in enumerate(batch.V)]
    for layer in self.equivariant:
        Us, Vs = layer(Us, Vs)
    return Us, Vs, rms


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--shapes", default="13B,175B")
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    current = GLNet._equivariant
    variants = {"inputs scaled (before)": scale_inputs, "outputs scaled (now)": current}
    for label in a.shapes.split(","):
        _, layers, width = parse_shape(label)
        for B in (int(b) for b in a.batch_sizes.split(",")):
            batch = synthetic_batch(layers, width, batch_size=B)
            torch.manual_seed(0)
            model = ll.build_model("glnet", like=batch, out_dim=1).eval()
            wall: dict[str, float] = {}
            cpu: dict[str, float] = {}
            outs = {}
            with torch.inference_mode():
                for _ in range(a.reps):
                    for name, fn in variants.items():
                        GLNet._equivariant = fn
                        c0, t0 = time.process_time(), time.perf_counter()
                        outs[name] = model(batch)
                        wall[name] = min(wall.get(name, 1e9), time.perf_counter() - t0)
                        cpu[name] = min(cpu.get(name, 1e9), time.process_time() - c0)
            GLNet._equivariant = current
            before, now = outs.values()
            diff = float((before - now).abs().max())
            b, n = variants
            print(
                f"{label} ({layers} x {width}), batch {B}: per LoRA, wall / CPU ms: "
                f"{b} {wall[b] / B * 1e3:.1f} / {cpu[b] / B * 1e3:.1f}, "
                f"{n} {wall[n] / B * 1e3:.1f} / {cpu[n] / B * 1e3:.1f}; "
                f"speed-up {wall[b] / wall[n]:.2f}x wall, {cpu[b] / cpu[n]:.2f}x CPU; "
                f"max |output diff| {diff:.1e}",
                flush=True,
            )


if __name__ == "__main__":
    main()
