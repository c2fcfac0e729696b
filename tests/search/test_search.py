"""Embeddings and nearest-adapter search: round trips, layouts refused, runs that changed."""

import sys
import warnings

import numpy as np
import pytest
import torch

import loralens as ll
from helpers import random_lora
from loralens.errors import LoRALensWarning, OutputExistsError
from loralens.learn.training.config import TrainConfig
from loralens.learn.training.loop import train
from loralens.search.embed import (
    UPDATE_DIM,
    Embedder,
    count_sketch,
    embed,
    save_embeddings,
    unit_rows,
)
from loralens.search.index import (
    SearchIndexError,
    build_index,
    exact_knn,
    load_index,
    recall_at_k,
    search,
    verify_index,
)
from loralens.store import write_store


@pytest.fixture(scope="module")
def store(make_store, tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("s") / "store", n=40, ranks=(2, 3))


@pytest.fixture(scope="module")
def run(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("r") / "run"
    train(store, TrainConfig(model="w2t", targets=["y"], epochs=2, plots=False), out)
    return out


def _adapters(store, rows, folder):
    paths = []
    for r in rows:
        path = folder / store.ids[r]
        ll.save_lora(store[r], path)
        paths.append(str(path))
    return paths


@pytest.mark.parametrize("kind", ["unsupervised", "run"])
def test_each_lora_finds_itself_first_at_distance_zero(kind, store, run, tmp_path):
    build_index(store, tmp_path / "idx", run=run if kind == "run" else None)
    rows = [0, 7, 33]
    result = search(tmp_path / "idx", _adapters(store, rows, tmp_path), k=3)
    for r, hit in zip(rows, result):
        first = hit["neighbors"][0]
        assert first["adapter"] == store.ids[r]
        assert first["distance"] < 1e-3
        assert first["y"] == pytest.approx(store.labels("y")[r, 0])
        assert hit["neighbors"][1]["distance"] > 10 * first["distance"]
        assert len(hit["neighbors"]) == 3


def test_search_refuses_an_adapter_of_another_layout(store, tmp_path):
    build_index(store, tmp_path / "idx")
    other = tmp_path / "other"
    lora = random_lora([2, 2], ((12, 10), (6, 9)), 0, torch.float32)
    ll.save_lora(
        ll.LoRA(
            layers=[ll.LoRALayer(f"h.{i}.attn", la.U, la.V) for i, la in enumerate(lora.layers)]
        ),
        other,
    )
    with pytest.raises(SearchIndexError, match=r"does not fit.*shape mismatch.*built from"):
        search(tmp_path / "idx", [str(other)])


def test_an_index_of_a_run_retrained_since_is_refused(store, tmp_path):
    run = tmp_path / "run"
    cfg = TrainConfig(model="mlp-svd", targets=["y"], epochs=2, plots=False)
    train(store, cfg, run)
    build_index(store, tmp_path / "idx", run=run)
    assert load_index(tmp_path / "idx").meta["embedding"]["model"] == "mlp-svd"
    train(
        store,
        TrainConfig(model="mlp-svd", targets=["y"], epochs=3, seed=1, plots=False),
        run,
        overwrite=True,
    )
    with pytest.raises(SearchIndexError, match="checkpoint has changed since"):
        load_index(tmp_path / "idx")


def test_approximate_index_records_its_recall_and_checks_its_graph(store, tmp_path):
    pytest.importorskip("hnswlib")
    meta = build_index(store, tmp_path / "idx", approximate=True)
    assert meta["backend"] == "hnsw" and meta["recall_at_10_vs_exact"] >= 0.9
    index = load_index(tmp_path / "idx")
    assert index.graph is not None
    q = index.vectors[:5] * index.std + index.mean
    assert index.nearest(q, 1)[1][:, 0].tolist() == [0, 1, 2, 3, 4]
    graph = tmp_path / "idx" / "hnsw.bin"
    graph.write_bytes(b"\0" * graph.stat().st_size)
    with pytest.raises(SearchIndexError, match=r"hnsw.bin: its sha256 differs"):
        load_index(tmp_path / "idx")
    graph.write_bytes(b"\0" * 64)
    with pytest.raises(SearchIndexError, match=r"hnsw.bin: 64 bytes, but index.json records"):
        load_index(tmp_path / "idx")


def test_exact_search_needs_no_hnswlib(store, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "hnswlib", None)  # import fails
    assert build_index(store, tmp_path / "idx")["backend"] == "exact"
    with pytest.raises(ValueError, match=r"loralens\[search\]"):
        build_index(store, tmp_path / "idx2", approximate=True)
    with pytest.raises(OutputExistsError):
        build_index(store, tmp_path / "idx")


def test_exact_knn_orders_by_distance_then_row():
    base = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [3.0, 3.0]])
    dist, rows = exact_knn(base, np.array([[0.0, 0.0]]), 3)
    assert rows.tolist() == [[0, 1, 2]] and np.allclose(dist, [[0, 1, 1]])
    tied = np.array([[0.0, 0.0], [0.0, -1.0], [-1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [3.0, 3.0]])
    assert exact_knn(tied, np.array([[0.0, 0.0]]), 3)[1].tolist() == [[0, 1, 2]]
    assert recall_at_k(np.array([[0, 1], [2, 3]]), np.array([[0, 1], [2, 0]])) == 0.75


def test_embeddings_saved_as_npy_with_their_rows(store, run, tmp_path):
    names, vectors, desc = embed(run=run, data=store)
    model = Embedder.of_run(run).run.model
    width = sum(a * b for a, b in model.inner.shapes) + model.out_dim
    assert names == store.ids and vectors.shape == (40, width) and desc["model"] == "w2t"
    direct = Embedder.of_run(run).store(store)
    assert np.array_equal(vectors, direct)
    side = save_embeddings(tmp_path / "e.npy", names, vectors, desc)
    assert np.array_equal(np.load(tmp_path / "e.npy", allow_pickle=False), vectors)
    assert '"rows"' in side.read_text()
    with pytest.raises(OutputExistsError):
        save_embeddings(tmp_path / "e.npy", names, vectors, desc)
    names, spectral, desc = embed(data=store)
    assert spectral.shape == (40, 2 * (3 + 1)) and desc == {"kind": "unsupervised", "k": 3}


def test_a_runs_embedding_is_the_cosine_on_its_updates_plus_its_predictions(store, run):
    """Whatever the run kept (its network, or its linear base alone), its embedding of a LoRA
    is the update's direction in the run's basis, then what it predicts: distances between the
    first parts are those of the cosine on the flattened ΔW (to 1e-5), the rest is the run's
    standardized prediction."""
    from loralens.learn.runs.folder import load_run

    loaded = load_run(run)
    rows = np.arange(6)
    dense = torch.cat([w.flatten(1) for w in store.batch(rows).delta_weights()], dim=1).double()
    unit = (dense / dense.norm(dim=1, keepdim=True)).numpy()
    for gate in (1.0, 0.0):  # 0: what early stopping at epoch 0 saves
        with torch.no_grad():
            loaded.model.gate.fill_(gate)
        with warnings.catch_warnings():
            warnings.simplefilter("error", LoRALensWarning)
            vectors = Embedder.of_run(loaded).store(store, rows).astype(np.float64)
        d = sum(a * b for a, b in loaded.model.inner.shapes)
        want = ((unit[:, None, :] - unit[None, :, :]) ** 2).sum(-1)
        got = ((vectors[:, None, :d] - vectors[None, :, :d]) ** 2).sum(-1)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
        z = loaded.raw(store.batch(rows))  # the standardized prediction, before clipping
        np.testing.assert_allclose(vectors[:, d:], z / np.sqrt(z.shape[1]), rtol=0, atol=1e-4)


def test_a_long_update_is_count_sketched_keeping_its_cosines():
    """Past UPDATE_DIM coordinates a run's update part is count-sketched: the cosines between
    200 random unit vectors of 50,000 coordinates move by about 1/sqrt(UPDATE_DIM) (the
    sketch's spread), never by more than 6 times it, and one length always gets one sketch."""
    g = torch.Generator().manual_seed(0)
    x = unit_rows(torch.randn(200, 50_000, generator=g, dtype=torch.float64))
    x[1] = unit_rows(x[0:1] + 0.5 * x[1:2])[0]  # one pair far from orthogonal
    sketched = unit_rows(count_sketch(x, UPDATE_DIM))
    err = (sketched @ sketched.T - x @ x.T).numpy()
    spread = 1 / np.sqrt(UPDATE_DIM)
    assert 0.5 * spread < err.std() < 1.5 * spread and np.abs(err).max() < 6 * spread
    torch.testing.assert_close(count_sketch(x[:3], UPDATE_DIM), count_sketch(x, UPDATE_DIM)[:3])


def test_an_index_of_a_run_only_centers_its_vectors(store, run, tmp_path):
    build_index(store, tmp_path / "idx", run=run)
    index = load_index(tmp_path / "idx")
    assert np.all(index.std == 1.0) and abs(float(index.vectors.mean())) < 1e-5
    build_index(store, tmp_path / "spectral")
    assert not np.all(load_index(tmp_path / "spectral").std == 1.0)


def test_overwrite_replaces_an_index_and_nothing_else(store, tmp_path):
    out = tmp_path / "idx"
    build_index(store, out)
    before = load_index(out).meta["files"]
    build_index(store, out, overwrite=True, approximate=False)
    assert load_index(out).meta["files"] == before  # the same bytes, written anew
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="is not a loralens index: --overwrite replaces"):
        build_index(store, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no temp folder left


def test_verify_index_checks_what_search_relies_on(store, tmp_path):
    build_index(store, tmp_path / "idx")
    found = verify_index(tmp_path / "idx")
    assert (found["n"], found["backend"], found["embedding"]["kind"]) == (
        40,
        "exact",
        "unsupervised",
    )
    record = tmp_path / "idx" / "index.json"
    record.write_text(record.read_text().replace('"version":2', '"version":1'))
    with pytest.raises(SearchIndexError, match=r"index.json: made by an older loralens.*rebuild"):
        verify_index(tmp_path / "idx")


def test_a_store_whose_ids_leave_it_cannot_be_indexed(tmp_path):
    lora = random_lora([2, 2], ((12, 10), (6, 10)), 0, torch.float32)
    bad = write_store(tmp_path / "s", [("../up", lora, {"y": 1.0})])
    with pytest.raises(SearchIndexError, match=r"cannot index .*id '../up' is not the name"):
        build_index(bad, tmp_path / "idx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_embeddings_replace_only_their_own_files(store, tmp_path):
    names, vectors, desc = embed(data=store)
    out = tmp_path / "e.npy"
    save_embeddings(out, names, vectors, desc)
    save_embeddings(out, names[:1], vectors[:1], desc, overwrite=True)
    assert np.load(out).shape == (1, vectors.shape[1])
    (tmp_path / "e.json").write_text('{"mine": 1}')
    with pytest.raises(OutputExistsError, match=r"e\.json exists and is not an embedding's rows"):
        save_embeddings(out, names, vectors, desc, overwrite=True)
    assert np.load(out).shape == (1, vectors.shape[1])  # refused before anything was written
