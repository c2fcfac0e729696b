"""Smoke test of benchmarks/lol_anchor.py without a LoL checkout: the store rows it hands the
reference GL-net are the right LoRAs, in their (B, A.T) pair format, with the right labels."""

import numpy as np
import torch

import loralens as ll
from lol_anchor import Data, labelled
from loralens.store import write_store

SHAPES = ((6, 5), (4, 7))


def _tiny_store(path):
    """Ten two-layer LoRAs of ranks 1-3 (mixed across layers), label y = k, row 3 unlabelled."""
    items = []
    for k in range(10):
        g = torch.Generator().manual_seed(k)
        ranks = (1 + k % 3, 1 + (k + 1) % 3)
        layers = [
            ll.LoRALayer(f"blk.{i}", torch.randn(o, r, generator=g), torch.randn(n, r, generator=g))
            for i, ((o, n), r) in enumerate(zip(SHAPES, ranks))
        ]
        items.append((f"a{k}", ll.LoRA(layers=layers), {"y": np.nan if k == 3 else float(k)}))
    return write_store(path, items), [lora for _, lora, _ in items]


def test_pairs_are_each_rows_factors_padded_with_zeros_and_its_label(tmp_path):
    store, loras = _tiny_store(tmp_path / "s")
    rows = labelled(store, "y", "rank >= 1")
    assert rows.tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 9]  # the unlabelled row is left out
    data = Data(store, "y", rows, pad=np.array([4, 4]))
    picked = rows[::-1][:5]  # any order of store rows, not the order loaded
    pairs, y = data.take(picked)
    assert y.ravel().tolist() == [float(r) for r in picked]
    for (u, v), (o, n) in zip(pairs, SHAPES):
        assert u.shape == (5, o, 4) and v.shape == (5, n, 4) and u.dtype == torch.float32
    for b, r in enumerate(picked):
        for (u, v), layer in zip(pairs, loras[r].layers):
            true = layer.U.shape[1]
            torch.testing.assert_close(u[b] @ v[b].T, layer.U @ layer.V.T)
            assert not u[b, :, true:].any() and not v[b, :, true:].any()


def test_loader_reads_every_row_once_in_a_seeded_order_and_shifts_labels(tmp_path):
    store, _ = _tiny_store(tmp_path / "s")
    rows = labelled(store, "y", None)
    data = Data(store, "y", rows, pad=store.ranks.max(axis=0))

    def epoch(seed, norm=(0.0, 1.0)):
        return [float(x) for _, y in data.loader(rows, 4, seed, norm) for x in y.ravel()]

    first = epoch(0)
    assert sorted(first) == [float(r) for r in rows]
    assert epoch(0) == first and epoch(1) != first
    assert epoch(None) == [float(r) for r in rows]  # unseeded: in order
    assert epoch(None, (2.0, 4.0)) == [(r - 2) / 4 for r in rows]  # --standardize
