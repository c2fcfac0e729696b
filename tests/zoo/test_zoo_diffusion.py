"""The digits diffusion presets: zoos build, labels make sense, adapters are real PEFT LoRAs,
batched finetuning equals plain PEFT finetuning, the scorer reads real digits, `zoo samples`
draws a PNG, and a killed build resumes. Tiny base model (cached once per test session)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import loralens as ll
from helpers import zoo_rows
from loralens.zoo.batched_lora import peft_config, target_names, wrap_targets
from loralens.zoo.builder import build_zoo
from loralens.zoo.digits.data import ATTR_NAMES, IDENTIFIERS, prompt_for
from loralens.zoo.digits.finetune import finetune
from loralens.zoo.digits.model import diffusion_loss
from loralens.zoo.preset import get_preset, preset_names

pytestmark = pytest.mark.slow

TINY = {"size": "tiny", "group": 3, "sample_steps": 4}
KW = {"options": TINY, "ranks": (2, 4), "progress": False, "threads": 1}


def _adapters(zoo):
    return sorted(p.name for p in (zoo / "adapters").iterdir() if not p.name.startswith("."))


@pytest.fixture(scope="module")
def dream(tmp_path_factory):
    out = tmp_path_factory.mktemp("dream") / "zoo"
    build_zoo("digits-dreambooth", 5, out, **KW)
    return out


@pytest.fixture(scope="module")
def subsets(tmp_path_factory):
    out = tmp_path_factory.mktemp("subsets") / "zoo"
    build_zoo("digits-subsets", 4, out, **{**KW, "options": {**TINY, "group": 4}})
    return out


@pytest.fixture(scope="module")
def preset(dream, loralens_cache):
    p = get_preset("digits-dreambooth")
    p.prepare(loralens_cache, 0, p.options(TINY))
    return p


def test_registry_and_configs(preset):
    assert {"digits-dreambooth", "digits-subsets"} <= set(preset_names())
    a = preset.sample_config(0, 3, [2, 4])
    assert a == preset.sample_config(0, 3, [2, 4])  # a function of (seed, index) only
    assert a != preset.sample_config(0, 4, [2, 4])
    for i in range(20):
        c = preset.sample_config(0, i, [2, 4])
        assert 10 <= c["n_images"] <= 20 and c["rank"] in (2, 4)
        assert 1e-4 <= c["lr"] <= 1e-2 and c["batch_size"] == 4 * c["grad_accum"]
        assert any(w in c["instance_prompt"] for w in IDENTIFIERS)
        # the subject: all its images have its class and its six attributes
        key = [c[f"attr_{n}"] for n in ATTR_NAMES]
        images = preset._subject_images(c)
        assert len(images) == c["n_images"]
        idx = [int(torch.nonzero((preset.data.images == im).flatten(1).all(1))[0]) for im in images]
        assert (preset.data.labels[idx] == c["subject_class"]).all()
        assert (preset.data.attrs[idx] == torch.tensor(key)).all()
    with pytest.raises(ValueError, match="unknown option"):
        preset.options({"nope": 1})


def test_scorer_recognises_heldout_real_digits(preset, dream):
    info = json.loads((dream / "zoo.json").read_text())["preset_info"]
    rep = info["scorer"]
    assert rep["heldout_real_images"] > 300
    assert rep["class_acc"] > 0.6  # chance is 0.1 (the full-size scorer reaches ~0.98)
    assert rep["attr_acc_mean"] > 0.6  # chance is 0.5
    # the same through the API on the real held-out images
    sel = preset.data.heldout & preset.data.real
    prompts = [prompt_for(int(c)) for c in preset.data.labels[sel]]
    right = preset.scorer.rate(preset.data.images[sel], prompts)
    wrong = preset.scorer.rate(
        preset.data.images[sel], [prompt_for((int(c) + 1) % 10) for c in preset.data.labels[sel]]
    )
    assert float(right.mean()) > float(wrong.mean()) + 0.3


def test_dreambooth_zoo_labels(dream):
    man = json.loads((dream / "zoo.json").read_text())
    assert man["preset"] == "digits-dreambooth" and man["ranks"] == [2, 4]
    assert set(man["base_labels"]) == {"clip_score"}
    rows = zoo_rows(dream)
    assert sorted(r["adapter"] for r in rows) == _adapters(dream) == [f"{i:06d}" for i in range(5)]
    assert list(rows[0]) == ["adapter", *man["label_columns"]]
    assert man["binary_columns"] == [f"attr_{n}" for n in ATTR_NAMES]
    assert man["hyperparameter_columns"] == [
        "n_images",
        "lr",
        "steps",
        "grad_accum",
        "batch_size",
        "rank",
        "lora_alpha",
        "init_seed",
        "data_seed",
    ]
    for r in rows:
        assert all(r[f"attr_{n}"] in {"0", "1"} for n in ATTR_NAMES)
        assert 0 <= float(r["clip_score"]) <= 1 and 0 <= float(r["subject_score"]) <= 1
        assert float(r["train_loss"]) > 0
    assert len(ATTR_NAMES) >= 5


def test_subsets_zoo_labels(subsets):
    man = json.loads((subsets / "zoo.json").read_text())
    assert man["binary_columns"] == [f"class_{c}" for c in range(10)]
    hyper = ["rank", "lora_alpha", "lr", "steps", "batch_size", "init_seed", "data_seed"]
    assert man["hyperparameter_columns"] == hyper
    assert set(hyper) <= set(man["label_columns"])
    rows = zoo_rows(subsets)
    assert len(rows) == 4
    for r in rows:
        present = [int(r[f"class_{c}"]) for c in range(10)]
        assert set(present) <= {0, 1} and sum(present) == int(r["n_classes"]) >= 1
        assert int(r["dataset_size"]) in (16, 32, 64, 128)
        assert 0 <= float(r["clip_score"]) <= 1


def test_adapters_are_peft_and_match_loralens(dream, subsets):
    from diffusers import UNet2DConditionModel
    from peft import PeftModel

    unet = UNet2DConditionModel.from_pretrained(dream / "base" / "unet").eval()
    base_w = {k: v.clone() for k, v in unet.state_dict().items()}
    for zoo, name in ((dream, "000000"), (dream, "000003"), (subsets, "000001")):
        adir = zoo / "adapters" / name
        pm = PeftModel.from_pretrained(copy.deepcopy(unet), str(adir))
        merged = pm.merge_and_unload().state_dict()
        lora = ll.load_lora(adir)
        assert len(lora.layers) == len(target_names(unet, ["to_q", "to_v"]))
        row = json.loads((adir / "labels.json").read_text())
        assert set(lora.ranks) == {int(row["rank"])}
        moved = 0.0
        for layer_name, delta in lora.delta_weights().items():
            assert layer_name.startswith("unet.")  # canonical: the pipeline's module path
            key = f"{layer_name.removeprefix('unet.')}.weight"
            torch.testing.assert_close(merged[key] - base_w[key], delta, atol=1e-6, rtol=1e-4)
            moved = max(moved, float(delta.abs().max()))
        assert moved > 0  # the finetune changed the model


def _reference_peft_finetune(unet, scheduler, job, rank, init_A):
    """Plain PEFT + torch.optim.AdamW, drawing data as `finetune` does."""
    from peft import get_peft_model

    pm = get_peft_model(copy.deepcopy(unet), peft_config(rank, float(rank), ["to_q", "to_v"]))
    for name, A in init_A.items():
        pm.base_model.model.get_submodule(name).lora_A["default"].weight.data.copy_(A)
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=job.lr, weight_decay=job.weight_decay)
    g = torch.Generator().manual_seed(job.seed)
    pm.train()
    for t in range(job.steps * job.accum):
        idx = torch.randint(len(job.images), (job.micro,), generator=g)
        x = job.images[idx]
        noise = torch.randn(x.shape, generator=g)
        ts = torch.randint(0, scheduler.config.num_train_timesteps, (job.micro,), generator=g)
        loss = diffusion_loss(pm, scheduler, x, job.cond[idx], noise, ts).mean() / job.accum
        loss.backward()
        if (t + 1) % job.accum == 0:
            opt.step()
            opt.zero_grad()
    return {
        n: (m.lora_A["default"].weight.detach(), m.lora_B["default"].weight.detach())
        for n, m in pm.base_model.model.named_modules()
        if hasattr(m, "lora_A") and "default" in m.lora_A
    }


def test_batched_finetuning_equals_plain_peft(preset):
    unet, sched = preset.base.unet, preset.base.scheduler
    cfgs = [preset.sample_config(0, i, [2, 4]) for i in range(3)]
    for c, steps in zip(cfgs, (5, 3, 4)):
        c["steps"], c["grad_accum"] = steps, 2  # short, with accumulation and unequal lengths
    jobs = [preset.job(c) for c in cfgs]
    ranks = [c["rank"] for c in cfgs]
    model, mods = wrap_targets(
        unet, ["to_q", "to_v"], ranks, [float(r) for r in ranks], [c["init_seed"] for c in cfgs]
    )
    init = {n: m.A.detach().clone() for n, m in mods.items()}
    finetune(model, mods, sched, jobs)
    for k in (0, 1):
        ref = _reference_peft_finetune(
            unet, sched, jobs[k], ranks[k], {n: A[k, : ranks[k]] for n, A in init.items()}
        )
        assert set(ref) == set(mods)
        for name, (A, B) in ref.items():
            torch.testing.assert_close(mods[name].A[k, : ranks[k]], A, atol=2e-5, rtol=1e-3)
            torch.testing.assert_close(mods[name].B[k, :, : ranks[k]], B, atol=2e-5, rtol=1e-3)
            # zero padding of the smaller rank stays exactly zero
            assert float(mods[name].A[k, ranks[k] :].detach().abs().sum()) == 0.0
            assert float(mods[name].B[k, :, ranks[k] :].detach().abs().sum()) == 0.0


def test_zoo_samples_writes_png(dream, tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from loralens.cli import app

    out = tmp_path / "grid.png"
    res = CliRunner().invoke(
        app,
        ["zoo", "samples", str(dream), "--adapter", "000002", "--out", str(out), "--seeds", "3"],
    )
    assert res.exit_code == 0, res.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out) as im:
        im.verify()
    with Image.open(out) as im:
        w, h = im.size
    assert w > 3 * 8 * 6 and h > 2 * 5 * 8 * 6  # 3 seeds wide, base/LoRA rows for 5 prompts
    bad = CliRunner().invoke(
        app, ["zoo", "samples", str(dream), "--adapter", "nope", "--out", str(out)]
    )
    assert bad.exit_code == 1 and "no adapter" in bad.output


def test_kill9_then_resume(dream, tmp_path, kill9_build):
    out = tmp_path / "killed"
    opts = {**TINY, "group": 2}
    kill9_build("digits-dreambooth", 4, out, after=1, timeout=150, options=opts, ranks=(2, 4))
    assert (out / "zoo.json").exists()
    build_zoo("digits-dreambooth", 4, out, **{**KW, "options": opts})
    assert _adapters(out) == [f"{i:06d}" for i in range(4)]
    rows = zoo_rows(out)
    assert sorted(r["adapter"] for r in rows) == _adapters(out)
    assert all(r["clip_score"] and r["subject_score"] for r in rows)
    # LoRA i is the same whoever built it: compare with the uninterrupted zoo's first five
    ref = {r["adapter"]: r for r in zoo_rows(dream)}
    for r in rows:
        assert r["instance_prompt"] == ref[r["adapter"]]["instance_prompt"]
        assert abs(float(r["clip_score"]) - float(ref[r["adapter"]]["clip_score"])) < 2e-3
