"""Reading a store: exact round trip, batches equal to collate, padding, dtypes, layout."""

import json

import numpy as np
import pytest
import torch

import loralens as ll
from helpers import store_items, store_lora
from loralens.store import LoRAStore, StoreError, write_store


def test_round_trip_mixed_ranks_exact(tmp_path):
    items = store_items(11)
    store = write_store(tmp_path / "s", items, shard_bytes=400)  # several shards
    assert len(store) == 11 and len(list((tmp_path / "s").glob("weights-*.safetensors"))) > 1
    assert store.ids == [i for i, _, _ in items]
    assert store.label_columns == ["y", "flag"]
    for k, (_, lora, _) in enumerate(items):
        got = store[k]
        assert got.names == lora.names and got.ranks == lora.ranks
        for a, b in zip(got.layers, lora.layers):
            assert torch.equal(a.U, b.U) and torch.equal(a.V, b.V)
    rows = [7, 0, 3, 10, 1]
    batch, ref = store.batch(rows), ll.collate([items[r][1] for r in rows])
    assert batch.names == ref.names and torch.equal(batch.ranks, ref.ranks)
    for a, b in zip(batch.U + batch.V, ref.U + ref.V):
        assert torch.equal(a, b)
    np.testing.assert_array_equal(store.labels("y").ravel(), [k * 0.5 for k in range(11)])
    assert store.row_of("a7") == 7
    info = json.loads((tmp_path / "s" / "store.json").read_text())
    assert info["layers"][1] == {"name": "blk.1", "out": 4, "in": 7}
    assert set(store.index.columns) >= {"id", "source", "rank", "shapes_key", "y", "flag"}


def test_uniform_batches_and_padding_to_model_ranks(tmp_path):
    items = store_items(6, ranks=lambda k: [2, 2, 2])
    store = write_store(tmp_path / "s", items)
    seen = []
    for rows, batch in store.iter_batches(4, shuffle=True, seed=1):
        seen += rows.tolist()
        ref = ll.collate([items[r][1] for r in rows])
        for a, b in zip(batch.U, ref.U):
            assert torch.equal(a, b)
    assert sorted(seen) == list(range(6))
    plain = store.batch([0, 1])
    padded = store.batch([0, 1], pad_ranks=[4, 4, 4])
    assert [u.shape[2] for u in padded.U] == [4, 4, 4]
    for a, b in zip(padded.U + padded.V, plain.U + plain.V):
        assert torch.equal(a[:, :, :2], b) and not a[:, :, 2:].any()
    # pad_ranks is a floor: a layer wider than the model's ranks keeps its own width
    assert [u.shape[2] for u in store.batch([0], pad_ranks=[1, 3, 2]).U] == [2, 3, 2]


def test_mixed_rank_batch_padded_beyond_its_own_width(tmp_path):
    items = store_items(5)
    store = write_store(tmp_path / "s", items, shard_bytes=400)
    batch = store.batch([4, 0, 2], pad_ranks=[6, 6, 6])
    ref = ll.collate([items[r][1] for r in [4, 0, 2]]).pad_to([6, 6, 6])
    for a, b in zip(batch.U + batch.V, ref.U + ref.V):
        assert torch.equal(a, b)


def test_float16_store(tmp_path):
    items = store_items(40)
    store = write_store(tmp_path / "s", items, dtype="float16")
    got = store[1]
    assert got.layers[0].U.dtype == torch.float32
    assert torch.allclose(got.layers[0].U, items[1][1].layers[0].U, atol=1e-2, rtol=1e-3)
    half = sum(p.stat().st_size for p in (tmp_path / "s").glob("weights-*"))
    full = write_store(tmp_path / "f", items).nbytes
    assert half < 0.6 * full


def test_truncated_shard_is_reported(tmp_path):
    write_store(tmp_path / "s", store_items(3))
    shard = next((tmp_path / "s").glob("weights-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-16])
    with pytest.raises(StoreError, match="outside the file"):
        LoRAStore(tmp_path / "s").batch([0])


def test_factors_are_rank_major_in_stores_and_collate(tmp_path):
    items = store_items(4, ranks=lambda k: [2, 2, 2])
    store = write_store(tmp_path / "s", items)
    for batch in (store.batch([0, 1, 2]), ll.collate([it[1] for it in items])):
        for f in batch.U + batch.V:
            assert f.stride(1) == 1 and f.stride(2) == f.shape[1]  # U^T contiguous per LoRA
    assert json.loads((tmp_path / "s" / "store.json").read_text())["version"] == 2


def test_a_rank_zero_layer_reads_alone_and_in_a_batch(tmp_path):
    items = [("z", store_lora([0, 2, 1], 3), {}), ("a", store_lora([1, 2, 1], 4), {})]
    store = write_store(tmp_path / "s", items)
    assert store[0].ranks == [0, 2, 1]
    batch = store.batch([0, 1])
    assert batch.ranks.tolist() == [[0, 2, 1], [1, 2, 1]] and not batch.U[0][0].any()


def test_a_store_pickles_as_its_path_and_options(tmp_path):
    import pickle

    store = write_store(tmp_path / "s", store_items(3), dtype="float16")
    copy = pickle.loads(pickle.dumps(LoRAStore(tmp_path / "s", verify="quick")))
    assert copy.path == store.path and copy.verify == "quick" and copy.ids == store.ids
    assert torch.equal(copy.batch([2]).U[0], store.batch([2]).U[0])
