"""Writing a store: new or appended, atomic, layouts checked."""

import numpy as np
import pytest

from helpers import store_items, store_lora
from loralens.store import LoRAStore, StoreError, StoreWriter, write_store


def test_append_and_mismatch_refused(tmp_path):
    write_store(tmp_path / "s", store_items(4))
    store = write_store(
        tmp_path / "s", [("b0", store_lora([1, 1, 1], 99), {"y": 9.0})], append=True
    )
    assert len(store) == 5 and store.ids[-1] == "b0"
    assert np.isnan(store.labels("flag")[-1, 0])
    other = store_lora([1, 1], 5, shapes=((6, 5), (3, 3)))
    with pytest.raises(StoreError, match="do not fit"):
        write_store(tmp_path / "s", [("bad", other, {})], append=True)
    assert len(LoRAStore(tmp_path / "s")) == 5
    with pytest.raises(StoreError, match="duplicate"):
        write_store(tmp_path / "s", [("a1", store_lora([1, 1, 1], 1), {})], append=True)


def test_failed_writes_leave_nothing_and_keep_the_old_store(tmp_path):
    def boom():
        yield from store_items(3)
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        write_store(tmp_path / "new", boom(), shard_bytes=100)
    assert not (tmp_path / "new").exists()
    assert [p.name for p in tmp_path.iterdir()] == []

    write_store(tmp_path / "s", store_items(4))
    before = sorted(p.name for p in (tmp_path / "s").iterdir())
    index_bytes = (tmp_path / "s" / "index.parquet").read_bytes()
    with (
        pytest.raises(RuntimeError),
        StoreWriter.append_to(tmp_path / "s", shard_bytes=100) as w,
    ):
        for k in range(3):
            w.add(store_lora([1, 1, 1], 50 + k), id=f"new{k}")
        raise RuntimeError("killed")
    assert sorted(p.name for p in (tmp_path / "s").iterdir() if p.name != ".lock") == before
    assert (tmp_path / "s" / "index.parquet").read_bytes() == index_bytes
    assert len(LoRAStore(tmp_path / "s")) == 4
    with pytest.raises(StoreError, match="already a store"):
        write_store(tmp_path / "s", store_items(1))


def test_create_append_and_open_modes(tmp_path):
    with pytest.raises(StoreError, match="not a loralens store"):
        StoreWriter.append_to(tmp_path / "none")
    with pytest.raises(StoreError, match="dtype must be one of"):
        StoreWriter.create(tmp_path / "s", dtype="int8")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(StoreError, match="not an empty directory"):
        StoreWriter.create(tmp_path / "full")

    with StoreWriter.open(tmp_path / "s", append=True, dtype="float16") as w:  # no store yet
        assert not w.appending and w.names is None
        w.add(store_lora([2, 2, 2], 0), id="a")
        assert w.names == ["blk.0", "blk.1", "blk.2"] and len(w) == 1
    with StoreWriter.open(tmp_path / "s", append=True) as w:
        assert w.appending and w.dtype == "float16" and w.shapes == [(6, 5), (4, 7), (6, 5)]
        with pytest.raises(StoreError, match="already fixed"):
            w.set_layout(["x"], [(1, 1)])
        w.add(store_lora([1, 1, 1], 1), id="b")
    store = LoRAStore(tmp_path / "s")
    assert store.ids == ["a", "b"] and len(store.info["history"]) == 2

    store = write_store(tmp_path / "s", store_items(2), overwrite=True)
    assert store.ids == ["a0", "a1"] and len(store.info["history"]) == 1


def test_layout_set_before_adding_refuses_other_layers(tmp_path):
    w = StoreWriter.create(tmp_path / "s")
    w.set_layout(["blk.0"], [(6, 5)])
    assert "unexpected layers: blk.1, blk.2" in w.mismatch(store_lora([1, 1, 1], 0))
    with pytest.raises(StoreError, match="do not fit"):
        w.add(store_lora([1, 1, 1], 0), id="a")
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_an_adapter_whose_reading_fails_midway_leaves_nothing_behind(tmp_path):
    """add() takes an open reader's layers one at a time; a layer the reader refuses (NaN)
    after others were written drops the whole adapter, and the next one is stored intact."""
    import torch

    import loralens as ll

    bad = store_lora([2, 2, 2], 1)
    bad.layers[2].U[0, 0] = torch.nan
    ll.save_lora(bad, tmp_path / "bad")
    good = store_lora([2, 2, 2], 2)
    with StoreWriter.create(tmp_path / "s", shard_bytes=10**9) as w:
        with ll.open_lora(tmp_path / "bad") as reader, pytest.raises(ll.LoRAFormatError):
            w.add(reader, id="bad")
        w.add(good, id="good")
    store = LoRAStore(tmp_path / "s")
    assert store.ids == ["good"]
    (back,) = store.batch([0]).unbatch()
    for got, want in zip(back.layers, good.layers):
        torch.testing.assert_close(got.U, want.U)
        torch.testing.assert_close(got.V, want.V)
