"""The shapes timed (the GPT-3 family, tiny ones for the smoke test) and synthetic LoRA batches
of those shapes."""

from __future__ import annotations

import torch

from loralens.lora import LoRABatch

# (label, layers, width): the GPT-3 family as timed in the paper (Brown et al. 2020, table 2.1;
# 5140 is the paper's width for 13B).
GPT3_SHAPES: tuple[tuple[str, int, int], ...] = (
    ("125M", 12, 768),
    ("350M", 24, 1024),
    ("760M", 24, 1536),
    ("1.3B", 24, 2048),
    ("2.7B", 32, 2560),
    ("6.7B", 32, 4096),
    ("13B", 40, 5140),
    ("175B", 96, 12288),
)
QUICK_SHAPES: tuple[tuple[str, int, int], ...] = (("tiny-a", 2, 48), ("tiny-b", 3, 64))


def parse_shape(text: str) -> tuple[str, int, int]:
    """A GPT-3 label ("175B") or "LAYERSxWIDTH" ("12x768") -> (label, layers, width)."""
    for shape in GPT3_SHAPES + QUICK_SHAPES:
        if shape[0].lower() == text.lower():
            return shape
    try:
        layers, width = (int(x) for x in text.lower().split("x"))
    except ValueError:
        labels = ", ".join(s[0] for s in GPT3_SHAPES)
        raise ValueError(f"shape {text!r}: use one of {labels} or LAYERSxWIDTH") from None
    return (text, layers, width)


def synthetic_batch(
    layers: int,
    width: int,
    *,
    batch_size: int,
    rank: int = 4,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> LoRABatch:
    """``batch_size`` random rank-``rank`` LoRAs, one (width x width) attention matrix per layer.

    Scales as PEFT leaves them after training: U ~ 1e-2 N(0, 1), V ~ N(0, 1 / width).
    """
    g = torch.Generator().manual_seed(seed)
    U, V = [], []
    for _ in range(layers):
        # rank-major, as collate() and the store lay factors out
        u = torch.randn(batch_size, rank, width, generator=g).mul_(1e-2).mT
        v = torch.randn(batch_size, rank, width, generator=g).mul_(width**-0.5).mT
        U.append(u.to(device=device, dtype=dtype))
        V.append(v.to(device=device, dtype=dtype))
    names = [f"h.{i}.attn.q_proj" for i in range(layers)]
    ranks = torch.full((batch_size, layers), rank, dtype=torch.long, device=device)
    return LoRABatch(names=names, U=U, V=V, ranks=ranks)
