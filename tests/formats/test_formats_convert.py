"""convert, checked by the libraries that load its output: PEFT's ``PeftModel.from_pretrained``
and diffusers' own LoRA loading merge the written files into tiny models (built from configs, no
downloads) to the deltas of the source, computed here from the raw tensors."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import loralens as ll
from helpers import tiny_unet

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

UNET_MODULES = (
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_v",
    "down_blocks.1.resnets.0.conv1",
    "mid_block.attentions.0.proj_in",
    "conv_in",
)
TE_MODULES = ("text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.1.mlp.fc2")


def tiny_clip(cls_name="CLIPTextModel"):
    """A 16-wide CLIP text encoder. transformers 5's CLIPTextModel has no ``text_model.`` level
    (``encoder.layers.*``; diffusers strips the prefix when loading); CLIPTextModelWithProjection
    (SDXL's second encoder) keeps it, as every LoRA file names it."""
    torch.manual_seed(0)
    cfg = transformers.CLIPTextConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        eos_token_id=2,
        projection_dim=16,
    )
    return getattr(transformers, cls_name)(cfg)


def module_path(model, name):
    """``name`` (a LoRA file's CLIP path) as ``model`` has it."""
    return name if hasattr(model, "text_model") else name.removeprefix("text_model.")


def kohya_file(path, unet, clip, *, ranks=(2, 3), alphas=(1.0, 6.0)):
    """A kohya file over UNET_MODULES and TE_MODULES, ranks and alphas alternating per module;
    returns {canonical name: golden delta (out x in[*k]) in float64}."""
    g = torch.Generator().manual_seed(0)
    sd, golden = {}, {}
    modules = [("unet", "lora_unet_", unet, m) for m in UNET_MODULES]
    modules += [("text_encoder", "lora_te_", clip, m) for m in TE_MODULES]
    for i, (component, prefix, model, m) in enumerate(modules):
        w = model.get_submodule(module_path(model, m)).weight
        r, alpha = ranks[i % 2], alphas[i % 2]
        stem = prefix + m.replace(".", "_")
        down = torch.randn(r, *w.shape[1:], generator=g)
        up = torch.randn(w.shape[0], r, *[1] * (w.ndim - 2), generator=g)
        sd |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up}
        sd[f"{stem}.alpha"] = torch.tensor(alpha)
        golden[f"{component}.{m}"] = (
            up.double().reshape(up.shape[0], -1) @ down.double().reshape(r, -1) * alpha / r
        )
    save_file(sd, path)
    return golden


def merged_deltas(model, folder, names):
    """What PEFT merges into ``names`` of ``model`` from the adapter ``folder``."""
    base = copy.deepcopy(model)
    merged = peft.PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    out = {}
    for n in names:
        d = merged.get_submodule(n).weight - base.get_submodule(n).weight
        out[n] = d.detach().double().reshape(d.shape[0], -1)
    return out


def assert_rel(a, b, rel=2e-5):
    a, b = a.double(), b.double()
    assert a.shape == b.shape, (a.shape, b.shape)
    assert float((a - b).norm() / b.norm()) < rel


def test_kohya_to_peft_loads_in_peft_to_the_same_merge(tmp_path):
    unet = tiny_unet()
    golden = kohya_file(tmp_path / "k.safetensors", unet, tiny_clip())
    unet_only = tmp_path / "unet.safetensors"
    with safe_open(tmp_path / "k.safetensors", "pt") as f:
        keys = [k for k in f.keys() if k.startswith("lora_unet_")]  # noqa: SIM118 (not a dict)
        save_file({k: f.get_tensor(k) for k in keys}, unet_only)
    out = ll.convert(unet_only, tmp_path / "peft", to="peft")
    got = merged_deltas(unet, out, UNET_MODULES)
    for m in UNET_MODULES:
        assert_rel(got[m], golden[f"unet.{m}"])
    cfg = peft.LoraConfig.from_pretrained(str(out))
    assert set(cfg.target_modules) == set(UNET_MODULES)
    # rank and alpha per module as read: rank 2 alpha 1 (three modules), rank 3 alpha 6 (two)
    assert (cfg.r, cfg.lora_alpha) == (2, 1.0)
    assert sorted(cfg.rank_pattern.values()) == [3, 3]
    assert sorted(cfg.alpha_pattern.values()) == [6.0, 6.0]


def test_a_file_of_several_models_is_refused_as_one_peft_adapter(tmp_path):
    kohya_file(tmp_path / "k.safetensors", tiny_unet(), tiny_clip())
    with pytest.raises(ValueError, match=r"several models.*text_encoder, unet"):
        ll.convert(tmp_path / "k.safetensors", tmp_path / "peft", to="peft")
    assert not (tmp_path / "peft").exists()


def test_kohya_to_diffusers_loads_with_diffusers_own_loader(tmp_path):
    unet, clip = tiny_unet(), tiny_clip()
    base_unet, base_clip = copy.deepcopy(unet), copy.deepcopy(clip)
    golden = kohya_file(tmp_path / "k.safetensors", unet, clip)
    out = ll.convert(tmp_path / "k.safetensors", tmp_path / "d.safetensors", to="diffusers")
    assert ll.detect_format(out) == "diffusers"
    pipe = diffusers.StableDiffusionPipeline
    state, alphas, metadata = pipe.lora_state_dict(
        str(tmp_path), weight_name=out.name, return_lora_metadata=True
    )
    assert alphas is None and metadata["unet.alpha_pattern"]
    pipe.load_lora_into_unet(state, alphas, unet, metadata=metadata, adapter_name="c")
    pipe.load_lora_into_text_encoder(state, alphas, clip, metadata=metadata, adapter_name="c")
    unet.fuse_lora(lora_scale=1.0)
    for model, base, component, modules in (
        (unet, base_unet, "unet", UNET_MODULES),
        (clip, base_clip, "text_encoder", TE_MODULES),
    ):
        for m in modules:
            module = model.get_submodule(module_path(model, m))
            if component == "text_encoder":
                module.merge()
            w = getattr(module, "base_layer", module).weight
            d = (w - base.get_submodule(module_path(model, m)).weight).detach()
            assert_rel(d.reshape(d.shape[0], -1), golden[f"{component}.{m}"])


def test_round_trips_keep_factors_ranks_and_alphas(tmp_path):
    golden = kohya_file(tmp_path / "k.safetensors", tiny_unet(), tiny_clip())
    d = ll.convert(tmp_path / "k.safetensors", tmp_path / "d.safetensors", to="diffusers")
    k = ll.convert(d, tmp_path / "k2.safetensors", to="kohya")
    with safe_open(tmp_path / "k.safetensors", "pt") as a, safe_open(k, "pt") as b:
        keys = a.keys()
        assert set(keys) == set(b.keys())
        for key in keys:
            torch.testing.assert_close(b.get_tensor(key), a.get_tensor(key), rtol=1e-6, atol=0)
    back = ll.load_lora(k)
    assert back.names == sorted(golden, key=ll.formats.keys.natural_key)
    for name, g in golden.items():
        assert_rel(back[name].delta_weight(), g, 1e-6)


def test_loha_text_encoder_to_peft_is_plain_lora_at_the_exact_rank(tmp_path):
    clip = tiny_clip("CLIPTextModelWithProjection")
    g = torch.Generator().manual_seed(3)
    stem = "lora_te_" + TE_MODULES[0].replace(".", "_")
    w1a, w1b = torch.randn(16, 2, generator=g), torch.randn(2, 16, generator=g)
    w2a, w2b = torch.randn(16, 3, generator=g), torch.randn(3, 16, generator=g)
    t = {"hada_w1_a": w1a, "hada_w1_b": w1b, "hada_w2_a": w2a, "hada_w2_b": w2b}
    sd = {f"{stem}.{k}": v for k, v in t.items()} | {f"{stem}.alpha": torch.tensor(1.0)}
    save_file(sd, tmp_path / "loha.safetensors")
    golden = (w1a.double() @ w1b.double()) * (w2a.double() @ w2b.double()) * 1.0 / 2
    out = ll.convert(tmp_path / "loha.safetensors", tmp_path / "peft", to="peft")
    cfg = peft.LoraConfig.from_pretrained(str(out))
    assert cfg.r == 6  # r1 r2: the face-splitting product's exact rank
    assert_rel(merged_deltas(clip, out, TE_MODULES[:1])[TE_MODULES[0]], golden)


def test_existing_output_and_unknown_target_are_refused(tmp_path):
    kohya_file(tmp_path / "k.safetensors", tiny_unet(), tiny_clip())
    (tmp_path / "taken.safetensors").write_bytes(b"")
    with pytest.raises(ll.errors.OutputExistsError, match="already exists"):
        ll.convert(tmp_path / "k.safetensors", tmp_path / "taken.safetensors", to="kohya")
    with pytest.raises(ValueError, match="unknown target format 'onnx'"):
        ll.convert(tmp_path / "k.safetensors", tmp_path / "x", to="onnx")
    folder = tmp_path / "llm"
    ll.save_lora(
        ll.LoRA([ll.LoRALayer("model.layers.0.q", torch.ones(4, 1), torch.ones(4, 1))]), folder
    )
    with pytest.raises(ValueError, match="no diffusion pipeline component"):
        ll.convert(folder, tmp_path / "x.safetensors", to="diffusers")
    with pytest.raises(ValueError, match="Stable Diffusion pipelines"):
        ll.convert(folder, tmp_path / "x.safetensors", to="kohya")
