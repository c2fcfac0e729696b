"""Smoke test of the speed harness (benchmarks/speed.py --quick): it runs end to end on tiny
shapes and its output has the schema BENCHMARKS.md is written from. No timing is asserted."""

import json
import math
import runpy
import sys
from pathlib import Path

import pytest
import torch

from speedbench.harness import Config, run
from speedbench.measure import Floors
from speedbench.models import MODELS, bench_model
from speedbench.report import to_markdown
from speedbench.shapes import synthetic_batch

SCRIPT = Path(__file__).resolve().with_name("speed.py")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    work = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    res = run(Config.quick(work_dir=str(work)), log=lambda s: None)
    assert torch.get_num_threads() == threads  # the harness restores what it changed
    return res


def _pos(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_floors_and_machine(result):
    f = result["floors"]
    assert _pos(f["read_gbps"]) and _pos(f["copy_gbps"]) and _pos(f["matmul_gflops"])
    assert result["machine"]["cores"] >= 1 and result["machine"]["torch"] == torch.__version__


def test_every_model_shape_and_batch_size_has_a_row(result):
    rows = result["models"]
    cfg = Config.quick()
    got = {(r["shape"], r["batch_size"], r["model"]) for r in rows}
    want = {(s[0], b, m) for s in cfg.shapes for b in cfg.batch_sizes for m in MODELS}
    assert got == want
    for r in rows:
        assert r["status"] == "ok", r
        assert _pos(r["forward_s"]) and _pos(r["forward_floor_s"]) and _pos(r["forward_x_floor"])
        assert _pos(r["forward_bytes"]) and r["forward_flops"] >= 0
        assert r["peak_mib"] >= 0 and r["peak_method"]
        assert (r["featurizer"] is None) == (r["model"] == "glnet")
        assert (r["featurizer"] == "canonical") == (r["model"] == "w2t")
        if r["featurizer"]:
            assert _pos(r["featurize_s"]) and _pos(r["featurize_x_floor"])


def test_mlp_dense_refusal_is_a_row_not_a_crash():
    batch = synthetic_batch(2, 48, batch_size=1)
    floors = Floors(10.0, 10.0, 100.0, 1, 1)
    row = bench_model(
        "mlp-dense",
        batch,
        floors,
        shape=("tiny", 2, 48),
        hparams={"max_gib": 1e-6},
        collect=False,
    )
    assert row.status == "refused"
    assert "GiB" in row.note and row.forward_s is None


def test_svals_qr_matches_dense(result):
    for r in result["svals"]:
        assert _pos(r["qr_s"]) and _pos(r["dense_s"]) and _pos(r["ratio"])
        assert r["max_rel_err"] < 1e-4


def test_store_and_train(result):
    rows = result["store"]["rows"]
    assert {(r["source"].split()[0], r["cache"]) for r in rows} == {
        ("PEFT", "cold"),
        ("PEFT", "warm"),
        ("packed", "cold"),
        ("packed", "warm"),
    }
    for r in rows:
        assert r["loras"] == 40 and _pos(r["loras_per_s"]) and _pos(r["gb_per_s"])
    assert all(_pos(r["speedup"]) for r in rows if r["source"].startswith("packed"))
    train = result["train"]
    assert [r["model"] for r in train] == list(MODELS)
    for r in train:
        assert r["status"] == "ok" and _pos(r["loras_per_s"]) and r["loader_share"] > 0


def test_markdown_and_json_are_written(result, tmp_path):
    md = to_markdown(result)
    for heading in ("Floors measured", "Batch size 1:", "factor route", "page cache", "LoRAs/s"):
        assert heading in md
    json.dumps(result)  # JSON-able as it stands


def test_script_help_runs(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["speed.py", "--help"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "--quick" in out and "--device" in out and "--parts" in out
