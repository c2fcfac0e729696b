"""Stable Diffusion LoRA files checked against diffusers itself on a tiny random UNet (no downloads).

The deltas load_lora reads equal what diffusers fuses into the UNet's weights (``fuse_lora``).
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

import loralens as ll
from helpers import tiny_unet

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")


def _fused_delta(unet, base, name):
    module = unet.get_submodule(name)
    w = getattr(module, "base_layer", module).weight.detach()
    d = w - base.get_submodule(name).weight.detach()
    return d.reshape(d.shape[0], -1)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_kohya_file_matches_diffusers_fuse(tmp_path):
    unet = tiny_unet(layers_per_block=1)
    base = copy.deepcopy(unet)
    names = [n for n, _ in unet.named_modules() if n.endswith(("attn1.to_q", "attn2.to_v"))]
    names += ["conv_in", "down_blocks.0.resnets.0.conv1"]
    g = torch.Generator().manual_seed(1)
    sd = {}
    for i, name in enumerate(names):
        w = unet.get_submodule(name).weight
        key, r = "lora_unet_" + name.replace(".", "_"), 2 + i % 2
        ones = [1] * (w.ndim - 2)
        sd[f"{key}.lora_down.weight"] = torch.randn(r, *w.shape[1:], generator=g)
        sd[f"{key}.lora_up.weight"] = torch.randn(w.shape[0], r, *ones, generator=g)
        # one network_alpha for the file, as kohya's trainer writes it (diffusers applies
        # per-module alphas of attention layers differently from kohya: see formats/kohya.py)
        sd[f"{key}.alpha"] = torch.tensor(3.0)
    path = tmp_path / "kohya.safetensors"
    save_file(sd, path)

    state, alphas = diffusers.StableDiffusionPipeline.lora_state_dict(
        str(tmp_path), weight_name=path.name
    )
    unet.load_lora_adapter(state, network_alphas=alphas, prefix="unet", adapter_name="k")
    unet.fuse_lora(lora_scale=1.0)
    lora = ll.load_lora(path)
    assert len(lora) == len(names)
    for name in names:
        layer = lora["unet." + name]  # canonical: the module path diffusers loads
        assert layer.meta["file_key"] == "lora_unet_" + name.replace(".", "_")
        assert _rel(layer.delta_weight(), _fused_delta(unet, base, name)) < 1e-5


def test_diffusers_save_lora_weights_file_matches_fuse(tmp_path):
    from peft.utils import get_peft_model_state_dict

    unet = tiny_unet(layers_per_block=1)
    base = copy.deepcopy(unet)
    cfg = peft.LoraConfig(
        r=4,
        lora_alpha=6,
        target_modules=["to_q", "to_v", "conv1"],
        rank_pattern={"to_v": 2},
        init_lora_weights=False,
    )
    unet.add_adapter(cfg)
    diffusers.StableDiffusionPipeline.save_lora_weights(
        str(tmp_path),
        unet_lora_layers=get_peft_model_state_dict(unet),
        unet_lora_adapter_metadata=cfg.to_dict(),
    )
    assert ll.detect_format(tmp_path) == "diffusers"
    lora = ll.load_lora(tmp_path)
    unet.fuse_lora(lora_scale=1.0)
    kinds = set()
    for layer in lora.layers:
        assert layer.name.startswith("unet.")
        kinds.add(layer.meta["kind"])
        assert (
            _rel(layer.delta_weight(), _fused_delta(unet, base, layer.name[len("unet.") :])) < 1e-5
        )
    assert kinds == {"linear", "conv"}
    assert {la.meta["scale"] for la in lora.layers} == {1.5, 3.0}
