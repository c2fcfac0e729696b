"""Helpers shared by several test files (tests/ is on sys.path through tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

import loralens as ll

#: Delta-W shapes (out, in) of the small three-layer LoRAs the store tests use.
STORE_SHAPES = ((6, 5), (4, 7), (6, 5))


def random_lora(
    ranks, shapes, seed=0, dtype=torch.float64, scale=1e-2, v_scale=None, prefix="l"
) -> ll.LoRA:
    """A random LoRA with layers <prefix>0, <prefix>1, ...: U ~ scale N(0, 1), V ~ v_scale N(0, 1)
    (default: scale), drawn from ``seed`` layer by layer (U, then V)."""
    g = torch.Generator().manual_seed(seed)
    v_scale = scale if v_scale is None else v_scale
    return ll.LoRA(
        layers=[
            ll.LoRALayer(
                f"{prefix}{i}",
                torch.randn(o, r, generator=g, dtype=dtype) * scale,
                torch.randn(n, r, generator=g, dtype=dtype) * v_scale,
            )
            for i, ((o, n), r) in enumerate(zip(shapes, ranks))
        ]
    )


def store_lora(
    ranks: Sequence[int], seed: int, shapes: Sequence[tuple[int, int]] = STORE_SHAPES
) -> ll.LoRA:
    """A float32 LoRA with layers ``blk.<i>`` of these shapes, unit-scale factors from ``seed``."""
    return random_lora(ranks, shapes, seed, dtype=torch.float32, scale=1.0, prefix="blk.")


def store_items(
    n: int, ranks: Callable[[int], Sequence[int]] = lambda k: [2, 3, 1] if k % 3 else [4, 1, 2]
) -> list[tuple[str, ll.LoRA, dict]]:
    """``n`` (id, LoRA, labels) items for ``write_store``: ids a<k>, labels y = k/2, flag = k%2.

    tests/data/store-v1 holds the first five of these: keep the draws as they are."""
    return [(f"a{k}", store_lora(ranks(k), k), {"y": k * 0.5, "flag": k % 2}) for k in range(n)]


def seeded_randn(*shape, seed=0, dtype=torch.float32) -> torch.Tensor:
    """N(0, 1) entries drawn in float32 from ``seed``, then cast to ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def assert_close_f32(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal to float32 round-off (rtol 1e-5, atol 1e-6)."""
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
