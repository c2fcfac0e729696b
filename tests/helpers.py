"""Helpers shared by several test files (tests/ is on sys.path through tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

import loralens as ll

#: Delta-W shapes (out, in) of the small three-layer LoRAs the store tests use.
STORE_SHAPES = ((6, 5), (4, 7), (6, 5))


def random_lora(
    ranks: Sequence[int], seed: int, shapes: Sequence[tuple[int, int]] = STORE_SHAPES
) -> ll.LoRA:
    """A LoRA with layers ``blk.<i>`` of these shapes and ranks, factors drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    layers = [
        ll.LoRALayer(f"blk.{i}", torch.randn(o, r, generator=g), torch.randn(n, r, generator=g))
        for i, ((o, n), r) in enumerate(zip(shapes, ranks))
    ]
    return ll.LoRA(layers=layers)


def store_items(
    n: int, ranks: Callable[[int], Sequence[int]] = lambda k: [2, 3, 1] if k % 3 else [4, 1, 2]
) -> list[tuple[str, ll.LoRA, dict]]:
    """``n`` (id, LoRA, labels) items for ``write_store``: ids a<k>, labels y = k/2, flag = k%2.

    tests/data/store-v1 holds the first five of these: keep the draws as they are."""
    return [(f"a{k}", random_lora(ranks(k), k), {"y": k * 0.5, "flag": k % 2}) for k in range(n)]
