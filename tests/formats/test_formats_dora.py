"""DoRA magnitudes in their three conventions: PEFT's lora_magnitude_vector (one per output row),
LyCORIS' dora_scale out x 1 (the same), kohya/ComfyUI's dora_scale 1 x in (one per input column).
Each is recorded as read, written in a format that holds it, and refused where it would change
meaning; PEFT's own DoRA merge is the reference."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_formats_canonical import tiny_unet

import loralens as ll

peft = pytest.importorskip("peft")

MODULES = ["to_q", "to_v", "conv1"]


def _peft_dora(tmp_path):
    """A PEFT DoRA adapter on the tiny UNet (magnitudes moved off the weight norms); returns
    (folder, what PEFT's merge gives)."""
    unet = tiny_unet()
    cfg = peft.LoraConfig(
        r=2, lora_alpha=3, use_dora=True, target_modules=MODULES, init_lora_weights=False
    )
    model = peft.get_peft_model(copy.deepcopy(unet), cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.5 * torch.rand(p.shape, generator=g))
    model.save_pretrained(str(tmp_path / "dora"))
    merged = model.merge_and_unload().state_dict()
    return tmp_path / "dora", merged


def _merge(folder):
    return peft.PeftModel.from_pretrained(tiny_unet(), str(folder)).merge_and_unload().state_dict()


def test_peft_dora_through_kohya_and_back_merges_the_same_in_peft(tmp_path):
    folder, merged = _peft_dora(tmp_path)
    lora = ll.load_lora(folder)
    assert {la.meta["magnitude_convention"] for la in lora.layers} == {"per_output"}
    kohya = ll.convert(folder, tmp_path / "k.safetensors", to="kohya")
    with safe_open(kohya, "pt") as f:
        scales = {k: f.get_slice(k).get_shape() for k in f.keys() if k.endswith("dora_scale")}  # noqa: SIM118
    assert scales and all(s[0] > 1 and set(s[1:]) == {1} for s in scales.values())  # out x 1
    again = ll.load_lora(kohya)
    assert again.names == lora.names
    for a, b in zip(lora.layers, again.layers):
        assert b.meta["magnitude_convention"] == "per_output"
        torch.testing.assert_close(b.meta["magnitude"].reshape(-1), a.meta["magnitude"].reshape(-1))
    back = _merge(ll.convert(kohya, tmp_path / "p", to="peft"))
    for key, w in merged.items():
        torch.testing.assert_close(back[key], w, rtol=1e-5, atol=1e-6)


def _kohya_dora(path, scale_shape):
    g = torch.Generator().manual_seed(1)
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file(
        {
            f"{stem}.lora_down.weight": torch.randn(2, 8, generator=g),
            f"{stem}.lora_up.weight": torch.randn(8, 2, generator=g),
            f"{stem}.alpha": torch.tensor(2.0),
            f"{stem}.dora_scale": torch.rand(scale_shape, generator=g) + 0.5,
        },
        path,
    )
    return stem


@pytest.mark.parametrize(
    ("shape", "convention"), [((1, 8), "per_input"), ((8,), "unknown"), ((8, 1), "per_output")]
)
def test_kohya_dora_scale_convention_is_recorded_and_only_peft_compatible_ones_convert(
    tmp_path, shape, convention
):
    """A square layer: only the dora_scale's shape says which way it normalizes."""
    path = tmp_path / "k.safetensors"
    stem = _kohya_dora(path, shape)
    (layer,) = ll.load_lora(path).layers
    assert layer.meta["magnitude_convention"] == convention
    kept = ll.convert(path, tmp_path / "k2.safetensors", to="kohya")
    with safe_open(path, "pt") as a, safe_open(kept, "pt") as b:
        key = f"{stem}.dora_scale"
        torch.testing.assert_close(
            b.get_tensor(key), a.get_tensor(key).reshape(b.get_tensor(key).shape)
        )
        assert b.get_slice(key).get_shape() == list(shape) or convention == "per_output"
    if convention == "per_output":
        ll.convert(path, tmp_path / "p", to="peft")
        assert ll.load_lora(tmp_path / "p").layers[0].meta["magnitude"].shape == (8,)
        return
    for to, out in (("peft", tmp_path / "p"), ("diffusers", tmp_path / "d.safetensors")):
        with pytest.raises(ValueError, match=f"DoRA magnitude is {convention}"):
            ll.convert(path, out, to=to)
