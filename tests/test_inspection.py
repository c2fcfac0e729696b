"""`loralens inspect` over several adapters: one report per adapter (paths, folders of adapters,
hub ids), a summary, the file's training metadata, per-layer flags, and hub ids offline."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import loralens as ll
from helpers import (
    can_measure_peak_memory,
    peak_memory,
    seeded_randn,
    wide_peft_adapter,
    write_peft_adapter,
)
from loralens.cli import app
from loralens.inspection import inspect_adapter, inspect_adapters

KOHYA_META = {
    "ss_base_model_version": "sdxl_base_v1-0",
    "ss_sd_model_name": "sd_xl_base_1.0.safetensors",
    "ss_network_module": "networks.lora",
    "ss_network_dim": "4",
    "ss_network_alpha": "2.0",
    "ss_num_epochs": "10",
    "ss_learning_rate": "0.0001",
    "ss_num_train_images": "150",
    "ss_tag_frequency": json.dumps(
        {"10_cat": {"cat": 150, "solo": 90, " sitting": 12}, "5_dog": {"cat": 3, "dog": 40}}
    ),
    "ss_dataset_dirs": json.dumps({"10_cat": {"n_repeats": 10, "img_count": 150}}),
    "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
    "ss_seed": "None",
}
STEM = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"
#: the layer's canonical name (formats.canonical), what inspect shows
CANONICAL = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q"


def _kohya(path, metadata=None, rank=4, seed=0):
    t = {
        f"{STEM}.lora_down.weight": seeded_randn(rank, 12, seed=seed),
        f"{STEM}.lora_up.weight": seeded_randn(10, rank, seed=seed + 1),
        f"{STEM}.alpha": torch.tensor(2.0),
    }
    save_file(t, path, metadata=metadata)
    return path


def test_kohya_training_metadata_is_reported_as_the_file_says(tmp_path):
    report = inspect_adapter(_kohya(tmp_path / "k.safetensors", KOHYA_META))
    kohya = report["training"]["kohya"]
    assert kohya["ss_base_model_version"] == "sdxl_base_v1-0"
    assert kohya["ss_num_epochs"] == 10 and kohya["ss_learning_rate"] == 1e-4
    assert kohya["ss_network_alpha"] == 2.0 and "ss_seed" not in kohya  # "None": not recorded
    tags = report["training"]["tags"]
    assert tags["datasets"] == ["10_cat", "5_dog"] and tags["distinct_tags"] == 4
    assert tags["top_tags"] == [["cat", 153], ["solo", 90], ["dog", 40], ["sitting", 12]]
    assert report["training"]["dataset_dirs"] == {"10_cat": {"n_repeats": 10, "img_count": 150}}
    assert report["training"]["modelspec"] == {
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora"
    }


def test_peft_config_is_reported(tmp_path):
    folder = write_peft_adapter(
        tmp_path / "p", config={"base_model_name_or_path": "org/base", "target_modules": ["q"]}
    )
    peft = inspect_adapter(folder)["training"]["peft"]
    assert peft == {
        "peft_type": "LORA",
        "base_model_name_or_path": "org/base",
        "r": 2,
        "lora_alpha": 4,
        "target_modules": ["q"],
    }


def test_rank_collapsed_layer_is_flagged_by_its_numerical_rank(tmp_path):
    """Rank 4 with two directions exactly zero: numerical rank 2 of 4 (the old top-2 rule
    could not see it: the two largest singular values are healthy)."""
    lora = ll.load_lora(_kohya(tmp_path / "k.safetensors"))
    layer = lora.layers[0]
    layer.U[:, 2:] = 0
    healthy = ll.LoRALayer("model.layers.0.self_attn.q_proj", layer.U.clone() + 1, layer.V)
    ll.save_lora(
        ll.LoRA([ll.LoRALayer("model.layers.1.self_attn.q_proj", layer.U, layer.V), healthy]),
        tmp_path / "a",
    )
    report = inspect_adapter(tmp_path / "a")
    rows = {r["name"]: r for r in report["layers"]}
    assert rows["model.layers.1.self_attn.q_proj"]["numerical_rank"] == 2
    assert rows["model.layers.1.self_attn.q_proj"]["flags"] == ["collapsed"]
    assert rows["model.layers.0.self_attn.q_proj"]["flags"] == []
    assert [f["kind"] for f in report["flags"]] == ["collapsed"]


def test_several_paths_and_a_folder_give_one_report_each_and_a_summary(tmp_path):
    folder = tmp_path / "loras"
    folder.mkdir()
    _kohya(folder / "b10.safetensors", KOHYA_META, seed=1)
    _kohya(folder / "b2.safetensors", seed=2)
    write_peft_adapter(folder / "peft_one")
    (folder / "notes.txt").write_text("not an adapter")
    missing = tmp_path / "missing.safetensors"
    result = inspect_adapters([folder, missing], top=2)
    paths = [r["path"] for r in result["adapters"]]
    names = ["b2.safetensors", "b10.safetensors", "peft_one"]  # natural order
    assert paths == [*(str(folder / n) for n in names), str(missing)]
    assert str(missing) in result["adapters"][-1]["error"]
    s = result["summary"]
    assert (s["adapters"], s["read"], s["failed"]) == (4, 3, 1)
    assert s["formats"] == {"kohya": 2, "peft": 1} and s["layers"] == 4
    assert s["adapter_params"] == sum(r["adapter_params"] for r in result["adapters"][:3])
    assert s["base_models"] == {  # each adapter's base-model label, counted
        "unknown Stable Diffusion UNet": 1,
        "sd_xl_base_1.0.safetensors (from the file); layout: unknown Stable Diffusion UNet": 1,
        "unknown Llama-like decoder (2 blocks)": 1,
    }


def test_cli_json_schema_for_several_adapters_and_exit_code(tmp_path, monkeypatch):
    a = _kohya(tmp_path / "a.safetensors", KOHYA_META)
    b = write_peft_adapter(tmp_path / "b")
    runner = CliRunner()
    res = runner.invoke(app, ["inspect", str(a), str(b), "--json", "-k", "1"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert set(out) == {"adapters", "summary"} and len(out["adapters"]) == 2
    keys = {"path", "format", "base_model", "base_model_guess", "training", "flags", "layers"}
    assert all(keys <= set(r) for r in out["adapters"])
    assert all(len(row["top_svals"]) == 1 for r in out["adapters"] for row in r["layers"])
    assert out["summary"]["read"] == 2
    monkeypatch.chdir(tmp_path)  # short names: table cells do not fold
    table = runner.invoke(app, ["inspect", "a.safetensors", "b", "gone"])
    assert table.exit_code == 1
    assert "3 adapters (1 failed)" in table.output and "epochs 10" in table.output
    one = runner.invoke(app, ["inspect", str(a)])  # one adapter: its layer table
    assert one.exit_code == 0 and CANONICAL in one.output and "epochs 10" in one.output


def test_what_reads_as_a_hub_id(tmp_path, monkeypatch):
    from loralens.hub import is_hub_id

    monkeypatch.chdir(tmp_path)
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "adapter").mkdir()
    assert is_hub_id("owner/name") and is_hub_id("owner/name@v1.0")
    assert not is_hub_id("local/adapter")  # a folder here
    assert not is_hub_id("loras/x.safetensors") and not is_hub_id("/abs/path")
    assert not is_hub_id("just-a-name") and not is_hub_id("a/b/c")


def test_hub_id_offline_and_not_cached_is_one_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # "owner/adapter" is not a local path here
    res = CliRunner().invoke(app, ["inspect", "owner/adapter"], env={"HF_HUB_OFFLINE": "1"})
    assert res.exit_code == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "owner/adapter" in lines[0] and "offline" in lines[0]


def test_hub_id_offline_reads_the_cached_snapshot(tmp_path, monkeypatch):
    """The real huggingface_hub cache layout (refs/main -> snapshots/<commit>/files), read with
    the hub offline: only the adapter files of the snapshot are inspected."""
    import huggingface_hub.constants

    cache = tmp_path / "cache"
    repo = cache / "models--owner--adapter"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    _kohya(snapshot.parent.mkdir(parents=True) or snapshot.mkdir() or snapshot / "a.safetensors")
    _kohya(snapshot / "b.safetensors", seed=3)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    result = inspect_adapters(["owner/adapter"])
    assert [r["path"] for r in result["adapters"]] == [
        "owner/adapter/a.safetensors",
        "owner/adapter/b.safetensors",
    ]
    assert result["summary"]["read"] == 2
    shutil.rmtree(snapshot)
    assert "offline" in inspect_adapters(["owner/adapter"])["adapters"][0]["error"]


_INSPECT = """
import sys
from loralens.inspection import inspect_adapter


def warm():  # one layer like the big file's: lazy imports, thread pools, first-use buffers
    inspect_adapter(sys.argv[2])


def run():
    return [f["kind"] for f in inspect_adapter(sys.argv[1])["flags"]]
"""


@pytest.mark.skipif(not can_measure_peak_memory(), reason="reads peak memory from Linux /proc")
def test_inspect_holds_one_layer_at_a_time(tmp_path):
    """The README's bound: inspect peaks at most 1.5x the largest layer's float32 factors plus
    16 MiB. Six 16384 x 16384 rank-128 float16 layers (16 MiB each as float32, 96 MiB in all),
    one of them rank-collapsed so that its singular values take the QR route; holding the whole
    float32 adapter, as inspect did, peaks near 140 MiB."""
    big = wide_peft_adapter(tmp_path / "big", layers=6, width=16384, rank=128)
    weights = big / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"][:, 32:] = 0
    save_file(tensors, weights)
    small = wide_peft_adapter(tmp_path / "small", layers=1, width=16384, rank=128, seed=1)
    layer = 2 * 16384 * 128 * 4
    m = peak_memory(_INSPECT, big, small)
    assert m["result"] == ["collapsed"]
    assert m["peak"] <= 1.5 * layer + 16 * 2**20, f"{m['peak'] / 2**20:.1f} MiB"
