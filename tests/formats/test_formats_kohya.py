"""kohya single-file LoRAs, built here with safetensors: alpha rules, conv layers, metadata."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import loralens as ll
from helpers import assert_close_f32, seeded_randn

ATTN = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1"
TE1 = "lora_te1_text_model_encoder_layers_{}_self_attn_q_proj"


def _kohya_file(tmp_path, dtype=torch.float16):
    sd = {}
    # to_q: alpha 2 at rank 4 -> scale 0.5; to_k: alpha 0 -> alpha = rank; to_v: no alpha
    for j, (mod, alpha) in enumerate([("to_q", 2.0), ("to_k", 0.0), ("to_v", None)]):
        sd[f"{ATTN}_{mod}.lora_down.weight"] = seeded_randn(4, 32, seed=j, dtype=dtype)
        sd[f"{ATTN}_{mod}.lora_up.weight"] = seeded_randn(32, 4, seed=10 + j, dtype=dtype)
        if alpha is not None:
            sd[f"{ATTN}_{mod}.alpha"] = torch.tensor(alpha, dtype=dtype)
    # a 3x3 conv LoRA: down is a conv with the base kernel, up a 1x1 conv; alpha 8 at rank 4
    sd["lora_unet_conv_in.lora_down.weight"] = seeded_randn(4, 3, 3, 3, seed=20, dtype=dtype)
    sd["lora_unet_conv_in.lora_up.weight"] = seeded_randn(8, 4, 1, 1, seed=21, dtype=dtype)
    sd["lora_unet_conv_in.alpha"] = torch.tensor(8.0, dtype=dtype)
    # text encoders, layers 10 and 2 (natural order puts 2 first), SD1 and SDXL prefixes
    for i in (10, 2):
        sd[TE1.format(i) + ".lora_down.weight"] = seeded_randn(2, 16, seed=30 + i, dtype=dtype)
        sd[TE1.format(i) + ".lora_up.weight"] = seeded_randn(16, 2, seed=40 + i, dtype=dtype)
        sd[TE1.format(i) + ".alpha"] = torch.tensor(1.0, dtype=dtype)
    sd["lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = seeded_randn(
        2, 16, seed=50, dtype=dtype
    )
    sd["lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight"] = seeded_randn(
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
    te, blk = "text_encoder.text_model.encoder.layers", "unet.down_blocks.0.attentions.0"
    assert lora.names == [  # canonical: the module paths diffusers loads, in model order
        f"{te}.2.self_attn.q_proj",
        f"{te}.10.self_attn.q_proj",
        "text_encoder_2.text_model.encoder.layers.0.mlp.fc1",
        "unet.conv_in",
        *(f"{blk}.transformer_blocks.0.attn1.to_{m}" for m in "kqv"),
    ]
    scales = {
        f"{ATTN}_to_q": 0.5,
        f"{ATTN}_to_k": 1.0,
        f"{ATTN}_to_v": 1.0,
        "lora_unet_conv_in": 2.0,
    }
    for layer in lora.layers:
        key = layer.meta["file_key"]
        down = sd[key + ".lora_down.weight"].float()
        up = sd[key + ".lora_up.weight"].float()
        scale = scales.get(key, 0.5 if "te1" in key else 1.0)
        assert layer.meta["scale"] == pytest.approx(scale)
        assert_close_f32(
            layer.delta_weight(),
            up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1) * scale,
        )
        assert layer.U.dtype == torch.float32
    conv = lora["unet.conv_in"]
    assert (
        conv.shape == (8, 27) and conv.meta["kind"] == "conv" and conv.meta["kernel_size"] == [3, 3]
    )


def test_kohya_reads_same_from_a_weights_only_bin(tmp_path):
    path, sd = _kohya_file(tmp_path, dtype=torch.float32)
    torch.save(sd, tmp_path / "kohya.bin")
    a, b = ll.load_lora(path), ll.load_lora(tmp_path / "kohya.bin")
    assert a.names == b.names
    for name in a.names:
        assert_close_f32(a.delta_weights()[name], b.delta_weights()[name])
