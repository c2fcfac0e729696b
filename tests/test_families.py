"""Base-model families from module names and shapes: each well-known layout is recognised from
real-shaped rank-1 adapters under its real module names, several fitting families are all
named, and a layout no family has is "unknown"."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from helpers import seeded_randn, write_peft_adapter
from loralens.families import FAMILIES, guess_base_model, matching_families
from loralens.inspection import inspect_adapter


def _fits(layers: dict[str, tuple[int, int]]) -> list[str]:
    return [f.name for f, _ in matching_families(list(layers), list(layers.values()))]


def _kohya_file(path, layers: dict[str, tuple[int, int]], metadata=None):
    """A kohya file of rank-1 factors with the given module stems and (out, in) shapes."""
    t = {}
    for k, (stem, (out, inn)) in enumerate(layers.items()):
        t[f"{stem}.lora_down.weight"] = seeded_randn(1, inn, seed=k)
        t[f"{stem}.lora_up.weight"] = seeded_randn(out, 1, seed=k + 100)
        t[f"{stem}.alpha"] = torch.tensor(1.0)
    save_file(t, path, metadata=metadata)
    return path


SDXL_KOHYA = {
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": (640, 2048),
    "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q": (640, 640),
    "lora_unet_middle_block_1_transformer_blocks_9_ff_net_0_proj": (10240, 1280),
    "lora_unet_output_blocks_0_1_transformer_blocks_3_attn2_to_v": (1280, 2048),
    "lora_te1_text_model_encoder_layers_11_self_attn_q_proj": (768, 768),
    "lora_te2_text_model_encoder_layers_31_mlp_fc1": (5120, 1280),
}


def test_sdxl_kohya_file_fits_sdxl_only(tmp_path):
    path = _kohya_file(tmp_path / "sdxl.safetensors", SDXL_KOHYA)
    guess = inspect_adapter(path)["base_model_guess"]
    assert guess["name"] == "Stable Diffusion XL" and guess["source"] == "layout"
    assert guess["candidates"] == ["Stable Diffusion XL"] and guess["family"] == "unet"
    assert guess["matched_layers"] == len(SDXL_KOHYA) and guess["hidden_size"] == 2048


def test_llama_2_7b_peft_adapter_fits_llama_2_7b_only(tmp_path):
    shapes = {
        "model.layers.0.self_attn.q_proj": (4096, 4096),
        "model.layers.0.self_attn.k_proj": (4096, 4096),
        "model.layers.31.mlp.down_proj": (4096, 11008),
    }
    tensors = {}
    for k, (name, (out, inn)) in enumerate(shapes.items()):
        tensors[f"base_model.model.{name}.lora_A.weight"] = seeded_randn(1, inn, seed=k)
        tensors[f"base_model.model.{name}.lora_B.weight"] = seeded_randn(out, 1, seed=k + 9)
    folder = write_peft_adapter(tmp_path / "llama", tensors, {"r": 1, "lora_alpha": 1})
    guess = inspect_adapter(folder)["base_model_guess"]
    assert (guess["name"], guess["candidates"]) == ("Llama-2-7B", ["Llama-2-7B"])
    assert (guess["family"], guess["hidden_size"], guess["blocks"]) == ("decoder", 4096, 32)


@pytest.mark.parametrize(
    ("layers", "expected"),
    [
        (  # Llama-3-8B and Mistral-7B share every shape: both named, neither picked
            {"model.layers.3.self_attn.k_proj": (1024, 4096)},
            ["Llama-3-8B / Llama-3.1-8B", "Mistral-7B"],
        ),
        ({"model.layers.0.self_attn.q_proj": (4096, 3072)}, ["Gemma-7B"]),
        ({"model.layers.2.self_attn.qkv_proj": (9216, 3072)}, ["Phi-3-mini / Phi-3.5-mini"]),
        ({"model.layers.5.mlp.fc1": (10240, 2560)}, ["Phi-2"]),
        ({"transformer.h.23.attn.c_attn": (3072, 1024)}, ["GPT-2 medium"]),
        ({"model.layers.20.mlp.up_proj": (4864, 896)}, ["Qwen2-0.5B / Qwen2.5-0.5B"]),
        (
            {"unet.down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k": (320, 768)},
            ["Stable Diffusion 1.x"],
        ),
        (
            {"lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_v": (320, 1024)},
            ["Stable Diffusion 2.x"],
        ),
        (  # self-attention only: the three UNets share these shapes
            {"lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q": (1280, 1280)},
            ["Stable Diffusion 1.x", "Stable Diffusion 2.x", "Stable Diffusion XL"],
        ),
        (
            {"diffusion_model.double_blocks.18.img_attn.qkv": (9216, 3072)},
            ["Flux.1 (dev / schnell)"],
        ),
        ({"lora_unet_single_blocks_37_linear2": (3072, 15360)}, ["Flux.1 (dev / schnell)"]),
        ({"double_blocks.0.processor.qkv_lora1": (9216, 3072)}, ["Flux.1 (dev / schnell)"]),
        (
            {"transformer.single_transformer_blocks.37.attn.to_q": (3072, 3072)},
            ["Flux.1 (dev / schnell)"],
        ),
        (
            {"transformer.transformer_blocks.23.attn.to_q": (1536, 1536)},
            ["SD3 Medium / SD3.5 Medium"],
        ),
        ({"lora_unet_joint_blocks_37_x_block_attn_qkv": (7296, 2432)}, ["SD3.5 Large"]),
    ],
)
def test_each_layout_fits_exactly_its_families(layers, expected):
    assert _fits(layers) == expected


@pytest.mark.parametrize(
    ("layers", "kind"),
    [
        ({"model.layers.0.self_attn.q_proj": (4000, 4096)}, "decoder"),  # no such width
        ({"model.layers.32.self_attn.q_proj": (4096, 4096)}, "decoder"),  # a 33rd 7B block
        (  # one layer fits Llama-2-7B, the other does not: the adapter does not fit it
            {
                "model.layers.0.self_attn.q_proj": (4096, 4096),
                "model.layers.0.mlp.down_proj": (4096, 14000),
            },
            "decoder",
        ),
        (  # SDXL's cross-attention width at SD1's 320 channels
            {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": (320, 2048)},
            "unet",
        ),
        ({"some.custom.module": (4096, 4096)}, None),  # a name no family has
    ],
)
def test_layouts_no_family_has_are_unknown(layers, kind):
    assert _fits(layers) == []
    rows = [{"name": n, "shape": list(s)} for n, s in layers.items()]
    guess = guess_base_model({"layers": rows})
    assert guess["name"] is None and guess["source"] is None and guess["candidates"] == []
    assert guess["family"] == kind and guess["hidden_size"] is None


def test_the_files_own_word_comes_first_and_the_layout_is_still_reported(tmp_path):
    meta = {"ss_sd_model_name": "sd_xl_base_1.0.safetensors"}
    path = _kohya_file(tmp_path / "said.safetensors", SDXL_KOHYA, meta)
    guess = inspect_adapter(path)["base_model_guess"]
    assert (guess["name"], guess["source"]) == ("sd_xl_base_1.0.safetensors", "metadata")
    assert guess["candidates"] == ["Stable Diffusion XL"]


def test_family_names_are_unique_and_kinds_known():
    names = [f.name for f in FAMILIES]
    assert len(names) == len(set(names))
    assert {f.kind for f in FAMILIES} == {"unet", "mmdit", "flux", "decoder", "gpt2"}


def test_one_label_for_every_kind_of_guess(tmp_path):
    """The line `inspect`, its summary and the page show: the file's word, a local folder by its
    last part, the fitting families, or the architecture where no well-known size fits."""

    def label(layers, said=None):
        rows = [{"name": n, "shape": list(s)} for n, s in layers.items()]
        return guess_base_model({"layers": rows, "base_model": said})["label"]

    gpt2_124m = {f"transformer.h.{i}.attn.c_attn": (2304, 768) for i in range(12)}
    assert label(gpt2_124m) == "GPT-2 (124M) (from its layout)"
    tiny_gpt2 = {f"transformer.h.{i}.attn.c_attn": (192, 64) for i in range(2)}
    assert label(tiny_gpt2) == "unknown GPT-2-like model (2 blocks)"
    assert label({"transformer.h.0.attn.c_attn": (192, 64)}) == "unknown GPT-2-like model (1 block)"
    assert label({"some.custom.module": (4, 4)}) == "unknown"
    assert (
        label(tiny_gpt2, "gpt2")
        == "gpt2 (from the file); layout: unknown GPT-2-like model (2 blocks)"
    )
    assert label(gpt2_124m, "/home/me/.cache/loralens/skills-lm-s0-1234/") == (
        "skills-lm-s0-1234 (a local folder); layout: GPT-2 (124M)"
    )
    assert (
        label({"some.custom.module": (4, 4)}, "C:\\models\\my-base") == "my-base (a local folder)"
    )
    hub_copy = "/root/.cache/huggingface/hub/models--openai-community--gpt2/snapshots/607a30d7/"
    assert label(gpt2_124m, hub_copy) == (
        "openai-community/gpt2 (a local copy from the hub); layout: GPT-2 (124M)"
    )
    assert (
        label({"some.custom.module": (4, 4)}, "owner/base-model")
        == "owner/base-model (from the file)"
    )
