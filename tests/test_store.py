"""The packed store: exact round trip, batches equal to collate, atomic writes and appends."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import loralens as ll
from loralens.store import LoRAStore, StoreError, StoreWriter, write_store

SHAPES = ((6, 5), (4, 7), (6, 5))


def _lora(ranks, seed, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    layers = [
        ll.LoRALayer(f"blk.{i}", torch.randn(o, r, generator=g), torch.randn(n, r, generator=g))
        for i, ((o, n), r) in enumerate(zip(shapes, ranks))
    ]
    return ll.LoRA(layers=layers)


def _items(n, ranks=lambda k: [2, 3, 1] if k % 3 else [4, 1, 2]):
    return [(f"a{k}", _lora(ranks(k), k), {"y": k * 0.5, "flag": k % 2}) for k in range(n)]


def test_round_trip_mixed_ranks_exact(tmp_path):
    items = _items(11)
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
    info = json.loads((tmp_path / "s" / "store.json").read_text())
    assert info["layers"][1] == {"name": "blk.1", "out": 4, "in": 7}
    assert set(store.index.columns) >= {"id", "source", "rank", "shapes_key", "y", "flag"}


def test_uniform_batches_and_padding_to_model_ranks(tmp_path):
    items = _items(6, ranks=lambda k: [2, 2, 2])
    store = write_store(tmp_path / "s", items)
    seen = []
    for rows, batch in store.iter_batches(4, shuffle=True, seed=1):
        seen += rows.tolist()
        ref = ll.collate([items[r][1] for r in rows])
        for a, b in zip(batch.U, ref.U):
            assert torch.equal(a, b)
    assert sorted(seen) == list(range(6))
    padded = store.batch([0, 1], pad_ranks=[4, 4, 4])
    assert [u.shape[2] for u in padded.U] == [4, 4, 4]
    assert torch.allclose(padded.delta_weights()[0], store.batch([0, 1]).delta_weights()[0])


def test_float16_store(tmp_path):
    items = _items(40)
    store = write_store(tmp_path / "s", items, dtype="float16")
    got = store[1]
    assert got.layers[0].U.dtype == torch.float32
    assert torch.allclose(got.layers[0].U, items[1][1].layers[0].U, atol=1e-2, rtol=1e-3)
    half = sum(p.stat().st_size for p in (tmp_path / "s").glob("weights-*"))
    full = write_store(tmp_path / "f", items).nbytes
    assert half < 0.6 * full


def test_append_and_mismatch_refused(tmp_path):
    write_store(tmp_path / "s", _items(4))
    store = write_store(tmp_path / "s", [("b0", _lora([1, 1, 1], 99), {"y": 9.0})], append=True)
    assert len(store) == 5 and store.ids[-1] == "b0"
    assert np.isnan(store.labels("flag")[-1, 0])
    other = _lora([1, 1], 5, shapes=((6, 5), (3, 3)))
    with pytest.raises(StoreError, match="do not fit"):
        write_store(tmp_path / "s", [("bad", other, {})], append=True)
    assert len(LoRAStore(tmp_path / "s")) == 5
    with pytest.raises(StoreError, match="duplicate"):
        write_store(tmp_path / "s", [("a1", _lora([1, 1, 1], 1), {})], append=True)


def test_failed_writes_leave_nothing_and_keep_the_old_store(tmp_path):
    def boom():
        yield from _items(3)
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        write_store(tmp_path / "new", boom(), shard_bytes=100)
    assert not (tmp_path / "new").exists()
    assert [p.name for p in tmp_path.iterdir()] == []

    write_store(tmp_path / "s", _items(4))
    before = sorted(p.name for p in (tmp_path / "s").iterdir())
    index_bytes = (tmp_path / "s" / "index.parquet").read_bytes()
    with (
        pytest.raises(RuntimeError),
        StoreWriter(tmp_path / "s", append=True, shard_bytes=100) as w,
    ):
        for k in range(3):
            w.add(_lora([1, 1, 1], 50 + k), id=f"new{k}")
        raise RuntimeError("killed")
    assert sorted(p.name for p in (tmp_path / "s").iterdir() if p.name != ".lock") == before
    assert (tmp_path / "s" / "index.parquet").read_bytes() == index_bytes
    assert len(LoRAStore(tmp_path / "s")) == 4
    with pytest.raises(StoreError, match="already a store"):
        write_store(tmp_path / "s", _items(1))


def test_truncated_shard_is_reported(tmp_path):
    write_store(tmp_path / "s", _items(3))
    shard = next((tmp_path / "s").glob("weights-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-16])
    with pytest.raises(StoreError, match="outside the file"):
        LoRAStore(tmp_path / "s").batch([0])


def test_labels_csv_keeps_adapter_names_as_text(tmp_path):
    from loralens.store import read_labels

    (tmp_path / "labels.csv").write_text("adapter,y\n000017,1.5\n000002,2.0\n")
    assert read_labels(tmp_path / "labels.csv")["adapter"].tolist() == ["000017", "000002"]


def test_factors_are_rank_major_in_stores_and_collate(tmp_path):
    items = _items(4, ranks=lambda k: [2, 2, 2])
    store = write_store(tmp_path / "s", items)
    for batch in (store.batch([0, 1, 2]), ll.collate([it[1] for it in items])):
        for f in batch.U + batch.V:
            assert f.stride(1) == 1 and f.stride(2) == f.shape[1]  # U^T contiguous per LoRA
    assert json.loads((tmp_path / "s" / "store.json").read_text())["version"] == 2


def test_version1_row_major_store_reads_and_appends(tmp_path):
    """tests/data/store-v1 was written by the store before factors went rank-major (5 LoRAs of
    _items(5)); it must still read exactly, and an append must keep its layout."""
    import shutil

    old = tmp_path / "v1"
    shutil.copytree(Path(__file__).parent / "data" / "store-v1", old)
    items = _items(7)
    store = LoRAStore(old)
    for k in range(5):
        for a, b in zip(store[k].layers, items[k][1].layers):
            assert torch.equal(a.U, b.U) and torch.equal(a.V, b.V)
    store = write_store(old, items[5:], append=True)
    assert json.loads((old / "store.json").read_text())["version"] == 1
    batch, ref = store.batch(list(range(7))), ll.collate([it[1] for it in items])
    for a, b in zip(batch.U + batch.V, ref.U + ref.V):
        assert torch.equal(a, b)
