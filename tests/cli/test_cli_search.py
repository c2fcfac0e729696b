"""`loralens embed`, `index` and `search` from the command line: files, JSON, exit codes."""

from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

import loralens as ll
from helpers import store_items, store_lora
from loralens.cli import app
from loralens.store import LoRAStore, write_store

runner = CliRunner()


def test_index_then_search_prints_json_neighbours_with_labels(tmp_path):
    store = write_store(tmp_path / "s", store_items(24)).path
    idx = tmp_path / "idx"
    res = runner.invoke(app, ["index", "--unsupervised", "--data", str(store), "--out", str(idx)])
    assert res.exit_code == 0, res.output
    assert "indexed 24 LoRAs" in res.stdout and "exact" in res.stdout
    query = tmp_path / "a5"
    ll.save_lora(LoRAStore(store)[5], query)
    res = runner.invoke(app, ["search", str(idx), str(query), "-k", "4", "--json"])
    assert res.exit_code == 0, res.output
    (hit,) = json.loads(res.stdout)
    assert hit["query"] == str(query) and len(hit["neighbors"]) == 4
    first = hit["neighbors"][0]
    assert first["adapter"] == "a5" and first["distance"] < 1e-3
    assert first["y"] == 2.5 and first["flag"] == 1
    table = runner.invoke(app, ["search", str(idx), str(query)], env={"COLUMNS": "200"})
    assert table.exit_code == 0 and "a5" in table.stdout


def test_search_exits_1_on_another_layout_and_2_without_run_or_unsupervised(tmp_path):
    store = write_store(tmp_path / "s", store_items(12)).path
    idx = tmp_path / "idx"
    runner.invoke(app, ["index", "--unsupervised", "--data", str(store), "--out", str(idx)])
    other = tmp_path / "other"
    ll.save_lora(store_lora([2, 2], 0, shapes=((6, 5), (4, 7))), other)
    res = runner.invoke(app, ["search", str(idx), str(other)])
    assert res.exit_code == 1 and "does not fit" in res.output
    res = runner.invoke(app, ["index", "--data", str(store), "--out", str(tmp_path / "i2")])
    assert res.exit_code == 2
    res = runner.invoke(app, ["index", "--unsupervised", "--data", str(store), "--out", str(idx)])
    assert res.exit_code == 3


def test_embed_writes_npy_and_its_rows(tmp_path):
    store = write_store(tmp_path / "s", store_items(12)).path
    out = tmp_path / "emb.npy"
    res = runner.invoke(app, ["embed", "--unsupervised", "--data", str(store), "--out", str(out)])
    assert res.exit_code == 0, res.output
    x = np.load(out, allow_pickle=False)
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert x.shape[0] == 12 and rows[0] == "a0"
    one = tmp_path / "a3"
    ll.save_lora(LoRAStore(store)[3], one)
    res = runner.invoke(
        app, ["embed", "--unsupervised", str(one), "--out", str(tmp_path / "o.npy")]
    )
    assert res.exit_code == 0, res.output
    assert np.allclose(np.load(tmp_path / "o.npy")[0], x[3], atol=1e-5)
    assert runner.invoke(app, ["embed", "--data", str(store), "--out", str(out)]).exit_code == 2
