"""screen_adapter: the inspect rows and predict rows unchanged (one code path), flags, the
base-model guess, intervals, and a run the adapter does not fit."""

from __future__ import annotations

import math

import pytest
import torch
from serve_support import LAYERS, lora, peft

import loralens as ll
from loralens.inspection import inspect_adapter
from loralens.learn.runs.folder import load_run
from loralens.learn.runs.prediction import predict
from loralens.screening import (
    SPECTRUM,
    guess_base_model,
    layer_flags,
    load_screening_runs,
    screen_adapter,
)


@pytest.fixture(scope="module")
def screening_runs(runs):
    return load_screening_runs([runs["reg"], runs["cls"]])


def test_report_holds_inspect_rows_and_predict_rows(tmp_path, runs, screening_runs):
    path = peft(tmp_path / "a", seed=7)
    report = screen_adapter(path, screening_runs)
    inspected = inspect_adapter(path, top=SPECTRUM)
    for key in ("format", "base_model", "num_layers", "ranks", "adapter_params", "layers"):
        assert report[key] == inspected[key], key
    assert report["path"] == str(path)
    reg, cls = report["predictions"]
    assert (reg["run"], cls["run"]) == ("reg", "cls")
    for entry, run in ((reg, runs["reg"]), (cls, runs["cls"])):
        row = predict(load_run(run), [path])[0]
        assert entry["prediction"] == pytest.approx(row["prediction"])
        assert entry.get("label") == row.get("label")
    assert cls["task"] == "classification" and 0 <= cls["prediction"]["c"] <= 1
    assert reg["targets"] == ["y", "z"] and reg["interval_level"] == 0.9
    assert report["flags"] == [] and report["seconds"] > 0


def test_screening_gives_the_runs_own_interval_and_fit_check(tmp_path, runs, screening_runs):
    path = peft(tmp_path / "a", seed=3)
    entry = screen_adapter(path, screening_runs)["predictions"][0]
    row = load_run(runs["reg"]).predict(path)[0]
    assert entry["interval"].keys() == row["interval"].keys()
    for target, bounds in row["interval"].items():
        assert entry["interval"][target] == pytest.approx(bounds), target
    assert entry["ood_score"] == pytest.approx(row["ood_score"])
    assert entry["in_distribution"] == row["in_distribution"]


def test_a_run_the_adapter_does_not_fit_says_so(tmp_path, screening_runs):
    path = tmp_path / "wide"
    ll.save_lora(lora(seed=1, width=16), path)
    report = screen_adapter(path, screening_runs, name="wide-upload")
    assert report["path"] == "wide-upload"
    for entry in report["predictions"]:
        assert "prediction" not in entry
        assert "does not fit" in entry["error"] and "wide-upload" in entry["error"]
        assert str(tmp_path) not in entry["error"]


def test_unreadable_file_raises_with_the_shown_name(tmp_path, screening_runs):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(ll.LoRAFormatError) as info:
        screen_adapter(path, screening_runs, name="mine.safetensors")
    assert str(info.value).startswith("mine.safetensors:")
    assert str(tmp_path) not in str(info.value)


def _report(layers) -> dict:
    return {"layers": layers, "base_model": None}


def _layers(**overrides):
    """Six healthy rows with |dW| 1, then the overrides (name -> row fields)."""
    rows = {
        f"l{k}": {
            "name": f"l{k}",
            "rank": 2,
            "finite": True,
            "fro_norm": 1.0,
            "top_svals": [0.8, 0.6],
        }
        for k in range(6)
    }
    for name, fields in overrides.items():
        rows[name] = {**rows[name], **fields}
    return list(rows.values())


def _kinds(rows) -> dict[str, list[str]]:
    return {f["kind"]: f["layers"] for f in layer_flags(rows)}


def test_flags_nonfinite_dead_collapsed_outlier():
    assert _kinds(_layers()) == {}
    assert _kinds(_layers(l0={"finite": False, "fro_norm": None})) == {"nonfinite": ["l0"]}
    assert _kinds(_layers(l1={"fro_norm": math.inf})) == {"nonfinite": ["l1"]}
    assert _kinds(_layers(l2={"fro_norm": 0.0, "top_svals": [0.0, 0.0]})) == {"dead": ["l2"]}
    assert _kinds(_layers(l3={"top_svals": [1.0, 1e-6]})) == {"collapsed": ["l3"]}
    assert _kinds(_layers(l4={"fro_norm": 1e3, "top_svals": [900.0, 400.0]})) == {"outlier": ["l4"]}
    assert _kinds(_layers(l4={"fro_norm": 50.0, "top_svals": [40.0, 30.0]})) == {}
    dead = layer_flags(_layers(**{f"l{k}": {"fro_norm": 0.0} for k in range(6)}))
    assert dead[0]["kind"] == "dead" and "changes nothing" in dead[0]["message"]


def test_flags_on_a_real_adapter_with_a_dead_and_a_collapsed_layer(tmp_path, screening_runs):
    la = lora(seed=2, rank=2)
    q, v = la.layers
    q.U.zero_()
    v.U[:, 1] = 0
    path = tmp_path / "broken"
    ll.save_lora(la, path)
    report = screen_adapter(path, screening_runs)
    assert {f["kind"]: f["layers"] for f in report["flags"]} == {
        "dead": [LAYERS[0]],
        "collapsed": [LAYERS[1]],
    }


def test_nonfinite_weights_are_flagged_and_predictions_refused(tmp_path, screening_runs):
    from safetensors.torch import load_file, save_file

    path = peft(tmp_path / "nan", seed=4)
    tensors = load_file(path / "adapter_model.safetensors")
    first = sorted(tensors)[0]
    tensors[first][0, 0] = torch.nan
    save_file(tensors, path / "adapter_model.safetensors")
    report = screen_adapter(path, screening_runs)
    assert [f["kind"] for f in report["flags"]] == ["nonfinite"]
    assert report["flags"][0]["severity"] == "error"
    assert all("error" in p for p in report["predictions"])


def test_base_model_guess():
    def rows(names, shape):
        return [{"name": n, "shape": shape} for n in names]

    llama = rows([f"model.layers.{i}.self_attn.q_proj" for i in range(32)], [4096, 4096])
    guess = guess_base_model(_report(llama))
    assert guess["family"] == "decoder" and (guess["hidden_size"], guess["blocks"]) == (4096, 32)
    assert "Llama-2-7B" in guess["name"] and guess["source"] == "layout"
    sdxl = rows(
        ["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"], [640, 2048]
    )
    assert guess_base_model(_report(sdxl))["name"] == "Stable Diffusion XL"
    gpt2 = rows([f"transformer.h.{i}.attn.c_attn" for i in range(12)], [2304, 768])
    assert guess_base_model(_report(gpt2))["name"] == "GPT-2 (124M)"
    said = guess_base_model({"layers": llama, "base_model": "my/base"})
    assert (said["name"], said["source"]) == ("my/base", "metadata")
    odd = guess_base_model(_report(rows(["x.y"], [3, 3])))
    assert odd["name"] is None and odd["family"] is None


def test_overflowing_layers_give_strict_json(tmp_path, screening_runs):
    import json

    la = lora(seed=5)
    la.layers[0].U.fill_(1e30)  # finite factors, |delta W| (1e60) overflows float32
    la.layers[0].V.fill_(1e30)
    path = tmp_path / "huge"
    ll.save_lora(la, path)
    report = screen_adapter(path, screening_runs)
    json.dumps(report, allow_nan=False)
    row = report["layers"][0]
    assert row["fro_norm"] is None or math.isfinite(row["fro_norm"])
    assert report["flags"][0]["kind"] == "nonfinite"
