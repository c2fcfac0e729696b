"""Config values and tensors that used to give NaN/inf factors, wrong scales or tracebacks: each
is refused with one LoRAFormatError naming the file and the problem."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import loralens as ll
from helpers import peft_tensors, write_peft_adapter

Q = "base_model.model.model.layers.0.self_attn.q_proj"


def _fails(path, *needles, named=None) -> str:
    """load_lora(path) raises LoRAFormatError whose message starts with ``named`` (default
    ``path``) and holds every needle."""
    with pytest.raises(ll.LoRAFormatError) as info:
        ll.load_lora(path)
    msg = str(info.value)
    assert msg.startswith(f"{named or path}: "), msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def _config_text(**fields) -> str:
    return json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, **fields})


@pytest.mark.parametrize(
    "fields, needle",
    [
        ('"alpha_pattern": {"q_proj": NaN}', "NaN is not a JSON number"),
        ('"alpha_pattern": {"q_proj": Infinity}', "Infinity is not a JSON number"),
        ('"rank_pattern": {"q_proj": -Infinity}', "-Infinity is not a JSON number"),
        ('"rank_pattern": {"q_proj": 1e999}', "number 1e999 is too large"),
        ('"lora_alpha": 1e400', "number 1e400 is too large"),
        ('"lora_dropout": NaN', "NaN is not a JSON number"),  # refused wherever it appears
        pytest.param('"r": ' + "9" * 5000, "Exceeds the limit (4300 digits)", id="5000 digits"),
    ],
)
def test_nan_and_infinity_in_the_config_are_refused(tmp_path, fields, needle):
    text = '{"peft_type": "LORA", "r": 2, "lora_alpha": 4, ' + fields + "}"
    folder = write_peft_adapter(tmp_path / "a", config_text=text)
    _fails(folder, "invalid JSON", needle, named=folder / "adapter_config.json")


@pytest.mark.parametrize(
    "fields",
    [
        {"lora_alpha": 1e308},
        {"alpha_pattern": {"q_proj": 1e308}},
        {"use_rslora": True, "lora_alpha": 1e39},
    ],
)
def test_an_alpha_that_overflows_the_factors_is_refused(tmp_path, fields):
    folder = write_peft_adapter(tmp_path / "a", config=fields)
    _fails(folder, "times the scale", "NaN/inf", named=folder / "adapter_model.safetensors")


def test_kohya_alpha_1e38_is_refused_not_a_linalg_traceback(tmp_path):
    f = tmp_path / "kohya.safetensors"
    save_file(
        {
            "lora_unet_a.lora_down.weight": torch.randn(2, 4),
            "lora_unet_a.lora_up.weight": torch.randn(4, 2) * 10,
            "lora_unet_a.alpha": torch.tensor(1e38),
        },
        f,
    )
    _fails(f, "lora_unet_a", "times the scale 5e+37", "NaN/inf")


@pytest.mark.parametrize(
    "dtype", [torch.bool, torch.int64, torch.int32, torch.uint8, torch.complex64]
)
@pytest.mark.parametrize("factor", ["lora_A", "lora_B"])
def test_factors_that_are_not_floating_point_are_refused(tmp_path, dtype, factor):
    tensors = peft_tensors(modules=["model.layers.0.self_attn.q_proj"])
    key = f"{Q}.{factor}.weight"
    tensors[key] = tensors[key].to(dtype)
    folder = write_peft_adapter(tmp_path / "st", tensors)
    name = str(dtype).removeprefix("torch.")
    _fails(folder, repr(key), f"dtype {name}", named=folder / "adapter_model.safetensors")
    (folder / "adapter_model.safetensors").unlink()
    torch.save(tensors, folder / "adapter_model.bin")  # the pickle reader too
    _fails(folder, f"dtype {name}", named=folder / "adapter_model.bin")


@pytest.mark.parametrize(
    "fields, needle",
    [
        ({"r": 4.5}, "r must be a positive integer, got 4.5"),
        ({"r": 2.0}, "r must be a positive integer, got 2.0"),  # PEFT cannot build it either
        ({"r": "2"}, "r must be a positive integer"),
        ({"r": True}, "r must be a positive integer"),
        ({"r": 10**400}, "r must be a positive integer"),
        ({"rank_pattern": {"q_proj": 2.5}}, "rank_pattern['q_proj'] must be a positive integer"),
        ({"rank_pattern": {"q_proj": 0}}, "rank_pattern['q_proj'] must be a positive integer"),
        ({"lora_alpha": 10**400}, "lora_alpha must be a positive number"),
        ({"alpha_pattern": {"q_proj": -1}}, "alpha_pattern['q_proj'] must be a positive number"),
        ({"use_rslora": "false"}, "use_rslora must be true or false"),
        ({"fan_in_fan_out": 1}, "fan_in_fan_out must be true or false"),
        ({"modules_to_save": "lm_head"}, "modules_to_save must be a list of names"),
        ({"base_model_name_or_path": {"a": 1}}, "base_model_name_or_path must be a string"),
        ({"rank_pattern": {"a{99999}": 2}}, "counted repetitions allow over 10000"),
        ({"rank_pattern": {"q{e<=1}": 2}}, "braces are allowed only as counted repetitions"),
        ({"rank_pattern": {"[[:alpha:]]": 2}}, "Possible nested set"),
    ],
)
def test_config_values_peft_would_not_use_as_given_are_refused(tmp_path, fields, needle):
    folder = write_peft_adapter(tmp_path / "a", config=fields)
    _fails(folder, needle, named=folder / "adapter_config.json")


def test_deeply_nested_json_is_refused(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    folder = write_peft_adapter(
        tmp_path / "a", config_text='{"r": 2, "lora_alpha": 4, "x": ' + deep + "}"
    )
    _fails(folder, "nested too deeply", named=folder / "adapter_config.json")
    f = tmp_path / "diffusers.safetensors"  # the same JSON in a diffusers header
    save_file(
        {
            "unet.a.lora_A.weight": torch.randn(2, 4),
            "unet.a.lora_B.weight": torch.randn(4, 2),
        },
        f,
        metadata={"lora_adapter_metadata": '{"unet.x": ' + deep + "}"},
    )
    _fails(f, "nested too deeply", "lora_adapter_metadata")


def test_diffusers_component_configs_are_checked_like_adapter_configs(tmp_path):
    f = tmp_path / "diffusers.safetensors"
    tensors = {"unet.a.lora_A.weight": torch.randn(2, 4), "unet.a.lora_B.weight": torch.randn(4, 2)}
    for meta, needle in [
        ({"unet.r": 2, "unet.lora_alpha": 1e308}, "times the scale"),
        ({"unet.r": 2.5, "unet.lora_alpha": 2}, "r must be a positive integer"),
        ({"unet.r": 2, "unet.alpha_pattern": {"(a|aa)*(": 1}}, "not a valid pattern"),
    ]:
        save_file(tensors, f, metadata={"lora_adapter_metadata": json.dumps(meta)})
        _fails(f, needle)


def test_an_oversized_config_is_refused_before_parsing(tmp_path, monkeypatch):
    from loralens.formats import config

    monkeypatch.setattr(config, "MAX_CONFIG_BYTES", 1000)
    folder = write_peft_adapter(tmp_path / "a", config={"notes": "x" * 2000})
    _fails(folder, "not an adapter config", named=folder / "adapter_config.json")


def test_dora_magnitude_and_lora_bias_of_the_wrong_length_are_refused(tmp_path):
    base = peft_tensors(modules=["model.layers.0.self_attn.q_proj"])  # out features 6
    good = {
        **base,
        f"{Q}.lora_magnitude_vector": torch.rand(6),
        f"{Q}.lora_B.bias": torch.randn(6),
    }
    layer = ll.load_lora(write_peft_adapter(tmp_path / "good", good)).layers[0]
    assert layer.meta["magnitude"].shape == (6,) and layer.meta["lora_bias"].shape == (6,)
    for name, key, value, needle in [
        (
            "mag5",
            f"{Q}.lora_magnitude_vector",
            torch.rand(5),
            "has 5 entries (shape (5,)), expected 6",
        ),
        ("mag8", f"{Q}.lora_magnitude_vector", torch.rand(8), "has 8 entries"),
        ("bias7", f"{Q}.lora_B.bias", torch.randn(7), "has shape (7,), expected (6,)"),
        ("bias2d", f"{Q}.lora_B.bias", torch.randn(6, 1), "has shape (6, 1), expected (6,)"),
    ]:
        folder = write_peft_adapter(tmp_path / name, {**good, key: value})
        _fails(folder, repr(key), needle, named=folder / "adapter_model.safetensors")


def test_bad_alpha_tensors_and_empty_factors_are_refused(tmp_path):
    f = tmp_path / "kohya.safetensors"
    pair = {"lora_unet_a.lora_down.weight": torch.randn(2, 4)}
    pair["lora_unet_a.lora_up.weight"] = torch.randn(4, 2)
    for alpha, needle in [
        (torch.tensor(True), "not a real scalar: bool"),
        (torch.ones(2), "not a real scalar: float32 (2,)"),
        (torch.tensor(float("inf")), "alpha is inf"),
    ]:
        save_file({**pair, "lora_unet_a.alpha": alpha}, f)
        _fails(f, "lora_unet_a", needle)
    save_file({**pair, "lora_unet_a.lora_down.weight": torch.randn(2, 0)}, f)
    _fails(f, "empty factor")
    save_file({**pair, "lora_unet_a.alpha": torch.tensor(3, dtype=torch.int64)}, f)
    assert ll.load_lora(f).layers[0].meta["scale"] == 1.5  # an integer alpha is a number


def test_inspect_reports_the_overflow_as_one_line(tmp_path):
    from typer.testing import CliRunner

    from loralens.cli import app

    folder = write_peft_adapter(tmp_path / "a", config={"lora_alpha": 1e308})
    result = CliRunner().invoke(app, ["inspect", str(folder)])
    assert result.exit_code == 1, result.output
    assert "times the scale" in result.output and "Traceback" not in result.output


def test_huge_but_finite_factors_still_load(tmp_path):
    """Finiteness is checked by a sum first; a sum that overflows falls back to the exact test.
    (A tiny scale brings the factor back to where its Gram fits float32.)"""
    tensors = peft_tensors(modules=["model.layers.0.self_attn.q_proj"])
    tensors[f"{Q}.lora_B.weight"] = torch.full((6, 2), 3e38)
    tensors[f"{Q}.lora_A.weight"] = torch.full_like(tensors[f"{Q}.lora_A.weight"], 1e-20)
    folder = write_peft_adapter(tmp_path / "a", tensors, {"lora_alpha": 2e-20})  # scale 1e-20
    assert torch.equal(ll.load_lora(folder).layers[0].U, torch.full((6, 2), 3e38) * 1e-20)


def test_factors_whose_gram_overflows_float32_are_refused_whatever_the_command(tmp_path):
    """A kohya alpha of 1e38 over tiny lora_down weights: delta W fits float32, but U^T U,
    which inspect, convert, resize and the models compute, does not."""
    from typer.testing import CliRunner

    from loralens.cli import app

    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    path = tmp_path / "k.safetensors"
    save_file(
        {
            f"{stem}.lora_down.weight": torch.randn(2, 8) * 1e-30,
            f"{stem}.lora_up.weight": torch.randn(8, 2),
            f"{stem}.alpha": torch.tensor(1e38),
        },
        path,
    )
    with pytest.raises(ll.LoRAFormatError, match=r"up factor .* too large: \|U\|_F = .*float32"):
        ll.load_lora(path)
    src, out = str(path), str(tmp_path / "out")
    for args in (
        ["inspect", src],
        ["convert", src, out, "--to", "peft"],
        ["resize", src, out, "--rank", "1"],
    ):
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 1 and "|U|_F" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "out").exists()


def test_a_layer_refuses_factors_that_are_not_floating_point():
    with pytest.raises(ValueError, match="floating point"):
        ll.LoRALayer("x", torch.ones(3, 2, dtype=torch.int64), torch.ones(4, 2))


def test_a_delta_w_that_overflows_float32_is_refused(tmp_path):
    """Finite factors whose product does not fit float32 (3e38 x 1) would turn into inf."""
    tensors = peft_tensors(modules=["model.layers.0.self_attn.q_proj"])
    tensors[f"{Q}.lora_B.weight"] = torch.full((6, 2), 3e38)
    tensors[f"{Q}.lora_A.weight"] = torch.ones_like(tensors[f"{Q}.lora_A.weight"])
    folder = write_peft_adapter(tmp_path / "a", tensors, {"lora_alpha": 2})
    with pytest.raises(ll.LoRAFormatError, match="overflows float32"):
        ll.load_lora(folder)
