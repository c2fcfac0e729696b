"""`loralens convert` and `loralens resize`: output written, per-layer errors in the table and in
strict JSON, and one exit code per kind of failure. Also: adapters saved as kohya files,
diffusers files and PEFT folders pack into one store and predict with one run."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import loralens as ll
from loralens.cli import app
from loralens.learn.runs.folder import load_run
from loralens.learn.runs.prediction import predict
from loralens.learn.training.config import TrainConfig
from loralens.learn.training.loop import train
from loralens.store import pack

runner = CliRunner()
MODULES = (
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
)


def unet_lora(seed: int, rank: int = 4) -> ll.LoRA:
    """A LoRA on two UNet modules (PEFT names of a UNet, as get_peft_model(unet) saves them)."""
    g = torch.Generator().manual_seed(seed)
    return ll.LoRA(
        [
            ll.LoRALayer(m, torch.randn(8, rank, generator=g), torch.randn(6, rank, generator=g))
            for m in MODULES
        ]
    )


def test_convert_then_resize_on_the_command_line(tmp_path):
    ll.save_lora(unet_lora(0), tmp_path / "peft")
    res = runner.invoke(
        app, ["convert", str(tmp_path / "peft"), str(tmp_path / "k.safetensors"), "--to", "kohya"]
    )
    assert res.exit_code == 0, res.output
    assert ll.detect_format(tmp_path / "k.safetensors") == "kohya"
    res = runner.invoke(
        app,
        [
            "resize",
            str(tmp_path / "k.safetensors"),
            str(tmp_path / "r.safetensors"),
            "--rank",
            "2",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert [r["new_rank"] for r in report["layers"]] == [2, 2]
    assert all(0 < r["rel_error"] < 1 for r in report["layers"])
    assert ll.detect_format(tmp_path / "r.safetensors") == "kohya"
    res = runner.invoke(
        app,
        [
            "resize",
            str(tmp_path / "k.safetensors"),
            str(tmp_path / "e"),
            "--energy",
            "0.9",
            "--to",
            "peft",
        ],
    )
    assert res.exit_code == 0 and "rel. error" in res.stdout and "attn1.to_q" in res.stdout


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["convert", "{src}", "{tmp}/x", "--to", "onnx"], 2, "--to must be one of"),
        (["resize", "{src}", "{tmp}/x"], 2, "exactly one of --rank and --energy"),
        (["convert", "{src}", "{src}", "--to", "peft"], 3, "already exists"),
        (["convert", "{tmp}/missing", "{tmp}/x", "--to", "peft"], 1, "no such file"),
        (
            ["resize", "{src}", "{tmp}/x.safetensors", "--rank", "2", "--to", "diffusers"],
            1,
            "no diffusion pipeline",
        ),
    ],
)
def test_failures_exit_with_their_kind(tmp_path, args, code, needle):
    ll.save_lora(
        ll.LoRA([ll.LoRALayer("model.q", torch.ones(3, 1), torch.ones(2, 1))]), tmp_path / "a"
    )
    argv = [a.format(src=tmp_path / "a", tmp=tmp_path) for a in args]
    res = runner.invoke(app, argv)
    assert res.exit_code == code and needle in res.output, res.output


def test_a_language_model_lora_converts_to_peft_and_the_help_says_so(tmp_path):
    """The README's GPT-2 adapter: peft works, kohya and diffusers refuse it saying to write
    peft, and convert --help says which formats suit a language-model LoRA."""
    res = runner.invoke(app, ["convert", "--help"], env={"COLUMNS": "300"})
    assert "language-model LoRA" in res.stdout and "converts to peft only" in res.stdout
    layer = ll.LoRALayer("transformer.h.0.attn.c_attn", torch.ones(192, 2), torch.ones(64, 2))
    ll.save_lora(ll.LoRA([layer]), tmp_path / "gpt2")
    res = runner.invoke(
        app, ["convert", str(tmp_path / "gpt2"), str(tmp_path / "p"), "--to", "peft"]
    )
    assert res.exit_code == 0, res.output
    for to in ("kohya", "diffusers"):
        out = str(tmp_path / f"{to}.safetensors")
        res = runner.invoke(app, ["convert", str(tmp_path / "gpt2"), out, "--to", to])
        assert res.exit_code == 1 and "peft" in res.output, res.output


def test_one_adapter_in_three_formats_packs_into_one_store_and_predicts_the_same(tmp_path):
    folder = tmp_path / "adapters"
    folder.mkdir()
    rows = []
    for k in range(12):
        ll.save_lora(unet_lora(k), tmp_path / "src" / f"a{k}")
        to = ("peft", "kohya", "diffusers")[k % 3]
        out = folder / (f"a{k}" if to == "peft" else f"a{k}.safetensors")
        ll.convert(tmp_path / "src" / f"a{k}", out, to=to)
        rows.append({"adapter": out.name, "y": float(k % 4)})
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    store, refused = pack(folder, tmp_path / "store", labels=tmp_path / "labels.csv")
    assert not refused and len(store) == 12
    train(store, TrainConfig("mlp", ["y"], epochs=1, plots=False), tmp_path / "run")
    run = load_run(tmp_path / "run")
    ll.convert(tmp_path / "src" / "a0", tmp_path / "a0.kohya.safetensors", to="kohya")
    ll.convert(tmp_path / "src" / "a0", tmp_path / "a0.diffusers.safetensors", to="diffusers")
    copies = [
        tmp_path / "src" / "a0",
        tmp_path / "a0.kohya.safetensors",
        tmp_path / "a0.diffusers.safetensors",
    ]
    preds = [row["prediction"]["y"] for row in predict(run, copies)]
    assert preds == pytest.approx([preds[0]] * 3, rel=1e-5)
