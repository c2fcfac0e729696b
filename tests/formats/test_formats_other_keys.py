"""Key schemes beyond PEFT/kohya/diffusers: XLabs Flux, ComfyUI-prefixed files, and files that
carry full (non-LoRA) weight differences beside the factors. Golden deltas from the raw tensors."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import save_file

import loralens as ll
from helpers import seeded_randn


def _check(layer, down, up, scale=1.0):
    golden = up.double().reshape(up.shape[0], -1) @ down.double().reshape(down.shape[0], -1)
    torch.testing.assert_close(layer.delta_weight().double(), golden * scale, rtol=1e-5, atol=1e-6)


def test_xlabs_flux_keys_are_plain_down_up_factors_at_scale_1(tmp_path):
    sd = {}
    for n, (name, out) in enumerate(
        [("qkv_lora1", 24), ("proj_lora1", 8), ("qkv_lora2", 24), ("proj_lora2", 8)]
    ):
        key = f"double_blocks.1.processor.{name}"
        sd[f"{key}.down.weight"] = seeded_randn(4, 8, seed=n)
        sd[f"{key}.up.weight"] = seeded_randn(out, 4, seed=10 + n)
    sd["single_blocks.0.processor.qkv_lora.down.weight"] = seeded_randn(4, 8, seed=20)
    sd["single_blocks.0.processor.qkv_lora.up.weight"] = seeded_randn(24, 4, seed=21)
    path = tmp_path / "xlabs.safetensors"
    save_file(sd, path)
    assert ll.detect_format(path) == "xlabs"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # XLabs files have no alpha: scale 1 is their rule
        lora = ll.load_lora(path, canonical=False)  # the file's names (canonical: test_canonical)
    assert lora.metadata["format"] == "xlabs" and len(lora) == 5
    for layer in lora.layers:
        _check(layer, sd[f"{layer.name}.down.weight"], sd[f"{layer.name}.up.weight"])
        assert layer.meta["scale"] == 1.0
    assert "double_blocks.1.processor.qkv_lora1" in lora.names


def test_comfyui_file_with_alphas_is_named_comfyui_and_not_assumed(tmp_path):
    m = "diffusion_model.double_blocks.0.img_attn.qkv"
    sd = {
        f"{m}.lora_A.weight": seeded_randn(4, 16, seed=1),
        f"{m}.lora_B.weight": seeded_randn(48, 4, seed=2),
        f"{m}.alpha": torch.tensor(2.0),
    }
    path = tmp_path / "comfy.safetensors"
    save_file(sd, path)
    assert ll.detect_format(path) == "comfyui"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # alpha / r was applied: nothing is assumed
        lora = ll.load_lora(path, canonical=False)
    assert lora.metadata["format"] == "comfyui" and "scale_assumed" not in lora.metadata
    _check(lora[m], sd[f"{m}.lora_A.weight"], sd[f"{m}.lora_B.weight"], scale=0.5)


def test_peft_weights_file_warns_only_for_modules_without_alpha(tmp_path):
    a, b = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"
    sd = {
        f"{m}.lora_{x}.weight": seeded_randn(*s, seed=i)
        for i, m in enumerate((a, b))
        for x, s in (("A", (2, 8)), ("B", (6, 2)))
    }
    sd[f"{a}.alpha"] = torch.tensor(4.0)
    path = tmp_path / "weights.safetensors"
    save_file(sd, path)
    with pytest.warns(UserWarning, match="no alpha key for 1 module"):
        lora = ll.load_lora(path)
    assert lora.metadata["scale_assumed_modules"] == [b]
    assert lora[a].meta["scale"] == 2.0 and lora[b].meta["scale"] == 1.0
    sd[f"{b}.alpha"] = torch.tensor(2.0)
    save_file(sd, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lora = ll.load_lora(path)
    assert "scale_assumed" not in lora.metadata


@pytest.mark.parametrize("style", ["kohya", "comfyui"])
def test_full_weight_differences_are_listed_never_dropped(tmp_path, style):
    if style == "kohya":
        m, down, up = "lora_unet_mid_block_proj_in", "lora_down.weight", "lora_up.weight"
        extra = ["lora_unet_mid_block_norm.diff", "lora_unet_mid_block_norm.diff_b"]
    else:
        m, down, up = "diffusion_model.blocks.0.attn.q", "lora_A.weight", "lora_B.weight"
        extra = ["diffusion_model.blocks.0.norm1.diff", "diffusion_model.blocks.0.attn.q.diff_b"]
    sd = {f"{m}.{down}": seeded_randn(2, 8, seed=1), f"{m}.{up}": seeded_randn(6, 2, seed=2)}
    sd |= {k: seeded_randn(6, seed=3 + i) for i, k in enumerate(extra)}
    path = tmp_path / "with_diff.safetensors"
    save_file(sd, path)
    assert ll.detect_format(path) == style
    lora = ll.load_lora(path)
    assert lora.names == [m] and sorted(lora.metadata["non_lora_keys"]) == sorted(extra)
    _check(lora[m], sd[f"{m}.{down}"], sd[f"{m}.{up}"])
