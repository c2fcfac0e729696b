"""PEFT LoHa / LoKr adapter folders: load_lora deltas equal what PEFT itself merges.

Real PEFT adapters on tiny randomly initialised models (no downloads), saved by PEFT, compared
with ``merge_and_unload()`` minus the base weights; ``init_weights=False`` makes every factor
non-zero."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import loralens as ll
from helpers import tiny_llama

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(4, 6, kernel_size=3)
        self.conv2 = nn.Conv2d(6, 8, kernel_size=(1, 1))
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.conv2(self.conv1(x)).mean((2, 3)))


def _peft_deltas(base, config, folder):
    """Save a PEFT adapter of ``config`` on a copy of ``base`` to ``folder``; return
    {module: merged weight - base weight} (out x in*k) for every adapted module."""
    model = peft.get_peft_model(copy.deepcopy(base), config)
    model.save_pretrained(str(folder))
    merged = model.merge_and_unload().state_dict()
    base_sd = base.state_dict()
    deltas = {}
    for key, w in merged.items():
        if key.endswith(".weight") and not torch.equal(w, base_sd[key]):
            d = (w - base_sd[key]).double()
            deltas[key.removesuffix(".weight")] = d.reshape(d.shape[0], -1)
    return deltas


def _assert_matches_peft(lora, deltas, rel=1e-5):
    assert sorted(lora.names) == sorted(deltas)
    for name, d in deltas.items():
        ours = lora[name].delta_weight().double()
        assert ours.shape == d.shape, name
        assert float((ours - d).norm() / d.norm()) < rel, name


def test_peft_loha_with_patterns_matches_peft_merge(tmp_path):
    base = tiny_llama()
    config = peft.LoHaConfig(
        r=3,
        alpha=5,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"down_proj": 2},
        alpha_pattern={r"model\.layers\.1\.self_attn\.q_proj": 11},
        init_weights=False,
    )
    deltas = _peft_deltas(base, config, tmp_path / "loha")
    assert ll.detect_format(tmp_path / "loha") == "peft"
    lora = ll.load_lora(tmp_path / "loha")
    _assert_matches_peft(lora, deltas)
    assert lora["model.layers.1.self_attn.q_proj"].meta["scale"] == pytest.approx(11 / 3)
    assert lora["model.layers.0.mlp.down_proj"].meta["scale"] == pytest.approx(5 / 2)
    assert lora["model.layers.0.mlp.down_proj"].rank == 4  # r1 r2 = 2 x 2
    assert all(la.meta["lycoris"] == "loha" for la in lora.layers)
    assert lora.metadata["peft_config"]["peft_type"] == "LOHA"
    # the weights file alone, with the config beside it, reads the same
    alone = ll.load_lora(tmp_path / "loha" / "adapter_model.safetensors")
    _assert_matches_peft(alone, deltas)


def test_peft_loha_wider_than_delta_w_is_reduced_exactly(tmp_path):
    """r = 5 on 16-wide layers: r^2 = 25 > 16, read exactly at rank 16."""
    config = peft.LoHaConfig(r=5, alpha=2, target_modules=["k_proj", "o_proj"], init_weights=False)
    base = tiny_llama()
    deltas = _peft_deltas(base, config, tmp_path / "wide")
    lora = ll.load_lora(tmp_path / "wide")
    _assert_matches_peft(lora, deltas)
    k = lora["model.layers.0.self_attn.k_proj"]  # 8 x 16: rank min = 8
    assert k.rank == 8 and k.meta["exact_reduction"] == {"factor_rank": 25, "rank": 8}


@pytest.mark.parametrize("decompose_both", [False, True])
def test_peft_lokr_matches_peft_merge_full_halves_scaled_by_alpha_over_r(tmp_path, decompose_both):
    base = tiny_llama()
    config = peft.LoKrConfig(
        r=2,
        alpha=3,
        target_modules=["q_proj", "up_proj", "down_proj"],
        rank_pattern={"down_proj": 1},
        decompose_both=decompose_both,
        init_weights=False,
    )
    deltas = _peft_deltas(base, config, tmp_path / "lokr")
    lora = ll.load_lora(tmp_path / "lokr")
    _assert_matches_peft(lora, deltas)
    q = lora["model.layers.0.self_attn.q_proj"]
    assert q.meta["lycoris"] == "lokr" and q.meta["scale"] == pytest.approx(3 / 2)
    if not decompose_both:  # q_proj: both halves stored full, PEFT still scales by alpha / r
        assert set(q.meta["lokr_full"]) == {"lokr_w1", "lokr_w2"}
    assert lora["model.layers.1.mlp.down_proj"].meta["scale"] == pytest.approx(3 / 1)


@pytest.mark.parametrize("kind", ["loha", "lokr"])
@pytest.mark.parametrize("effective", [False, True])
def test_peft_lycoris_conv_layers_match_peft_merge(tmp_path, kind, effective):
    cls = peft.LoHaConfig if kind == "loha" else peft.LoKrConfig
    config = cls(
        r=2,
        alpha=3,
        target_modules=["conv1", "conv2", "head"],
        use_effective_conv2d=effective,
        init_weights=False,
    )
    base = ConvNet()
    deltas = _peft_deltas(base, config, tmp_path / kind)
    lora = ll.load_lora(tmp_path / kind)
    _assert_matches_peft(lora, deltas)
    conv1 = lora["conv1"]
    if effective:  # a Tucker core carries the kernel; without it PEFT stores r x (in*kh*kw)
        assert conv1.meta["kind"] == "conv" and conv1.meta["kernel_size"] == [3, 3]
    assert conv1.shape == (6, 4 * 3 * 3)


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv1d(6, 8, kernel_size=3)

    def forward(self, x):
        return self.conv(x)


def test_peft_lokr_conv1d_is_read_exactly_or_refused_where_peft_merges_otherwise(tmp_path):
    """Factored lokr_w2 (r=1): PEFT's merge, read exactly. Full 3-D lokr_w2 (r=8): PEFT's
    merge is not LyCORIS's Kronecker layout, so the file is refused, naming the key."""
    base = Conv1dNet()
    small = peft.LoKrConfig(r=1, alpha=2, target_modules=["conv"], init_weights=False)
    deltas = _peft_deltas(base, small, tmp_path / "factored")
    _assert_matches_peft(ll.load_lora(tmp_path / "factored"), deltas)
    full = peft.LoKrConfig(r=8, alpha=2, target_modules=["conv"], init_weights=False)
    peft.get_peft_model(copy.deepcopy(base), full).save_pretrained(str(tmp_path / "full"))
    with pytest.raises(ll.LoRAFormatError, match="full 3-D LoKr factor") as info:
        ll.load_lora(tmp_path / "full")
    assert "conv.lokr_w2" in str(info.value) and "adapter_model.safetensors" in str(info.value)


def _edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    cfg = json.loads(path.read_text())
    path.write_text(json.dumps(cfg | changes))
    return path


def test_peft_lycoris_refusals_name_the_file_and_reason(tmp_path):
    config = peft.LoHaConfig(r=2, alpha=3, target_modules=["q_proj"], init_weights=False)
    folder = tmp_path / "loha"
    _peft_deltas(tiny_llama(), config, folder)
    path = _edit_config(folder, alpha=-1)
    with pytest.raises(ll.LoRAFormatError, match="alpha must be a positive number") as info:
        ll.load_lora(folder)
    assert str(path) in str(info.value) and "lora_alpha" not in str(info.value)
    _edit_config(folder, alpha=3, r=4)
    with pytest.raises(ll.LoRAFormatError, match="the config says r=4") as info:
        ll.load_lora(folder)
    assert "q_proj" in str(info.value)
    _edit_config(folder, r=2, peft_type="LOKR")
    with pytest.raises(ll.LoRAFormatError, match="not a lokr layer") as info:
        ll.load_lora(folder)
    assert str(folder / "adapter_model.safetensors") in str(info.value)
