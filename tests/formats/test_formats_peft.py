"""PEFT adapters: load_lora deltas equal what the real PEFT library merges, and save_lora round trips.

Every model is a small, randomly initialised transformers/torch model built from a config (no
downloads); ``init_lora_weights=False`` makes B non-zero so the deltas are not trivially zero.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import loralens as ll
from helpers import seeded_randn, tiny_llama

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=40, n_positions=16)
    return transformers.GPT2LMHeadModel(cfg)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 6, kernel_size=3)
        self.conv2 = nn.Conv2d(6, 5, kernel_size=(1, 1))
        self.conv3 = nn.Conv1d(5, 4, kernel_size=2)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.conv2(self.conv1(x)).mean((2, 3)))


def _make_adapter(base, config, tmp_path, name="adapter", **save_kw):
    """Wrap a copy of ``base`` with ``config``, save it; return (folder, merged state dict)."""
    model = peft.get_peft_model(copy.deepcopy(base), config)
    folder = tmp_path / name
    model.save_pretrained(str(folder), **save_kw)
    merged = model.merge_and_unload().state_dict()
    return folder, model, merged


def _peft_delta(base, merged, name, *, fan_in_fan_out=False):
    """What PEFT added to module ``name``'s weight, in loralens' orientation (out x in[*k])."""
    w0 = base.get_submodule(name).weight.detach()
    d = merged[f"{name}.weight"] - w0
    if fan_in_fan_out:
        d = d.T
    return d.reshape(d.shape[0], -1) if d.ndim > 2 else d


def _assert_close(a, b, rel=1e-5):
    assert a.shape == b.shape, (a.shape, b.shape)
    err = float((a - b).norm() / b.norm().clamp_min(1e-30))
    assert err < rel, err


def _assert_same_merge(base, folder_a, folder_b):
    """Both adapter folders merge into ``base`` to the same weights."""
    sds = []
    for folder in (folder_a, folder_b):
        m = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder))
        sds.append(m.merge_and_unload().state_dict())
    assert sds[0].keys() == sds[1].keys()
    for k in sds[0]:
        _assert_close(sds[1][k], sds[0][k]) if sds[0][k].norm() > 0 else None


def test_gpt2_fan_in_fan_out_c_attn_matches_peft_merge_and_round_trips(tmp_path):
    base = _gpt2()
    cfg = peft.LoraConfig(
        r=3,
        lora_alpha=5,
        target_modules=["c_attn", "c_proj"],
        fan_in_fan_out=True,
        init_lora_weights=False,
    )
    folder, _, merged = _make_adapter(base, cfg, tmp_path)
    lora = ll.load_lora(folder)
    assert ll.detect_format(folder) == "peft"
    assert lora.names == [
        "transformer.h.0.attn.c_attn",
        "transformer.h.0.attn.c_proj",
        "transformer.h.0.mlp.c_proj",
        "transformer.h.1.attn.c_attn",
        "transformer.h.1.attn.c_proj",
        "transformer.h.1.mlp.c_proj",
    ]
    for layer in lora.layers:
        assert layer.meta["kind"] == "linear" and layer.meta["fan_in_fan_out"] is True
        assert layer.meta["scale"] == pytest.approx(5 / 3)
        assert layer.U.dtype == torch.float32
        _assert_close(
            lora.delta_weights()[layer.name],
            _peft_delta(base, merged, layer.name, fan_in_fan_out=True),
        )
    assert lora.delta_weights()["transformer.h.0.attn.c_attn"].shape == (48, 16)  # out x in

    out = ll.save_lora(lora, tmp_path / "saved")
    _assert_same_merge(base, folder, out)
    again = ll.load_lora(out)
    for name, d in lora.delta_weights().items():
        _assert_close(again.delta_weights()[name], d)


def test_llama_rslora_rank_and_alpha_patterns_with_regex_keys(tmp_path):
    base = tiny_llama(layers=11)
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=6,
        use_rslora=True,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        # a plain module name, a full path, and regexes (PEFT matches them as whole dotted suffixes)
        rank_pattern={
            "q_proj": 2,
            r"layers\.1\d\.self_attn\.k_proj": 3,
            "model.layers.0.self_attn.v_proj": 5,
        },
        alpha_pattern={r"o_proj": 9, r".*\.2\.self_attn\.(q|v)_proj": 1.5},
        init_lora_weights=False,
    )
    folder, _, merged = _make_adapter(base, cfg, tmp_path)
    lora = ll.load_lora(folder)
    assert len(lora) == 44
    # base model order: numeric path segments compared as numbers (layers.2 < layers.10)
    idx = [int(n.split(".")[2]) for n in lora.names]
    assert idx == sorted(idx)
    for layer in lora.layers:
        _assert_close(lora.delta_weights()[layer.name], _peft_delta(base, merged, layer.name))
    assert lora["model.layers.3.self_attn.q_proj"].rank == 2
    assert lora["model.layers.10.self_attn.k_proj"].rank == 3
    assert lora["model.layers.1.self_attn.k_proj"].rank == 4
    assert lora["model.layers.0.self_attn.v_proj"].rank == 5
    assert lora["model.layers.0.self_attn.o_proj"].meta["scale"] == pytest.approx(9 / math.sqrt(4))
    assert lora["model.layers.2.self_attn.q_proj"].meta["scale"] == pytest.approx(
        1.5 / math.sqrt(2)
    )
    assert lora["model.layers.5.self_attn.k_proj"].shape == (8, 16)  # grouped-query k: out 8

    out = ll.save_lora(lora, tmp_path / "saved", base_model_name_or_path="tiny-llama")
    saved_cfg = json.loads((out / "adapter_config.json").read_text())
    assert saved_cfg["base_model_name_or_path"] == "tiny-llama"
    _assert_same_merge(base, folder, out)


def test_conv_lora_flattens_kernel_and_round_trips(tmp_path):
    base = ConvNet()
    cfg = peft.LoraConfig(
        r=2,
        lora_alpha=3,
        target_modules=["conv1", "conv2", "conv3", "head"],
        init_lora_weights=False,
    )
    folder, _, merged = _make_adapter(base, cfg, tmp_path)
    lora = ll.load_lora(folder)
    assert lora.names == ["conv1", "conv2", "conv3", "head"]
    assert lora["conv1"].shape == (6, 3 * 3 * 3)
    assert lora["conv1"].meta["kind"] == "conv" and lora["conv1"].meta["kernel_size"] == [3, 3]
    assert lora["conv3"].meta["kernel_size"] == [2]
    assert lora["head"].meta["kind"] == "linear"
    for name in lora.names:
        _assert_close(lora.delta_weights()[name], _peft_delta(base, merged, name))
    _assert_same_merge(base, folder, ll.save_lora(lora, tmp_path / "saved"))


def test_embedding_lora_is_in_the_embedding_weights_orientation(tmp_path):
    base = tiny_llama(layers=1)
    cfg = peft.LoraConfig(
        r=3, lora_alpha=4, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False
    )
    folder, _, merged = _make_adapter(base, cfg, tmp_path)
    lora = ll.load_lora(folder)  # the saved full embedding weight is allowed and recorded
    emb = lora["model.embed_tokens"]
    assert emb.meta["kind"] == "embedding" and emb.shape == (48, 16)  # num_embeddings x dim
    for name in lora.names:
        _assert_close(lora.delta_weights()[name], _peft_delta(base, merged, name))
    assert lora.metadata["non_lora_keys"]
    _assert_same_merge(base, folder, ll.save_lora(lora, tmp_path / "saved"))


def test_dora_magnitude_kept_in_meta_and_round_trips(tmp_path):
    base = tiny_llama(layers=2)
    cfg = peft.LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=["q_proj", "v_proj"],
        use_dora=True,
        init_lora_weights=False,
    )
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    folder = tmp_path / "adapter"
    pm.save_pretrained(str(folder))
    lora = ll.load_lora(folder)
    assert lora.names == [f"model.layers.{i}.self_attn.{m}_proj" for i in (0, 1) for m in "qv"]
    for layer in lora.layers:
        module = pm.base_model.model.get_submodule(layer.name)
        mag = module.lora_magnitude_vector["default"].weight.detach()
        torch.testing.assert_close(layer.meta["magnitude"], mag)
        # U V^T is DoRA's low-rank (directional) update, as PEFT computes it
        _assert_close(layer.delta_weight(), module.get_delta_weight("default").detach())
    _assert_same_merge(base, folder, ll.save_lora(lora, tmp_path / "saved"))


def test_bin_weights_and_half_precision_storage(tmp_path):
    from safetensors.torch import load_file, save_file

    base = tiny_llama(layers=2)
    cfg = peft.LoraConfig(r=2, lora_alpha=3, target_modules=["q_proj"], init_lora_weights=False)
    folder, _, merged = _make_adapter(base, cfg, tmp_path, safe_serialization=False)
    assert (folder / "adapter_model.bin").is_file()
    lora = ll.load_lora(folder)
    for name in lora.names:
        _assert_close(lora.delta_weights()[name], _peft_delta(base, merged, name))

    folder_st, _, _ = _make_adapter(base, cfg, tmp_path, name="st")
    for dtype in (torch.float16, torch.bfloat16):
        half = tmp_path / f"half-{dtype}"
        half.mkdir()
        (half / "adapter_config.json").write_text((folder_st / "adapter_config.json").read_text())
        sd = {k: v.to(dtype) for k, v in load_file(folder_st / "adapter_model.safetensors").items()}
        save_file(sd, half / "adapter_model.safetensors")
        got = ll.load_lora(half)
        for layer in got.layers:
            assert (
                layer.U.dtype == torch.float32 and layer.meta["dtype"] == str(dtype).split(".")[1]
            )
            a = sd[f"base_model.model.{layer.name}.lora_A.weight"].float()
            b = sd[f"base_model.model.{layer.name}.lora_B.weight"].float()
            _assert_close(layer.delta_weight(), b @ a * 1.5)


def test_adapter_name_segment_and_weights_file_path(tmp_path):
    from safetensors.torch import load_file, save_file

    base = tiny_llama(layers=1)
    cfg = peft.LoraConfig(
        r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    folder, _, _ = _make_adapter(base, cfg, tmp_path)
    ref = ll.load_lora(folder)
    sd = load_file(folder / "adapter_model.safetensors")
    named = tmp_path / "named"
    named.mkdir()
    (named / "adapter_config.json").write_text((folder / "adapter_config.json").read_text())
    save_file(
        {k.replace(".weight", ".default.weight"): v for k, v in sd.items()},
        named / "adapter_model.safetensors",
    )
    got = ll.load_lora(named)
    assert (
        got.names
        == ref.names
        == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    )
    for name in ref.names:
        torch.testing.assert_close(got.delta_weights()[name], ref.delta_weights()[name])
    # the weights file itself, with its config beside it, reads the same
    by_file = ll.load_lora(folder / "adapter_model.safetensors")
    assert by_file.names == ref.names and by_file.metadata["format"] == "peft"


def test_lora_bias_is_kept_scaled_and_round_trips(tmp_path):
    base = ConvNet()
    cfg = peft.LoraConfig(
        r=2, lora_alpha=5, target_modules=["conv1", "head"], lora_bias=True, init_lora_weights=False
    )
    model = peft.get_peft_model(copy.deepcopy(base), cfg)
    for name, p in model.named_parameters():
        if "lora_B" in name and name.endswith("bias"):
            p.data.normal_()
    folder = tmp_path / "adapter"
    model.save_pretrained(str(folder))
    merged = model.merge_and_unload().state_dict()
    lora = ll.load_lora(folder)
    for name in lora.names:
        _assert_close(lora.delta_weights()[name], _peft_delta(base, merged, name))
        bias_delta = merged[f"{name}.bias"] - base.get_submodule(name).bias.detach()
        _assert_close(lora[name].meta["lora_bias"], bias_delta)
    _assert_same_merge(base, folder, ll.save_lora(lora, tmp_path / "saved"))


def test_peft_style_file_without_config_warns_and_assumes_scale_one(tmp_path):
    sd = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": seeded_randn(
            2, 8, seed=1
        ),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": seeded_randn(
            8, 2, seed=2
        ),
    }
    path = tmp_path / "adapter.safetensors"
    save_file(sd, path)
    assert ll.detect_format(path) == "peft"
    with pytest.warns(ll.LoRALensWarning, match="lora_alpha is unknown"):
        lora = ll.load_lora(path)
    assert lora.names == ["model.layers.0.self_attn.q_proj"] and lora.metadata["scale_assumed"]
    # on the command line: one warning line, not Python's form with a source path
    from typer.testing import CliRunner

    from loralens.cli import app

    res = CliRunner().invoke(app, ["inspect", str(path)])
    assert res.exit_code == 0, res.output
    assert "warning: " in res.stderr and "lora_alpha is unknown" in res.stderr
    assert "UserWarning" not in res.stderr and ".py:" not in res.stderr
