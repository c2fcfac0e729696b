"""Properties of the readers and writer, checked with hypothesis."""

from __future__ import annotations

import json
import random
import re
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import loralens as ll
from helpers import peft_tensors, write_peft_adapter
from loralens.formats import patterns
from loralens.formats.keys import natural_key
from loralens.formats.patterns import Budget, PatternTable

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def loras(draw):
    n = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    layers = []
    for i in range(n):
        out, inp, r = draw(st.integers(1, 9)), draw(st.integers(1, 9)), draw(st.integers(1, 5))
        meta = {}
        kind = draw(st.sampled_from(["linear", "linear", "conv", "embedding"]))
        if kind == "conv":
            k = draw(st.integers(1, 3))
            meta = {"kind": "conv", "kernel_size": [k, k]}
            inp = inp * k * k
        elif kind == "embedding":
            meta = {"kind": "embedding"}
        U, V = torch.randn(out, r, generator=g), torch.randn(inp, r, generator=g)
        layers.append(ll.LoRALayer(f"blocks.{i}.proj", U, V, meta))
    return ll.LoRA(layers=layers)


@SETTINGS
@given(loras())
def test_save_then_load_gives_the_same_layers_and_deltas(lora):
    with tempfile.TemporaryDirectory() as d:
        out = ll.save_lora(lora, Path(d) / "a")
        cfg = json.loads((out / "adapter_config.json").read_text())
        assert cfg["peft_type"] == "LORA"
        back = ll.load_lora(out)
    assert back.names == lora.names
    assert back.ranks == lora.ranks
    for a, b in zip(lora.layers, back.layers):
        torch.testing.assert_close(b.delta_weight(), a.delta_weight())
        assert b.meta["kind"] == a.meta.get("kind", "linear")
        assert b.meta["scale"] == 1.0


@SETTINGS
@given(st.integers(0, 2**16), st.integers(2, 12))
def test_pairing_is_by_module_path_not_key_order(seed, n):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(n):
        r = 1 + i % 3
        key = f"base_model.model.layers.{i}.mlp.down_proj"
        sd[f"{key}.lora_A.weight"] = torch.randn(r, 5, generator=g)
        sd[f"{key}.lora_B.weight"] = torch.randn(4, r, generator=g)
    keys = list(sd)
    random.Random(seed).shuffle(keys)
    with tempfile.TemporaryDirectory() as d:
        for name, order in (("sorted", list(sd)), ("shuffled", keys)):
            folder = Path(d) / name
            folder.mkdir()
            (folder / "adapter_config.json").write_text(
                json.dumps(
                    {
                        "r": 1,
                        "lora_alpha": 2,
                        "rank_pattern": {
                            rf"layers\.{i}\.mlp\.down_proj": 1 + i % 3 for i in range(n)
                        },
                    }
                )
            )
            torch.save(
                {k: sd[k] for k in order}, folder / "adapter_model.bin"
            )  # .bin keeps key order
        a, b = ll.load_lora(Path(d) / "sorted"), ll.load_lora(Path(d) / "shuffled")
    assert a.names == b.names == [f"layers.{i}.mlp.down_proj" for i in range(n)]
    for name in a.names:
        torch.testing.assert_close(a.delta_weights()[name], b.delta_weights()[name])


segment = st.sampled_from(
    ["model", "layers", "0", "1", "2", "10", "self_attn", "q_proj", "v_proj", "mlp", "up_proj"]
)
module_names = st.lists(segment, min_size=1, max_size=5).map(".".join)
pattern_keys = st.one_of(
    module_names,
    module_names.map(re.escape),
    st.sampled_from(
        [
            r"q_proj",
            r"layers\.1\d?\..*",
            r".*_proj",
            r"(q|v)_proj",
            r"\d\.mlp\.up_proj",
            r"layers.1",
            r"proj",  # plain keys that are tails of names, but not at a dot
            r"_proj",
            r"ayers\.0\.q_proj",
            r"1\.mlp",
        ]
    ),
)


@given(st.lists(st.integers(0, 200), min_size=1, max_size=8))
def test_natural_key_orders_numeric_segments_as_numbers(nums):
    names = [f"model.layers.{n}.self_attn.q_proj" for n in nums]
    assert [int(s.split(".")[2]) for s in sorted(names, key=natural_key)] == sorted(nums)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(pattern_keys, min_size=1, max_size=6, unique=True),
    st.lists(module_names, min_size=1, max_size=6),
    st.booleans(),
)
def test_pattern_keys_resolve_as_peft_resolves_them(keys, names, newline):
    r"""PEFT's own rule (re.match(rf"(.*\.)?({key})$", name), first key in order), incl. the
    escaped full names save_lora writes, and names a newline makes "." and "$" treat specially."""
    from peft.utils.other import get_pattern_key

    table = PatternTable({k: i for i, k in enumerate(keys)}, "rank_pattern", Path("c"), Budget())
    names = names + [k.replace("\\", "") for k in keys]  # names some key surely matches
    if newline:
        names += [n + "\n" for n in names] + ["a\n" + n for n in names]
    for name in names:
        assert table.key_for(name) == get_pattern_key(keys, name), name
        assert table.get(name, -1) == {k: i for i, k in enumerate(keys)}.get(
            get_pattern_key(keys, name), -1
        )


def test_pattern_matching_has_one_time_budget_per_file(tmp_path, monkeypatch):
    """Many matches each just under the per-match limit still stop at the file's budget."""

    monkeypatch.setattr(patterns, "FILE_BUDGET_S", 0.05)
    names = [f"{'a' * 22}!{i}" for i in range(200)]  # (a|aa)* backtracks ~1 ms on each
    folder = write_peft_adapter(
        tmp_path / "a", peft_tensors(modules=names), {"alpha_pattern": {"(a|aa)*": 2}}
    )
    with pytest.raises(ll.LoRAFormatError, match=r"time budget|took over 0\.05 s") as info:
        ll.load_lora(folder)
    assert str(info.value).startswith(f"{folder / 'adapter_config.json'}: ")
