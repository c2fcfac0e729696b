"""Helpers shared by several test files (tests/ is on sys.path through tests/conftest.py)."""

from __future__ import annotations

import torch

import loralens as ll


def random_lora(ranks, shapes, seed=0, dtype=torch.float64, scale=1e-2, v_scale=None) -> ll.LoRA:
    """A random LoRA with layers l0, l1, ...: U ~ scale N(0, 1), V ~ v_scale N(0, 1) (default:
    scale), drawn from ``seed`` layer by layer."""
    g = torch.Generator().manual_seed(seed)
    v_scale = scale if v_scale is None else v_scale
    return ll.LoRA(
        layers=[
            ll.LoRALayer(
                f"l{i}",
                torch.randn(o, r, generator=g, dtype=dtype) * scale,
                torch.randn(n, r, generator=g, dtype=dtype) * v_scale,
            )
            for i, ((o, n), r) in enumerate(zip(shapes, ranks))
        ]
    )


def seeded_randn(*shape, seed=0, dtype=torch.float32) -> torch.Tensor:
    """N(0, 1) entries drawn in float32 from ``seed``, then cast to ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def assert_close_f32(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal to float32 round-off (rtol 1e-5, atol 1e-6)."""
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
