"""Bad input: every case raises LoRAFormatError (a ValueError) whose message names the file."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

import loralens as ll

Q = "base_model.model.model.layers.0.self_attn.q_proj"
V = "base_model.model.model.layers.0.self_attn.v_proj"


def _adapter(tmp_path, tensors=None, config=None, name="adapter"):
    folder = tmp_path / name
    folder.mkdir()
    if tensors is None:
        g = torch.Generator().manual_seed(0)
        tensors = {
            f"{Q}.lora_A.weight": torch.randn(2, 8, generator=g),
            f"{Q}.lora_B.weight": torch.randn(8, 2, generator=g),
            f"{V}.lora_A.weight": torch.randn(2, 8, generator=g),
            f"{V}.lora_B.weight": torch.randn(4, 2, generator=g),
        }
    if config is not False:
        cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}
        cfg.update(config or {})
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
    save_file(tensors, folder / "adapter_model.safetensors")
    return folder


def _fails(path, *needles, **kw):
    with pytest.raises(ll.LoRAFormatError) as info:
        ll.load_lora(path, **kw)
    msg = str(info.value)
    assert isinstance(info.value, ValueError)
    assert str(path) in msg, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def test_good_adapter_loads(tmp_path):
    lora = ll.load_lora(_adapter(tmp_path))
    assert lora.ranks == [2, 2] and lora["model.layers.0.self_attn.q_proj"].meta["scale"] == 2.0


def test_truncated_safetensors(tmp_path):
    folder = _adapter(tmp_path)
    f = folder / "adapter_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 40])
    _fails(f, "truncated")
    _fails(folder)
    f.write_bytes(data[:5])
    _fails(folder, "safetensors")


def test_missing_and_invalid_adapter_config(tmp_path):
    missing = _adapter(tmp_path, config=False)
    _fails(missing, "adapter_config.json")
    with pytest.raises(ll.LoRAFormatError, match=r"adapter_config\.json"):
        ll.detect_format(missing)

    bad = _adapter(tmp_path, name="bad")
    (bad / "adapter_config.json").write_text("{not json")
    _fails(bad, "invalid JSON", "adapter_config.json")
    _fails(bad / "adapter_config.json", "invalid JSON")  # the config stands for its folder
    (bad / "adapter_config.json").write_text("[1, 2]")
    _fails(bad, "JSON object")
    for cfg, needle in [
        ({"r": -1}, "r must be"),
        ({"lora_alpha": "x"}, "lora_alpha must be"),
        ({"peft_type": "IA3"}, "peft_type"),
        ({"rank_pattern": {"q_proj(": 2}}, "not a valid pattern"),
        ({"rank_pattern": ["q_proj"]}, "rank_pattern"),
    ]:
        (bad / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4, **cfg}))
        _fails(bad, needle)


def test_shape_mismatch_between_A_and_B(tmp_path):
    t = {f"{Q}.lora_A.weight": torch.randn(2, 8), f"{Q}.lora_B.weight": torch.randn(8, 3)}
    _fails(_adapter(tmp_path, t), "shape mismatch", "model.layers.0.self_attn.q_proj")
    t = {
        f"{Q}.lora_A.weight": torch.randn(2, 8, 3, 3),
        f"{Q}.lora_B.weight": torch.randn(8, 2, 3, 3),
    }
    _fails(_adapter(tmp_path, t, name="conv"), "shape mismatch")
    t = {f"{Q}.lora_A.weight": torch.randn(2, 8, 3, 3), f"{Q}.lora_B.weight": torch.randn(8, 2)}
    _fails(_adapter(tmp_path, t, name="axes"), "shape mismatch")


def test_rank_disagreeing_with_config_and_rank_pattern(tmp_path):
    _fails(_adapter(tmp_path, config={"r": 4, "lora_alpha": 4}), "rank 2", "r=4")
    msg = _fails(_adapter(tmp_path, config={"rank_pattern": {"v_proj": 3}}, name="pat"), "r=3")
    assert "v_proj" in msg


def test_unpaired_and_unknown_keys(tmp_path):
    t = {f"{Q}.lora_A.weight": torch.randn(2, 8), f"{Q}.lora_B.weight": torch.randn(8, 2)}
    _fails(
        _adapter(tmp_path, {**t, f"{V}.lora_A.weight": torch.randn(2, 8)}, name="a"),
        "unpaired",
        "v_proj",
    )
    _fails(_adapter(tmp_path, {**t, f"{V}.lora_B.weight": torch.randn(8, 2)}, name="b"), "unpaired")
    _fails(
        _adapter(tmp_path, {**t, "base_model.model.foo.weight": torch.randn(2)}, name="c"),
        "not LoRA factors",
    )
    two = {
        **t,
        f"{V}.lora_A.other.weight": torch.randn(2, 8),
        f"{V}.lora_B.other.weight": torch.randn(8, 2),
    }
    two = {
        k.replace(".lora_A.weight", ".lora_A.default.weight").replace(
            ".lora_B.weight", ".lora_B.default.weight"
        ): v
        for k, v in two.items()
    }
    _fails(_adapter(tmp_path, two, name="d"), "several adapter names")
    # kohya: an alpha with no factors, and LyCORIS keys
    f = tmp_path / "kohya.safetensors"
    save_file(
        {
            "lora_unet_a.lora_down.weight": torch.randn(2, 4),
            "lora_unet_a.lora_up.weight": torch.randn(4, 2),
            "lora_unet_b.alpha": torch.tensor(1.0),
        },
        f,
    )
    _fails(f, "unpaired", "lora_unet_b")
    save_file(
        {
            "lora_unet_a.hada_w1_a": torch.randn(2, 4),
            "lora_unet_a.lora_up.weight": torch.randn(4, 2),
        },
        f,
    )
    _fails(f, "LyCORIS")


def test_nonfinite_weights_raise_unless_allowed(tmp_path):
    t = {f"{Q}.lora_A.weight": torch.randn(2, 8), f"{Q}.lora_B.weight": torch.randn(8, 2)}
    t[f"{Q}.lora_B.weight"][3, 1] = float("nan")
    t[f"{Q}.lora_A.weight"][0, 0] = float("inf")
    folder = _adapter(tmp_path, t)
    _fails(folder, "NaN/inf", "model.layers.0.self_attn.q_proj", "allow_nonfinite")
    lora = ll.load_lora(folder, allow_nonfinite=True)
    assert not torch.isfinite(lora.layers[0].U).all()


class _Payload:
    """Unpickling this would call os.system and create a file, if the loader ran any code."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_pickled_bin_with_code_is_refused_and_never_runs(tmp_path):
    target = tmp_path / "pwned"
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2})
    )
    payload = {f"{Q}.lora_A.weight": _Payload(target), f"{Q}.lora_B.weight": torch.zeros(8, 2)}
    torch.save(payload, folder / "adapter_model.bin")  # a zip-format torch pickle
    _fails(folder, "refused")
    with open(folder / "plain.bin", "wb") as f:  # and a raw pickle stream
        pickle.dump(payload, f)
    _fails(folder / "plain.bin")
    assert not target.exists()


def test_not_a_lora_and_missing_paths(tmp_path):
    f = tmp_path / "model.safetensors"
    save_file({"transformer.h.0.attn.c_attn.weight": torch.randn(4, 4)}, f)
    with pytest.raises(ll.LoRAFormatError, match="expected a PEFT adapter folder") as info:
        ll.detect_format(f)
    assert str(f) in str(info.value)
    _fails(tmp_path / "nope", "no such file")
    (tmp_path / "notes.txt").write_text("hi")
    _fails(tmp_path / "notes.txt", "unknown file type")
    empty = tmp_path / "empty"
    empty.mkdir()
    _fails(empty, "holds no LoRA")
    with pytest.raises(ll.LoRAFormatError, match="sub-folders"):
        parent = tmp_path / "parent"
        parent.mkdir()
        _adapter(parent, name="one")
        ll.load_lora(parent)
