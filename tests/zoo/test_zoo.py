"""The zoo builder and the skills-lm / causal-lm presets: layout, labels, resume after kill -9,
extension by --num, shards + merge, PEFT and ll.load_lora round trips, generic mode."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

import loralens as ll
from helpers import tiny_skills, zoo_rows
from loralens.zoo import ZooConflictError, build_zoo, merge_zoos, read_manifest
from loralens.zoo.preset import HPARAM_COLUMNS, get_preset, index_rng, preset_names

pytestmark = pytest.mark.slow

# a tiny base and few examples: the whole file runs in well under a minute on 2 cores
TINY = tiny_skills(4)
KW = {"options": TINY, "ranks": (2, 4), "progress": False, "threads": 1}


def _adapters(zoo: Path) -> list[str]:
    return sorted(p.name for p in (zoo / "adapters").iterdir())


def _weights(zoo: Path, aid: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(zoo / "adapters" / aid / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def zoo16(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("zoo") / "z16"
    build_zoo("skills-lm", 16, out, **KW)
    return out


def test_registry_and_config_determinism():
    assert {"skills-lm", "causal-lm"} <= set(preset_names())
    p = get_preset("skills-lm")
    p.opts = p.options(TINY)
    a = [p.sample_config(0, i, [1, 2, 4]) for i in range(20)]
    b = [p.sample_config(0, i, [1, 2, 4]) for i in reversed(range(20))][::-1]
    assert a == b  # LoRA i depends only on (seed, i)
    assert p.sample_config(1, 0, [4]) != p.sample_config(0, 0, [4])
    assert index_rng(0, 3).random() == index_rng(0, 3).random()
    with pytest.raises(ValueError, match="unknown option"):
        p.options({"nope": 1})


def test_zoo_layout_labels_and_spread(zoo16):
    man = read_manifest(zoo16)
    assert man["preset"] == "skills-lm" and man["seed"] == 0 and man["ranks"] == [2, 4]
    assert {"torch", "peft", "transformers", "loralens"} <= set(man["versions"])
    assert len(man["base_hash"]) == 16 and man["base_labels"]["eval_loss"] > 0
    assert _adapters(zoo16) == [f"{i:06d}" for i in range(16)]
    rows = zoo_rows(zoo16)
    with open(zoo16 / "labels.csv") as fh:
        header = next(csv.reader(fh))
    assert header[0] == "adapter" and header[1:] == man["label_columns"]
    for col in (
        "lr",
        "weight_decay",
        "epochs",
        "batch_size",
        "lora_dropout",
        "init_seed",
        "rank",
        "eval_loss",
        "task_acc",
        "src_add",
        "src_kv",
        "loss_add",
        "loss_dedup",
    ):
        assert col in header
    assert len([c for c in header if c.startswith("src_")]) >= 12
    # what the learning side reads from zoo.json: the hyperparameters and the 0/1 columns
    assert man["hyperparameter_columns"] == [*HPARAM_COLUMNS, "n_train", "steps"]
    assert man["binary_columns"] == [c for c in header if c.startswith("src_")]
    assert sorted(r["adapter"] for r in rows) == _adapters(zoo16)
    assert all(r["eval_loss"] and float(r["eval_loss"]) > 0 for r in rows)
    assert {r["rank"] for r in rows} == {"2", "4"}
    losses = [float(r["eval_loss"]) for r in rows]
    assert max(losses) - min(losses) > 1e-3  # finetunes differ from each other
    # labels.json in each adapter folder is the same row
    one = json.loads((zoo16 / "adapters" / "000003" / "labels.json").read_text())
    row = next(r for r in rows if r["adapter"] == "000003")
    assert float(row["eval_loss"]) == pytest.approx(one["eval_loss"])


def test_adapters_load_in_peft_and_loralens(zoo16):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    for aid in _adapters(zoo16):
        base = AutoModelForCausalLM.from_pretrained(zoo16 / "base")
        pm = PeftModel.from_pretrained(base, zoo16 / "adapters" / aid)
        lora = ll.load_lora(zoo16 / "adapters" / aid)
        deltas = lora.delta_weights()
        peft_deltas = {
            name.removeprefix("base_model.model."): mod.get_delta_weight("default")
            for name, mod in pm.named_modules()
            if hasattr(mod, "get_delta_weight") and "default" in getattr(mod, "lora_A", {})
        }
        assert set(peft_deltas) == set(deltas)
        for name, d in peft_deltas.items():
            torch.testing.assert_close(deltas[name], d, rtol=1e-5, atol=1e-6)
        assert any(float(d.abs().max()) > 0 for d in deltas.values())  # training moved B off zero


def test_extend_with_num_and_conflicts(zoo16, tmp_path):
    out = tmp_path / "ext"
    build_zoo("skills-lm", 3, out, **KW)
    first = {a: _weights(out, a) for a in _adapters(out)}
    build_zoo("skills-lm", 6, out, **KW)
    assert _adapters(out) == [f"{i:06d}" for i in range(6)]
    assert len(zoo_rows(out)) == 6
    for a, w in first.items():  # the first three are untouched
        for k, v in _weights(out, a).items():
            assert torch.equal(v, w[k])
    # LoRA i is the same LoRA whichever zoo it was built in (same hyperparameters; weights
    # equal up to the rounding of batched kernels)
    rows16 = {r["adapter"]: r for r in zoo_rows(zoo16)}
    for r in zoo_rows(out):
        ref = rows16[r["adapter"]]
        assert (
            r["lr"] == ref["lr"]
            and r["init_seed"] == ref["init_seed"]
            and r["src_add"] == ref["src_add"]
        )
        for k, v in _weights(out, r["adapter"]).items():
            torch.testing.assert_close(v, _weights(zoo16, r["adapter"])[k], rtol=1e-3, atol=1e-4)
    with pytest.raises(ZooConflictError, match="seed"):
        build_zoo("skills-lm", 6, out, **{**KW, "options": TINY}, seed=1)
    with pytest.raises(ZooConflictError, match="ranks"):
        build_zoo("skills-lm", 6, out, **{**KW, "ranks": (4,)})


def test_shards_merge_and_refuse_conflicts(zoo16, tmp_path):
    s0, s1, merged = tmp_path / "s0", tmp_path / "s1", tmp_path / "all"
    build_zoo("skills-lm", 6, s0, shard="0/2", **KW)
    build_zoo("skills-lm", 6, s1, shard="1/2", **KW)
    assert _adapters(s0) == ["000000", "000002", "000004"]
    assert _adapters(s1) == ["000001", "000003", "000005"]
    merge_zoos(merged, [s0, s1])
    assert _adapters(merged) == [f"{i:06d}" for i in range(6)]
    rows = zoo_rows(merged)
    assert sorted(r["adapter"] for r in rows) == _adapters(merged)
    man = read_manifest(merged)
    assert man["shard"] is None and man["num"] == 6
    assert ll.load_lora(merged / "adapters" / "000005").ranks
    # a shard made with another seed is refused, by the API and by the CLI
    bad = tmp_path / "bad"
    import shutil

    shutil.copytree(s1, bad)
    m = json.loads((bad / "zoo.json").read_text())
    m["seed"] = 7
    (bad / "zoo.json").write_text(json.dumps(m))
    with pytest.raises(ZooConflictError, match="seed"):
        merge_zoos(tmp_path / "all2", [s0, bad])
    from typer.testing import CliRunner

    from loralens.cli import app

    res = CliRunner().invoke(app, ["zoo", "merge", str(tmp_path / "all3"), str(s0), str(bad)])
    assert res.exit_code == 3 and "refusing" in res.output


def test_first_builds_held_out_recipes_and_spares_live_builders(zoo16, tmp_path):
    import subprocess

    out = tmp_path / "held-out"
    (out / "adapters").mkdir(parents=True)
    other = subprocess.Popen(["sleep", "60"])  # a live builder sharing the folder
    try:
        live = out / "adapters" / f".tmp-000009-{other.pid}"
        live.mkdir()
        build_zoo("skills-lm", 5, out, first=3, **KW)
        assert live.is_dir()  # its unfinished work was left alone
    finally:
        other.kill()
        other.wait()
    assert [a for a in _adapters(out) if not a.startswith(".")] == ["000003", "000004"]
    rows16 = {r["adapter"]: r for r in zoo_rows(zoo16)}
    for r in zoo_rows(out):  # the same recipes as LoRAs 3 and 4 of the full zoo
        assert (r["lr"], r["init_seed"]) == (
            rows16[r["adapter"]]["lr"],
            rows16[r["adapter"]]["init_seed"],
        )
    assert read_manifest(out)["first"] == 3
    with pytest.raises(ValueError, match="first"):
        build_zoo("skills-lm", 5, tmp_path / "bad", first=5, **KW)


def test_kill9_then_resume(zoo16, tmp_path, kill9_build, file_snapshot):
    out = tmp_path / "killed"
    kill9_build("skills-lm", 12, out, after=2, timeout=120, options=TINY, ranks=(2, 4))
    assert (out / "zoo.json").exists()
    finished = [a for a in _adapters(out) if not a.startswith(".")]
    assert 2 <= len(finished) < 12
    before = file_snapshot(out, finished)
    # also what a kill can leave behind: a half-written row and an unfinished temp folder
    with open(out / "labels.csv", "a") as fh:
        fh.write("000011,0.001,0.0")
    (out / "adapters" / ".tmp-000011-4194305").mkdir(exist_ok=True)  # pid above any pid_max
    build_zoo("skills-lm", 12, out, **KW)
    assert _adapters(out) == [f"{i:06d}" for i in range(12)]
    rows = zoo_rows(out)
    assert sorted(r["adapter"] for r in rows) == _adapters(out)  # no duplicate, none missing
    assert all(r["eval_loss"] and r["task_acc"] for r in rows)  # no half-written row
    for a in _adapters(out):
        assert ll.load_lora(out / "adapters" / a).ranks
    assert file_snapshot(out, finished) == before  # what was finished before the kill is kept


def test_generic_mode_tiny_model(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    from typer.testing import CliRunner

    from loralens.cli import app

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "tiny-llama")
    text = "\n".join(
        f"line {i}: the quick brown fox jumps over {i % 7} lazy dogs." for i in range(120)
    )
    (tmp_path / "corpus.txt").write_text(text)
    out = tmp_path / "generic"
    args = [
        "zoo",
        "build",
        "--base-model",
        str(tmp_path / "tiny-llama"),
        "--text-file",
        str(tmp_path / "corpus.txt"),
        "--num",
        "3",
        "--out",
        str(out),
        "--ranks",
        "2",
        "-o",
        "block_size=16",
        "-o",
        "parts=4",
        "--quiet",
    ]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    man = read_manifest(out)
    assert man["preset"] == "causal-lm" and man["preset_info"]["tokenizer"].startswith("bytes")
    rows = zoo_rows(out)
    assert len(rows) == 3 and {"part_0", "part_3", "eval_loss", "train_loss", "lr"} <= set(rows[0])
    assert man["hyperparameter_columns"] == list(HPARAM_COLUMNS)
    assert man["binary_columns"] == ["part_0", "part_1", "part_2", "part_3"]
    base = AutoModelForCausalLM.from_pretrained(out / "base")
    pm = PeftModel.from_pretrained(base, out / "adapters" / "000001")
    lora = ll.load_lora(out / "adapters" / "000001")
    assert len(lora.layers) == len([m for m in pm.modules() if hasattr(m, "lora_A")]) > 0
