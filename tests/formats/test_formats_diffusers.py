"""diffusers single-file LoRAs, built here with safetensors: old and PEFT-style keys, alpha keys
and the per-component configs in the header metadata."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

import loralens as ll
from helpers import assert_close_f32, seeded_randn


def test_diffusers_old_style_keys_with_alpha_and_processor_names(tmp_path):
    blk = "unet.down_blocks.0.attentions.0.transformer_blocks.0"
    sd = {
        f"{blk}.attn1.to_q.lora.down.weight": seeded_randn(4, 32, seed=1),
        f"{blk}.attn1.to_q.lora.up.weight": seeded_randn(32, 4, seed=2),
        f"{blk}.attn1.to_q.alpha": torch.tensor(8.0),
        f"{blk}.attn2.processor.to_out_lora.down.weight": seeded_randn(4, 32, seed=3),
        f"{blk}.attn2.processor.to_out_lora.up.weight": seeded_randn(32, 4, seed=4),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight": seeded_randn(
            2, 16, seed=5
        ),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight": seeded_randn(
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
    assert_close_f32(
        q.delta_weight(),
        sd[f"{blk}.attn1.to_q.lora.up.weight"] @ sd[f"{blk}.attn1.to_q.lora.down.weight"] * 2,
    )
    assert lora[f"{blk}.attn2.to_out.0"].meta["scale"] == 1.0


def test_diffusers_peft_style_keys_scale_from_header_metadata(tmp_path):
    blk = "unet.mid_block.attentions.0.transformer_blocks.0.attn1"
    sd = {
        f"{blk}.to_q.lora_A.weight": seeded_randn(4, 32, seed=1),
        f"{blk}.to_q.lora_B.weight": seeded_randn(32, 4, seed=2),
        f"{blk}.to_k.lora_A.weight": seeded_randn(2, 32, seed=3),
        f"{blk}.to_k.lora_B.weight": seeded_randn(32, 2, seed=4),
        "text_encoder.text_model.encoder.layers.0.self_attn.k_proj.lora_A.weight": seeded_randn(
            4, 16, seed=5
        ),
        "text_encoder.text_model.encoder.layers.0.self_attn.k_proj.lora_B.weight": seeded_randn(
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
    assert_close_f32(
        lora[f"{blk}.to_q"].delta_weight(),
        sd[f"{blk}.to_q.lora_B.weight"] @ sd[f"{blk}.to_q.lora_A.weight"] * 2,
    )
