"""One adapter, one set of layer names: the same factors saved under every key scheme (kohya with
diffusers and SGM names, ComfyUI, old and new diffusers, PEFT) read to the same canonical module
paths and the same deltas; diffusers itself agrees on which module each SGM key adapts, and on
how Flux's fused BFL modules split. Keys here are written by hand, not by loralens."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

import loralens as ll
from helpers import tiny_unet, write_peft_adapter

diffusers = pytest.importorskip("diffusers")

#: diffusers UNet module -> the same module in the SGM/LDM UNet (SD's layout, layers_per_block 2).
SGM = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "down_blocks.0.attentions.0.proj_in": "input_blocks.1.1.proj_in",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0": "input_blocks.1.1.transformer_blocks.0.attn1.to_out.0",
    "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k": "input_blocks.2.1.transformer_blocks.0.attn2.to_k",
    "down_blocks.0.attentions.1.transformer_blocks.0.ff.net.0.proj": "input_blocks.2.1.transformer_blocks.0.ff.net.0.proj",
    "down_blocks.0.resnets.1.conv1": "input_blocks.2.0.in_layers.2",
    "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
    "down_blocks.1.resnets.0.conv_shortcut": "input_blocks.4.0.skip_connection",
    "down_blocks.1.resnets.1.time_emb_proj": "input_blocks.5.0.emb_layers.1",
    "mid_block.attentions.0.proj_out": "middle_block.1.proj_out",
    "mid_block.resnets.1.conv2": "middle_block.2.out_layers.3",
    "up_blocks.0.resnets.2.conv1": "output_blocks.2.0.in_layers.2",
    "up_blocks.0.upsamplers.0.conv": "output_blocks.2.1.conv",
    "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_v": "output_blocks.5.1.transformer_blocks.0.attn2.to_v",
    "conv_out": "out.2",
}
TE = ("text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.1.mlp.fc1")


def factors(unet, seed=0, rank=3):
    """module -> (down, up) for every module in SGM (UNet) and TE (a 16-wide text encoder)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in SGM:
        w = unet.get_submodule(name).weight
        ones = [1] * (w.ndim - 2)
        out["unet." + name] = (
            torch.randn(rank, *w.shape[1:], generator=g),
            torch.randn(w.shape[0], rank, *ones, generator=g),
        )
    for name, (o, i) in zip(TE, [(16, 16), (32, 16)]):
        out["text_encoder." + name] = (
            torch.randn(rank, i, generator=g),
            torch.randn(o, rank, generator=g),
        )
    return out


def delta(down, up, scale):
    return (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)) * scale


def write_schemes(folder, fac, alpha=1.5):
    """The same LoRA under six key schemes; returns {scheme: path}."""
    kohya, sgm, comfy, old, new, peft = {}, {}, {}, {}, {}, {}
    for name, (down, up) in fac.items():
        component, _, module = name.partition(".")
        te = component == "text_encoder"
        a = torch.tensor(alpha)
        stem = ("lora_te_" if te else "lora_unet_") + module.replace(".", "_")
        kohya |= {
            f"{stem}.lora_down.weight": down,
            f"{stem}.lora_up.weight": up,
            f"{stem}.alpha": a,
        }
        sgm_stem = stem if te else "lora_unet_" + SGM[module].replace(".", "_")
        sgm |= {f"{sgm_stem}.lora_down.weight": down, f"{sgm_stem}.lora_up.weight": up}
        sgm[f"{sgm_stem}.alpha"] = a
        c = f"text_encoders.clip_l.transformer.{module}" if te else f"diffusion_model.{SGM[module]}"
        comfy |= {f"{c}.lora_A.weight": down, f"{c}.lora_B.weight": up, f"{c}.alpha": a}
        if module.endswith("attn1.to_q"):  # attention-processor style, as diffusers once saved
            o = f"unet.{module[: -len('.to_q')]}.processor.to_q_lora"
        else:
            o = f"{name}.lora_linear_layer" if te else f"{name}.lora"
        old |= {f"{o}.down.weight": down, f"{o}.up.weight": up, f"{name}.alpha": a}
        new |= {f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up, f"{name}.alpha": a}
        if not te:
            peft |= {f"base_model.model.{module}.lora_A.weight": down}
            peft[f"base_model.model.{module}.lora_B.weight"] = up
    paths = {}
    for scheme, sd in [
        ("kohya", kohya),
        ("sgm", sgm),
        ("comfy", comfy),
        ("old", old),
        ("new", new),
    ]:
        paths[scheme] = folder / f"{scheme}.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, paths[scheme])
    rank = next(iter(fac.values()))[0].shape[0]
    cfg = {
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": [n[5:] for n in fac if n.startswith("unet.")],
    }
    paths["peft"] = write_peft_adapter(folder / "peft", peft, cfg)
    return paths


def test_every_key_scheme_reads_to_the_same_names_and_deltas(tmp_path):
    fac = factors(tiny_unet())
    paths = write_schemes(tmp_path, fac)
    expected = sorted(fac, key=ll.formats.keys.natural_key)
    for scheme, path in paths.items():
        lora = ll.load_lora(path)
        names = [n for n in expected if scheme != "peft" or n.startswith("unet.")]
        assert lora.names == names, scheme
        assert (
            lora.metadata["model_family"] == "sd-unet" and "uncanonical_layers" not in lora.metadata
        )
        for layer in lora.layers:
            down, up = fac[layer.name]
            torch.testing.assert_close(layer.delta_weight(), delta(down, up, 1.5 / 3))
            assert layer.meta["canonical"] is True and layer.meta["file_key"]
            assert layer.meta["component"] == layer.name.partition(".")[0]
    assert ll.load_lora(paths["sgm"])["unet.conv_out"].meta["file_key"] == "lora_unet_out_2"
    assert ll.load_lora(paths["peft"])["unet.conv_in"].meta["file_key"] == "conv_in"


def test_sgm_names_adapt_the_modules_diffusers_loads_them_into(tmp_path):
    """diffusers' own SGM -> diffusers mapping, fused into a UNet, gives our deltas by name."""
    unet = tiny_unet()
    base = copy.deepcopy(unet)
    fac = {k: v for k, v in factors(unet).items() if k.startswith("unet.")}
    path = write_schemes(tmp_path, fac)["sgm"]
    state, alphas = diffusers.StableDiffusionPipeline.lora_state_dict(
        str(tmp_path), weight_name=path.name, unet_config=unet.config
    )
    unet.load_lora_adapter(state, network_alphas=alphas, prefix="unet", adapter_name="k")
    unet.fuse_lora(lora_scale=1.0)
    lora = ll.load_lora(path)
    assert len(lora) == len(SGM)
    for layer in lora.layers:
        name = layer.name.removeprefix("unet.")
        if name == "up_blocks.0.upsamplers.0.conv":
            # diffusers 0.42 maps output_blocks.2.1.conv to up_blocks.0.attentions.2.conv, a
            # module an up block without attention (SD 1.x's first) does not have, and drops it
            continue
        module = unet.get_submodule(name)
        d = getattr(module, "base_layer", module).weight - base.get_submodule(name).weight
        torch.testing.assert_close(layer.delta_weight(), d.detach().reshape(d.shape[0], -1))


H, MLP = 8, 32  # Flux's hidden size and MLP width, tiny


def _flux_file(path, keys, rank=2, seed=0):
    """``keys``: file module -> (out, in); kohya/ComfyUI/XLabs style by the key's shape."""
    g = torch.Generator().manual_seed(seed)
    sd, raw = {}, {}
    for module, (o, i) in keys.items():
        down, up = torch.randn(rank, i, generator=g), torch.randn(o, rank, generator=g)
        kind = ("lora_down", "lora_up") if module.startswith("lora_") else ("down", "up")
        if module.startswith("diffusion_model."):
            kind = ("lora_A", "lora_B")
        sd[f"{module}.{kind[0]}.weight"], sd[f"{module}.{kind[1]}.weight"] = down, up
        raw[module] = up @ down
    save_file(sd, path)
    return raw


def test_flux_fused_modules_split_by_rows_into_diffusers_modules(tmp_path):
    keys = {
        "lora_unet_double_blocks_0_img_attn_qkv": (3 * H, H),
        "lora_unet_double_blocks_0_txt_mlp_2": (H, MLP),
        "lora_unet_single_blocks_1_linear1": (3 * H + MLP, H),
        "lora_unet_final_layer_adaLN_modulation_1": (2 * H, H),
    }
    raw = _flux_file(tmp_path / "k.safetensors", keys)
    lora = ll.load_lora(tmp_path / "k.safetensors")
    assert lora.metadata["model_family"] == "flux"
    t = "transformer.transformer_blocks.0."
    s = "transformer.single_transformer_blocks.1."
    qkv, lin1 = (
        raw["lora_unet_double_blocks_0_img_attn_qkv"],
        raw["lora_unet_single_blocks_1_linear1"],
    )
    mod = raw["lora_unet_final_layer_adaLN_modulation_1"]
    golden = {
        f"{t}attn.to_q": qkv[:H],
        f"{t}attn.to_k": qkv[H : 2 * H],
        f"{t}attn.to_v": qkv[2 * H :],
        f"{t}ff_context.net.2": raw["lora_unet_double_blocks_0_txt_mlp_2"],
        f"{s}attn.to_q": lin1[:H],
        f"{s}attn.to_k": lin1[H : 2 * H],
        f"{s}attn.to_v": lin1[2 * H : 3 * H],
        f"{s}proj_mlp": lin1[3 * H :],
        "transformer.norm_out.linear": torch.cat([mod[H:], mod[:H]]),  # (scale, shift)
    }
    assert sorted(lora.names) == sorted(golden)
    for name, d in golden.items():
        torch.testing.assert_close(lora[name].delta_weight(), d)
    assert lora[f"{s}proj_mlp"].meta["file_rows"] == [3 * H, 3 * H + MLP]
    assert lora[f"{s}proj_mlp"].meta["file_key"] == "lora_unet_single_blocks_1_linear1"


def _fro_diff(U1, V1, U2, V2):
    """|U1 V1^T - U2 V2^T|_F from the factors (Flux-sized deltas are not formed)."""
    U, V = torch.cat([U1, -U2], 1).double(), torch.cat([V1, V2], 1).double()
    return float(((U.T @ U) * (V.T @ V)).sum().clamp(min=0).sqrt())


def test_flux_split_agrees_with_diffusers_kohya_flux_conversion(tmp_path):
    """At Flux's real widths (diffusers' converter assumes them), rank 2."""
    h, mlp = 3072, 12288
    keys = {
        "lora_unet_double_blocks_0_img_attn_qkv": (3 * h, h),
        "lora_unet_double_blocks_0_txt_attn_proj": (h, h),
        "lora_unet_single_blocks_0_linear1": (3 * h + mlp, h),
        "lora_unet_single_blocks_0_linear2": (h, h + mlp),
    }
    g = torch.Generator().manual_seed(0)
    sd = {}
    for module, (o, i) in keys.items():
        sd[f"{module}.lora_down.weight"] = torch.randn(2, i, generator=g)
        sd[f"{module}.lora_up.weight"] = torch.randn(o, 2, generator=g)
        sd[f"{module}.alpha"] = torch.tensor(1.0)
    path = tmp_path / "flux.safetensors"
    save_file(sd, path)
    state = diffusers.FluxPipeline.lora_state_dict(str(path))
    lora = ll.load_lora(path)
    ref = {k[: -len(".lora_A.weight")]: k for k in state if k.endswith("lora_A.weight")}
    assert sorted(ref) == lora.names
    for name, key in ref.items():
        A, B = state[key].float(), state[key.replace("lora_A", "lora_B")].float()
        layer = lora[name]
        assert _fro_diff(layer.U, layer.V, B, A.T) < 1e-4 * float(layer.U.norm() * layer.V.norm())


def test_comfyui_and_xlabs_flux_read_to_the_same_names(tmp_path):
    comfy = _flux_file(
        tmp_path / "c.safetensors", {"diffusion_model.double_blocks.2.txt_attn.qkv": (3 * H, H)}
    )
    xlabs = _flux_file(
        tmp_path / "x.safetensors", {"double_blocks.2.processor.qkv_lora2": (3 * H, H)}
    )
    a, b = ll.load_lora(tmp_path / "c.safetensors"), ll.load_lora(tmp_path / "x.safetensors")
    t = "transformer.transformer_blocks.2.attn."
    assert a.names == b.names == [f"{t}add_k_proj", f"{t}add_q_proj", f"{t}add_v_proj"]
    full = {"c": next(iter(comfy.values())), "x": next(iter(xlabs.values()))}
    for lora, d in ((a, full["c"]), (b, full["x"])):
        torch.testing.assert_close(lora[f"{t}add_k_proj"].delta_weight(), d[H : 2 * H])


def test_unmappable_names_are_kept_and_said_not_guessed(tmp_path):
    """SD3's kohya names, an XLabs single-block proj_lora and a qkv whose rows do not split in
    three have no certain module path: they keep the file's name, canonical False; save_lora
    refuses to write them as PEFT target modules."""
    raw = _flux_file(
        tmp_path / "u.safetensors",
        {
            "lora_unet_joint_blocks_0_x_block_attn_qkv": (3 * H, H),
            "lora_unet_double_blocks_0_img_attn_qkv": (3 * H + 1, H),
            "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q": (H, H),
        },
    )
    lora = ll.load_lora(tmp_path / "u.safetensors")
    assert sorted(lora.metadata["uncanonical_layers"]) == sorted(
        ["lora_unet_joint_blocks_0_x_block_attn_qkv", "lora_unet_double_blocks_0_img_attn_qkv"]
    )
    for name in lora.metadata["uncanonical_layers"]:
        assert lora[name].meta["canonical"] is False and lora[name].meta["file_key"] == name
        torch.testing.assert_close(lora[name].delta_weight(), raw[name])
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" in lora.names
    with pytest.raises(ValueError, match="no known module path"):
        ll.save_lora(lora, tmp_path / "out")


def test_two_keys_for_one_module_are_refused_naming_both(tmp_path):
    _flux_file(
        tmp_path / "twice.safetensors",
        {"lora_unet_conv_in": (4, 4), "lora_unet_input_blocks_0_0": (4, 4)},
    )
    with pytest.raises(
        ll.LoRAFormatError,
        match=r"lora_unet_conv_in.*lora_unet_input_blocks_0_0|lora_unet_input_blocks_0_0.*conv_in",
    ):
        ll.load_lora(tmp_path / "twice.safetensors")


def test_language_model_names_stay_module_paths(tmp_path):
    folder = write_peft_adapter(tmp_path / "a")
    lora = ll.load_lora(folder)
    assert lora.names == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert lora.metadata["model_family"] is None
    assert all("component" not in la.meta for la in lora.layers)


def test_bare_module_paths_get_a_component_only_when_their_blocks_say_which():
    from loralens.formats.canonical import bare_component

    assert bare_component(["down_blocks.0.resnets.0.conv1", "conv_in"]) == "unet"
    assert bare_component(["single_transformer_blocks.3.proj_mlp"]) == "transformer"
    assert bare_component(["conv_in", "conv_out"]) is None  # any model may have these
    assert bare_component(["down_blocks.0.resnets.0.conv1", "head"]) is None


def test_model_family_reads_sd_sizes_from_cross_attention_width():
    names = ["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"]
    assert ll.model_family(names, [(320, 2048)]) == "sdxl"
    assert ll.model_family(names, [(320, 768)]) == "sd1"
    assert ll.model_family(names, [(320, 100)]) == "sd-unet"
    assert ll.model_family(["model.layers.0.mlp.up_proj"]) is None
