"""LyCORIS files (LoCon with a Tucker core, LoHa, LoKr) read exactly as low rank.

Golden deltas are computed here from the raw tensors in float64 (einsum, torch.kron), never
through the reader; lycoris-lora's own modules check the conventions where it is installed."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import loralens as ll
from loralens.formats import lycoris

M = "lora_unet_mid_block_attentions_0_proj_in"
#: The layer name load_lora gives M (canonical: the diffusers module path).
LAYER = "unet.mid_block.attentions.0.proj_in"


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _save(tmp_path, tensors, name="lyco.safetensors"):
    path = tmp_path / name
    save_file({k: v.float().contiguous() for k, v in tensors.items()}, path)
    return path


def _assert_delta(layer, golden):
    golden = golden.reshape(golden.shape[0], -1)
    torch.testing.assert_close(layer.delta_weight().double(), golden, rtol=2e-5, atol=1e-5)


# ----------------------------------------------------------------------------- golden deltas


def test_locon_tucker_conv_is_exact_rank_r(tmp_path):
    r, out, inn = 3, 6, 5
    down, mid, up = _randn(r, inn, 1, 1, seed=1), _randn(r, r, 3, 3, seed=2), _randn(out, r, 1, 1)
    t = {f"{M}.lora_down.weight": down, f"{M}.lora_mid.weight": mid, f"{M}.lora_up.weight": up}
    t[f"{M}.alpha"] = torch.tensor(6.0)
    path = _save(tmp_path, t)
    assert ll.detect_format(path) == "lycoris"
    layer = ll.load_lora(path)[LAYER]
    golden = torch.einsum("pi,ijhw,jq->pqhw", up[:, :, 0, 0], mid, down[:, :, 0, 0]) * 6.0 / r
    _assert_delta(layer, golden)
    assert layer.rank == r and layer.meta["kind"] == "conv" and layer.meta["kernel_size"] == [3, 3]
    assert layer.meta["lycoris"] == "locon" and layer.meta["scale"] == pytest.approx(2.0)


def test_loha_linear_is_the_face_splitting_product(tmp_path):
    r, out, inn = 3, 24, 20
    w1a, w1b, w2a, w2b = (
        _randn(out, r, seed=1),
        _randn(r, inn, seed=2),
        _randn(out, r),
        _randn(r, inn),
    )
    t = {f"{M}.hada_w1_a": w1a, f"{M}.hada_w1_b": w1b, f"{M}.hada_w2_a": w2a, f"{M}.hada_w2_b": w2b}
    t[f"{M}.alpha"] = torch.tensor(1.5)
    lora = ll.load_lora(_save(tmp_path, t))
    layer = lora[LAYER]
    _assert_delta(layer, (w1a @ w1b) * (w2a @ w2b) * 1.5 / r)
    assert layer.rank == r * r and layer.shape == (out, inn)
    assert layer.meta["lycoris"] == "loha" and layer.meta["kind"] == "linear"
    assert lora.metadata["format"] == "lycoris"


def test_loha_tucker_conv(tmp_path):
    r, out, inn = 2, 5, 4
    t1, t2 = _randn(r, r, 3, 3, seed=1), _randn(r, r, 3, 3, seed=2)
    w1a, w1b, w2a, w2b = (
        _randn(r, out, seed=3),
        _randn(r, inn, seed=4),
        _randn(r, out),
        _randn(r, inn),
    )
    keys = dict(hada_t1=t1, hada_t2=t2, hada_w1_a=w1a, hada_w1_b=w1b, hada_w2_a=w2a, hada_w2_b=w2b)
    layer = ll.load_lora(_save(tmp_path, {f"{M}.{k}": v for k, v in keys.items()}))[LAYER]
    h1 = torch.einsum("ijhw,jq,ip->pqhw", t1, w1b, w1a)
    h2 = torch.einsum("ijhw,jq,ip->pqhw", t2, w2b, w2a)
    _assert_delta(layer, h1 * h2)  # no alpha: scale 1
    assert layer.meta["kind"] == "conv" and layer.meta["kernel_size"] == [3, 3]


def _lokr_golden(w1, w2, scale):
    if w2.ndim > 2:
        w1 = w1.reshape(*w1.shape, *[1] * (w2.ndim - 2))
    return torch.kron(w1.contiguous(), w2.contiguous()) * scale


def test_lokr_factored_halves_and_conv(tmp_path):
    r = 2
    w1a, w1b = _randn(3, r, seed=1), _randn(r, 2, seed=2)
    w2a, w2b = _randn(4, r, seed=3), _randn(r, 5, seed=4)
    t = {f"{M}.lokr_w1_a": w1a, f"{M}.lokr_w1_b": w1b, f"{M}.lokr_w2_a": w2a, f"{M}.lokr_w2_b": w2b}
    t[f"{M}.alpha"] = torch.tensor(4.0)
    layer = ll.load_lora(_save(tmp_path, t))[LAYER]
    _assert_delta(layer, _lokr_golden(w1a @ w1b, w2a @ w2b, 4.0 / r))
    assert layer.rank == r * r and "lokr_full" not in layer.meta
    # conv: w1 full (scale from w2's rank), w2 factored with a Tucker core
    w1 = _randn(2, 2, seed=5)
    t2, w2a, w2b = _randn(r, r, 3, 3, seed=6), _randn(r, 4, seed=7), _randn(r, 3, seed=8)
    t = {f"{M}.lokr_w1": w1, f"{M}.lokr_t2": t2, f"{M}.lokr_w2_a": w2a, f"{M}.lokr_w2_b": w2b}
    t[f"{M}.alpha"] = torch.tensor(1.0)
    layer = ll.load_lora(_save(tmp_path, t, "conv.safetensors"))[LAYER]
    w2 = torch.einsum("ijhw,ip,jq->pqhw", t2, w2a, w2b).contiguous()
    _assert_delta(layer, _lokr_golden(w1, w2, 1.0 / r))
    assert layer.meta["kind"] == "conv" and layer.meta["kernel_size"] == [3, 3]
    assert layer.meta["in_channels"] == 6 and layer.meta["lokr_full"]["lokr_w1"]["rank"] == 2


def test_lokr_full_halves_use_their_exact_rank_and_scale_1(tmp_path):
    w1 = _randn(4, 1, seed=1) @ _randn(1, 3, seed=2)  # rank 1
    w2 = _randn(6, 2, seed=3) @ _randn(2, 8, seed=4)  # rank 2
    t = {f"{M}.lokr_w1": w1, f"{M}.lokr_w2": w2, f"{M}.alpha": torch.tensor(7.0)}
    layer = ll.load_lora(_save(tmp_path, t))[LAYER]
    _assert_delta(layer, torch.kron(w1, w2))  # both halves full: LyCORIS ignores alpha
    assert layer.rank == 2 and layer.meta["scale"] == 1.0
    full = layer.meta["lokr_full"]
    assert full["lokr_w1"]["shape"] == [4, 3] and full["lokr_w1"]["rank"] == 1
    assert full["lokr_w2"]["shape"] == [6, 8] and full["lokr_w2"]["rank"] == 2
    assert full["lokr_w2"]["max_dropped_singular_value"] < 1e-5


def test_lokr_whose_kronecker_factors_exceed_delta_w_is_read_exactly(tmp_path):
    """Full-rank full halves: kron factors of rank 20 for a 20 x 20 delta W (once refused)."""
    w1, w2 = _randn(4, 4, seed=1), _randn(5, 5, seed=2)
    t = {f"{M}.lokr_w1": w1, f"{M}.lokr_w2": w2}
    layer = ll.load_lora(_save(tmp_path, t))[LAYER]
    golden = torch.einsum("ac,bd->abcd", w1, w2).reshape(20, 20)  # kron by hand
    _assert_delta(layer, golden)
    assert layer.rank == 20 and layer.meta["lokr_full"]["lokr_w1"]["rank"] == 4
    assert layer.meta["lokr_full"]["lokr_w2"]["max_dropped_singular_value"] == 0.0


def test_lokr_half_factored_above_its_smaller_side_is_reduced_exactly(tmp_path):
    """lokr_w1_a 3 x 8 @ lokr_w1_b 8 x 2: rank-8 factors of a 3 x 2 half (once refused)."""
    w1a, w1b, w2a, w2b = _randn(3, 8, seed=1), _randn(8, 2, seed=2), _randn(4, 2), _randn(2, 5)
    t = {f"{M}.lokr_w1_a": w1a, f"{M}.lokr_w1_b": w1b, f"{M}.lokr_w2_a": w2a, f"{M}.lokr_w2_b": w2b}
    t[f"{M}.alpha"] = torch.tensor(4.0)
    layer = ll.load_lora(_save(tmp_path, t))[LAYER]
    h1, h2 = w1a @ w1b, w2a @ w2b
    golden = torch.zeros(12, 10, dtype=torch.float64)
    for a in range(3):
        for c in range(2):
            golden[a * 4 : a * 4 + 4, c * 5 : c * 5 + 5] = h1[a, c] * h2
    _assert_delta(layer, golden * 4.0 / 8)  # scale alpha / lokr_w1_b's rank
    assert layer.rank == 2 * 2 and layer.meta["exact_reduction"] == {
        "lokr_w1": {"factor_rank": 8, "rank": 2}
    }


def test_loha_whose_face_splitting_factors_exceed_delta_w_is_read_exactly(tmp_path):
    """r1 r2 = 16 > min(out, in) = 5: once refused, now delta W exactly at rank 5."""
    r, out, inn = 4, 7, 5
    w = [_randn(out, r, seed=1), _randn(r, inn, seed=2), _randn(out, r, seed=3), _randn(r, inn)]
    names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    t = {f"{M}.{n}": v for n, v in zip(names, w)} | {f"{M}.alpha": torch.tensor(2.0)}
    layer = ll.load_lora(_save(tmp_path, t))[LAYER]
    golden = torch.zeros(out, inn, dtype=torch.float64)
    for p in range(out):
        for q in range(inn):
            h1 = sum(w[0][p, i] * w[1][i, q] for i in range(r))
            h2 = sum(w[2][p, i] * w[3][i, q] for i in range(r))
            golden[p, q] = h1 * h2 * 2.0 / r
    _assert_delta(layer, golden)
    assert layer.rank == 5 and layer.meta["exact_reduction"] == {"factor_rank": 16, "rank": 5}
    # a Tucker conv LoHa the same way: out 3, in 2 x 3 x 3 = 18, r1 r2 = 9 > 3
    t1, t2 = _randn(3, 3, 3, 3, seed=4), _randn(3, 3, 3, 3, seed=5)
    wa = [_randn(3, 3, seed=6), _randn(3, 2, seed=7), _randn(3, 3, seed=8), _randn(3, 2, seed=9)]
    keys = dict(hada_t1=t1, hada_t2=t2, hada_w1_a=wa[0], hada_w1_b=wa[1])
    keys |= dict(hada_w2_a=wa[2], hada_w2_b=wa[3])
    conv = ll.load_lora(
        _save(tmp_path, {f"{M}.{k}": v for k, v in keys.items()}, "conv.safetensors")
    )[LAYER]
    h1 = torch.einsum("ijhw,jq,ip->pqhw", t1, wa[1], wa[0])
    h2 = torch.einsum("ijhw,jq,ip->pqhw", t2, wa[3], wa[2])
    _assert_delta(conv, h1 * h2)
    assert conv.rank == 3 and conv.meta["kernel_size"] == [3, 3]


def test_expanded_factors_past_the_file_limit_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(lycoris, "MAX_EXPANDED_ELEMENTS", 100)
    t = {f"{M}.hada_w1_a": _randn(30, 2), f"{M}.hada_w1_b": _randn(2, 30)}
    t |= {f"{M}.hada_w2_a": _randn(30, 2), f"{M}.hada_w2_b": _randn(2, 30)}
    path = _save(tmp_path, t)
    with pytest.raises(ll.LoRAFormatError, match="protect memory") as info:
        ll.load_lora(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("tensors", "needle"),
    [
        ({"hada_w1_a": (4, 2), "hada_w1_b": (2, 5), "hada_w2_a": (4, 2)}, "needs hada_w2_b"),
        (
            {"hada_w1_a": (4, 2), "hada_w1_b": (2, 5), "hada_w2_a": (4, 3), "hada_w2_b": (2, 5)},
            "do not fit",
        ),
        (
            {"hada_w1_a": (4, 2), "hada_w1_b": (2, 5), "hada_w2_a": (3, 2), "hada_w2_b": (2, 5)},
            "different shapes",
        ),
        ({"lokr_w1": (2, 2), "lokr_w2_a": (3, 1)}, "needs lokr_w2_b"),
        ({"lokr_w1": (2, 2), "lokr_w1_a": (2, 1), "lokr_w2": (3, 3)}, "both lokr_w1"),
        ({"lora_down.weight": (2, 3, 1, 1), "lora_mid.weight": (2, 2, 3, 3)}, "needs B"),
        ({"hada_w1_a": (4, 2), "lora_up.weight": (4, 2)}, "LyCORIS LoHa and LoRA"),
    ],
)
def test_malformed_lycoris_layers_are_refused_naming_file_and_reason(tmp_path, tensors, needle):
    path = _save(tmp_path, {f"{M}.{k}": _randn(*s) for k, s in tensors.items()})
    with pytest.raises(ll.LoRAFormatError) as info:
        ll.load_lora(path)
    assert str(path) in str(info.value) and needle in str(info.value)


def test_nonfinite_lycoris_factors_and_overflowing_scale_are_refused(tmp_path):
    w1a = _randn(12, 2)
    w1a[0, 0] = float("nan")
    t = {f"{M}.hada_w1_a": w1a, f"{M}.hada_w1_b": _randn(2, 10)}
    t |= {f"{M}.hada_w2_a": _randn(12, 2), f"{M}.hada_w2_b": _randn(2, 10)}
    path = _save(tmp_path, t)
    with pytest.raises(ll.LoRAFormatError, match="NaN/inf"):
        ll.load_lora(path)
    assert not torch.isfinite(ll.load_lora(path, allow_nonfinite=True)[LAYER].U).all()
    t[f"{M}.hada_w1_a"] = _randn(12, 2)
    t[f"{M}.alpha"] = torch.tensor(3e38)
    with pytest.raises(ll.LoRAFormatError, match=r"NaN/inf|overflows"):
        ll.load_lora(_save(tmp_path, t, "huge.safetensors"))


@pytest.mark.parametrize(
    ("key", "family"),
    [("oft_blocks", "OFT"), ("on_input", "IA3"), ("diff", "full weight differences")],
)
def test_unsupported_lycoris_files_name_lycoris(tmp_path, key, family):
    path = _save(tmp_path, {f"{M}.{key}": _randn(4, 4)})
    for call in (ll.detect_format, ll.load_lora):
        with pytest.raises(ll.LoRAFormatError) as info:
            call(path)
        msg = str(info.value)
        assert str(path) in msg and family in msg and "no LoRA keys found" not in msg


# ----------------------------------------------------------------------------- hypothesis


@settings(max_examples=40, deadline=None)
@given(
    out=st.integers(1, 7),
    inn=st.integers(1, 7),
    r1=st.integers(1, 3),
    alpha=st.sampled_from([0.0, 1.0, 2.5]),
    seed=st.integers(0, 10_000),
)
def test_loha_is_exact_for_small_random_shapes(tmp_path_factory, out, inn, r1, alpha, seed):
    w = [_randn(out, r1, seed=seed), _randn(r1, inn, seed=seed + 1)]
    w += [_randn(out, r1, seed=seed + 2), _randn(r1, inn, seed=seed + 3)]
    names = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    t = {f"{M}.{n}": v for n, v in zip(names, w)} | {f"{M}.alpha": torch.tensor(alpha)}
    path = _save(tmp_path_factory.mktemp("loha"), t)
    golden = (w[0] @ w[1]) * (w[2] @ w[3]) * (alpha / r1 if alpha else 1.0)
    layer = ll.load_lora(path)[LAYER]
    _assert_delta(layer, golden)
    assert layer.rank == min(r1 * r1, out, inn)


@settings(max_examples=40, deadline=None)
@given(
    shape1=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    shape2=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    r=st.integers(1, 3),
    factored=st.sampled_from(["w1", "w2", "both", "none"]),
    seed=st.integers(0, 10_000),
)
def test_lokr_is_exact_for_small_random_shapes(tmp_path_factory, shape1, shape2, r, factored, seed):
    t, halves = {}, []
    for i, (rows, cols) in ((1, shape1), (2, shape2)):
        if factored in (f"w{i}", "both"):
            a, b = _randn(rows, r, seed=seed + i), _randn(r, cols, seed=seed + 10 + i)
            t[f"{M}.lokr_w{i}_a"], t[f"{M}.lokr_w{i}_b"] = a, b
            halves.append(a @ b)
        else:
            t[f"{M}.lokr_w{i}"] = halves.append(_randn(rows, cols, seed=seed + i)) or halves[-1]
    t[f"{M}.alpha"] = torch.tensor(2.0)
    path = _save(tmp_path_factory.mktemp("lokr"), t)
    scale = 1.0 if factored == "none" else 2.0 / r
    out, inn = shape1[0] * shape2[0], shape1[1] * shape2[1]
    layer = ll.load_lora(path)[LAYER]
    _assert_delta(layer, torch.kron(halves[0], halves[1]) * scale)
    assert layer.rank <= min(out, inn)


# ----------------------------------------------------------------------------- lycoris-lora


def _lycoris_module(kind: str, org: torch.nn.Module, seed: int):
    """A lycoris-lora module of ``kind`` on ``org``, every parameter drawn N(0, 1)."""
    modules = pytest.importorskip("lycoris.modules")
    cls, kw = {
        "loha": (modules.LohaModule, {"lora_dim": 3, "alpha": 2.0}),
        "loha-wide": (modules.LohaModule, {"lora_dim": 5, "alpha": 2.0}),  # 25 > 16 outputs
        "loha-tucker": (modules.LohaModule, {"lora_dim": 2, "alpha": 1.0, "use_tucker": True}),
        "lokr": (modules.LokrModule, {"lora_dim": 2, "alpha": 3.0, "factor": 4}),
        "lokr-tucker": (
            modules.LokrModule,
            {"lora_dim": 2, "alpha": 1.0, "factor": 2, "use_tucker": True},
        ),
        "locon-tucker": (modules.LoConModule, {"lora_dim": 3, "alpha": 6.0, "use_tucker": True}),
    }[kind]
    module = cls("lycoris_x", org, 1.0, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad and p is not org.weight:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return module


@pytest.mark.parametrize(
    ("kind", "conv"),
    [
        ("loha", False),
        ("loha", True),
        ("loha-wide", True),
        ("loha-tucker", True),
        ("lokr", False),
        ("lokr", True),
        ("lokr-tucker", True),
        ("locon-tucker", True),
    ],
)
def test_lycoris_lora_modules_forward_equals_the_delta_read(tmp_path, kind, conv):
    """lycoris-lora's own forward (what it adds to the base layer's output) equals x through
    the delta W loralens reads from the module's saved state dict."""
    torch.manual_seed(0)
    org = (
        torch.nn.Conv2d(8, 16, 3, padding=1, bias=False)
        if conv
        else torch.nn.Linear(32, 24, bias=False)
    )
    module = _lycoris_module(kind, org, seed=1)
    sd = {f"lycoris_x.{k}": v.detach() for k, v in module.custom_state_dict().items()}
    path = tmp_path / "lyco.safetensors"
    save_file({k: v.float().contiguous() for k, v in sd.items()}, path)
    weight = org.weight.detach().clone()
    module.apply_to()
    x = torch.randn(2, 8, 6, 6) if conv else torch.randn(5, 32)
    with torch.no_grad():
        added = org(x) - (
            torch.nn.functional.conv2d(x, weight, padding=1) if conv else x @ weight.T
        )
        layer = ll.load_lora(path)["lycoris_x"]
        delta = layer.delta_weight().reshape(weight.shape)
        ours = torch.nn.functional.conv2d(x, delta, padding=1) if conv else x @ delta.T
    torch.testing.assert_close(ours, added, rtol=1e-4, atol=1e-4)
    assert layer.meta["lycoris"] == kind.split("-")[0]
    if kind == "loha-wide":  # read through the exact reduction, at rank min(out, in) = 16
        assert layer.meta["exact_reduction"] == {"factor_rank": 25, "rank": 16}
