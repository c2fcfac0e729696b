"""kohya and diffusers single-file LoRAs, built here with safetensors, with alphas and metadata."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import loralens as ll


def _rand(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


ATTN = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1"
TE1 = "lora_te1_text_model_encoder_layers_{}_self_attn_q_proj"


def _kohya_file(tmp_path, dtype=torch.float16):
    sd = {}
    # to_q: alpha 2 at rank 4 -> scale 0.5; to_k: alpha 0 -> alpha = rank; to_v: no alpha
    for j, (mod, alpha) in enumerate([("to_q", 2.0), ("to_k", 0.0), ("to_v", None)]):
        sd[f"{ATTN}_{mod}.lora_down.weight"] = _rand(4, 32, seed=j, dtype=dtype)
        sd[f"{ATTN}_{mod}.lora_up.weight"] = _rand(32, 4, seed=10 + j, dtype=dtype)
        if alpha is not None:
            sd[f"{ATTN}_{mod}.alpha"] = torch.tensor(alpha, dtype=dtype)
    # a 3x3 conv LoRA: down is a conv with the base kernel, up a 1x1 conv; alpha 8 at rank 4
    sd["lora_unet_conv_in.lora_down.weight"] = _rand(4, 3, 3, 3, seed=20, dtype=dtype)
    sd["lora_unet_conv_in.lora_up.weight"] = _rand(8, 4, 1, 1, seed=21, dtype=dtype)
    sd["lora_unet_conv_in.alpha"] = torch.tensor(8.0, dtype=dtype)
    # text encoders, layers 10 and 2 (natural order puts 2 first), SD1 and SDXL prefixes
    for i in (10, 2):
        sd[TE1.format(i) + ".lora_down.weight"] = _rand(2, 16, seed=30 + i, dtype=dtype)
        sd[TE1.format(i) + ".lora_up.weight"] = _rand(16, 2, seed=40 + i, dtype=dtype)
        sd[TE1.format(i) + ".alpha"] = torch.tensor(1.0, dtype=dtype)
    sd["lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = _rand(
        2, 16, seed=50, dtype=dtype
    )
    sd["lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = _rand(
        24, 2, seed=51, dtype=dtype
    )
    path = tmp_path / "kohya.safetensors"
    save_file(sd, path, metadata={"ss_network_dim": "4", "ss_network_alpha": "2"})
    return path, sd


def test_kohya_alpha_rules_conv_and_metadata(tmp_path):
    path, sd = _kohya_file(tmp_path)
    assert ll.detect_format(path) == "kohya"
    lora = ll.load_lora(path)
    assert lora.metadata["format"] == "kohya"
    assert lora.metadata["safetensors_metadata"]["ss_network_dim"] == "4"
    assert lora.names == [
        "lora_te1_text_model_encoder_layers_2_self_attn_q_proj",
        "lora_te1_text_model_encoder_layers_10_self_attn_q_proj",
        "lora_te2_text_model_encoder_layers_0_mlp_fc1",
        "lora_unet_conv_in",
        f"{ATTN}_to_k",
        f"{ATTN}_to_q",
        f"{ATTN}_to_v",
    ]
    scales = {
        f"{ATTN}_to_q": 0.5,
        f"{ATTN}_to_k": 1.0,
        f"{ATTN}_to_v": 1.0,
        "lora_unet_conv_in": 2.0,
    }
    for layer in lora.layers:
        down = sd[layer.name + ".lora_down.weight"].float()
        up = sd[layer.name + ".lora_up.weight"].float()
        scale = scales.get(layer.name, 0.5 if "te1" in layer.name else 1.0)
        assert layer.meta["scale"] == pytest.approx(scale)
        _close(
            layer.delta_weight(),
            up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1) * scale,
        )
        assert layer.U.dtype == torch.float32
    conv = lora["lora_unet_conv_in"]
    assert (
        conv.shape == (8, 27) and conv.meta["kind"] == "conv" and conv.meta["kernel_size"] == [3, 3]
    )


def test_kohya_reads_same_from_a_weights_only_bin(tmp_path):
    path, sd = _kohya_file(tmp_path, dtype=torch.float32)
    torch.save(sd, tmp_path / "kohya.bin")
    a, b = ll.load_lora(path), ll.load_lora(tmp_path / "kohya.bin")
    assert a.names == b.names
    for name in a.names:
        _close(a.delta_weights()[name], b.delta_weights()[name])


def test_diffusers_old_style_keys_with_alpha_and_processor_names(tmp_path):
    blk = "unet.down_blocks.0.attentions.0.transformer_blocks.0"
    sd = {
        f"{blk}.attn1.to_q.lora.down.weight": _rand(4, 32, seed=1),
        f"{blk}.attn1.to_q.lora.up.weight": _rand(32, 4, seed=2),
        f"{blk}.attn1.to_q.alpha": torch.tensor(8.0),
        f"{blk}.attn2.processor.to_out_lora.down.weight": _rand(4, 32, seed=3),
        f"{blk}.attn2.processor.to_out_lora.up.weight": _rand(32, 4, seed=4),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight": _rand(
            2, 16, seed=5
        ),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight": _rand(
            16, 2, seed=6
        ),
    }
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(sd, path)
    assert ll.detect_format(path) == "diffusers"
    assert ll.detect_format(tmp_path) == "diffusers"  # a folder holding one such file
    lora = ll.load_lora(tmp_path)
    assert lora.names == [
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj",
        f"{blk}.attn1.to_q",
        f"{blk}.attn2.to_out.0",
    ]
    q = lora[f"{blk}.attn1.to_q"]
    assert q.meta["scale"] == 2.0
    _close(
        q.delta_weight(),
        sd[f"{blk}.attn1.to_q.lora.up.weight"] @ sd[f"{blk}.attn1.to_q.lora.down.weight"] * 2,
    )
    assert lora[f"{blk}.attn2.to_out.0"].meta["scale"] == 1.0


def test_diffusers_peft_style_keys_scale_from_header_metadata(tmp_path):
    blk = "unet.mid_block.attentions.0.transformer_blocks.0.attn1"
    sd = {
        f"{blk}.to_q.lora_A.weight": _rand(4, 32, seed=1),
        f"{blk}.to_q.lora_B.weight": _rand(32, 4, seed=2),
        f"{blk}.to_k.lora_A.weight": _rand(2, 32, seed=3),
        f"{blk}.to_k.lora_B.weight": _rand(32, 2, seed=4),
        "text_encoder.text_model.encoder.layers.0.self_attn.k_proj.lora_A.weight": _rand(
            4, 16, seed=5
        ),
        "text_encoder.text_model.encoder.layers.0.self_attn.k_proj.lora_B.weight": _rand(
            16, 4, seed=6
        ),
    }
    # what diffusers' save_lora_weights(unet_lora_adapter_metadata=...) writes: unet config only
    meta = {
        "unet.r": 4,
        "unet.lora_alpha": 8,
        "unet.rank_pattern": {"to_k": 2},
        "unet.alpha_pattern": {},
    }
    path = tmp_path / "lora.safetensors"
    save_file(sd, path, metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
    assert ll.detect_format(path) == "diffusers"
    lora = ll.load_lora(path)
    assert lora[f"{blk}.to_q"].meta["scale"] == 2.0
    assert lora[f"{blk}.to_k"].meta["scale"] == 4.0  # rank_pattern r=2, lora_alpha 8
    te = lora["text_encoder.text_model.encoder.layers.0.self_attn.k_proj"]
    assert te.meta["scale"] == 1.0  # no config for the text encoder: alpha = rank
    _close(
        lora[f"{blk}.to_q"].delta_weight(),
        sd[f"{blk}.to_q.lora_B.weight"] @ sd[f"{blk}.to_q.lora_A.weight"] * 2,
    )


def test_peft_style_file_without_config_warns_and_assumes_scale_one(tmp_path):
    sd = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": _rand(2, 8, seed=1),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": _rand(8, 2, seed=2),
    }
    path = tmp_path / "adapter.safetensors"
    save_file(sd, path)
    assert ll.detect_format(path) == "peft"
    with pytest.warns(UserWarning, match="lora_alpha is unknown"):
        lora = ll.load_lora(path)
    assert lora.names == ["model.layers.0.self_attn.q_proj"] and lora.metadata["scale_assumed"]
