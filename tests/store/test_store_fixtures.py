"""Stores written by earlier versions of loralens still read with identical values."""

import json
import shutil
from pathlib import Path

import numpy as np
import torch

import loralens as ll
from helpers import store_items
from loralens.store import LoRAStore, write_store

DATA = Path(__file__).resolve().parents[1] / "data"


def test_version2_store_reads_exact_values():
    """tests/data/store-v2 was written by the store at git 651cf91 (format 2, before the store
    became a package): 6 LoRAs over 3 shards, mixed ranks including a rank-0 layer. The factors
    it was written from are in store-v2-expected.npz; every value must read back bit for bit."""
    store = LoRAStore(DATA / "store-v2")
    expected = np.load(DATA / "store-v2-expected.npz")
    assert store.ids == [f"a{k}" for k in range(6)]
    assert store.label_columns == ["y", "flag", "rank_label"]
    np.testing.assert_array_equal(
        store.labels(["y", "flag", "rank_label"])[:, 0], np.arange(6) * 0.25 - 1
    )
    np.testing.assert_array_equal(store.labels("rank_label").ravel(), np.arange(10, 16))
    assert store.ranks.tolist() == [
        [2, 3, 1],
        [4, 1, 2],
        [2, 3, 1],
        [0, 2, 1],
        [4, 1, 2],
        [2, 3, 1],
    ]
    for k in range(6):
        lora = store[k]
        assert lora.metadata["source"] == f"adapters/a{k}"
        for layer in lora.layers:
            np.testing.assert_array_equal(layer.U.numpy(), expected[f"a{k}.{layer.name}.U"])
            np.testing.assert_array_equal(layer.V.numpy(), expected[f"a{k}.{layer.name}.V"])
    batch = store.batch([5, 3, 1])
    for b, k in enumerate([5, 3, 1]):
        for i, name in enumerate(batch.names):
            U, V = expected[f"a{k}.{name}.U"], expected[f"a{k}.{name}.V"]
            r = U.shape[1]
            np.testing.assert_array_equal(batch.U[i][b, :, :r].numpy(), U)
            np.testing.assert_array_equal(batch.V[i][b, :, :r].numpy(), V)
            assert not batch.U[i][b, :, r:].any() and not batch.V[i][b, :, r:].any()


def test_version1_row_major_store_reads_and_appends(tmp_path):
    """tests/data/store-v1 was written by the store before factors went rank-major (5 LoRAs of
    store_items(5)); it must still read exactly, and an append must keep its layout."""
    old = tmp_path / "v1"
    shutil.copytree(DATA / "store-v1", old)
    items = store_items(7)
    store = LoRAStore(old)
    for k in range(5):
        for a, b in zip(store[k].layers, items[k][1].layers):
            assert torch.equal(a.U, b.U) and torch.equal(a.V, b.V)
    store = write_store(old, items[5:], append=True)
    assert json.loads((old / "store.json").read_text())["version"] == 1
    batch, ref = store.batch(list(range(7))), ll.collate([it[1] for it in items])
    for a, b in zip(batch.U + batch.V, ref.U + ref.V):
        assert torch.equal(a, b)
