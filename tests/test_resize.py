"""resize is Eckart-Young from the factors: the reported error is the root-sum-square of the
dropped singular values of the dense delta W, the result is as good as a dense truncated SVD,
and energy picks the fewest singular values that hold the share asked for."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import loralens as ll
from loralens.resize import keep_rank, resize_layer

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def layers(draw):
    out, inp, r = draw(st.integers(1, 12)), draw(st.integers(1, 12)), draw(st.integers(1, 8))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    U, V = (
        torch.randn(out, r, generator=g, dtype=torch.float64),
        torch.randn(inp, r, generator=g, dtype=torch.float64),
    )
    if draw(st.booleans()):  # rank-deficient: a repeated column
        U[:, -1] = U[:, 0]
        V[:, -1] = V[:, 0]
    return ll.LoRALayer("m", U, V, {"scale": 0.5}), draw(st.integers(1, 9))


@SETTINGS
@given(layers())
def test_error_is_the_dropped_singular_values_and_matches_dense_svd(case):
    layer, k = case
    small, row = resize_layer(layer, rank=k)
    dense = layer.delta_weight()
    s = torch.linalg.svdvals(dense)
    kept = min(k, layer.rank, *layer.shape)  # no more singular values than that
    assert small.rank == row["new_rank"] == kept
    tail = float(s[kept:].norm())
    actual = float((small.delta_weight() - dense).norm())
    assert row["error"] == pytest.approx(tail, abs=1e-9 * (1 + float(s.norm())))
    assert actual == pytest.approx(tail, abs=1e-9 * (1 + float(s.norm())))
    # optimal: no worse than the dense truncated SVD (kohya's route)
    P, sv, Qt = torch.linalg.svd(dense, full_matrices=False)
    best = (P[:, :kept] * sv[:kept]) @ Qt[:kept]
    assert actual <= float((best - dense).norm()) + 1e-9 * (1 + float(s.norm()))
    assert small.meta["scale"] == 1.0 and small.meta["resized_from_rank"] == layer.rank


@SETTINGS
@given(layers(), st.floats(0.05, 1.0))
def test_energy_keeps_the_fewest_singular_values_holding_the_share(case, energy):
    layer, _ = case
    _, row = resize_layer(layer, energy=energy)
    s2 = torch.linalg.svdvals(layer.delta_weight()) ** 2
    share = lambda k: float(s2[:k].sum() / s2.sum())  # noqa: E731
    k = row["new_rank"]
    assert share(k) >= energy - 1e-9
    assert k == 1 or share(k - 1) < energy + 1e-9


def test_rank_and_energy_are_checked():
    s = torch.tensor([3.0, 2.0, 1.0])
    for kw, msg in [
        ({}, "exactly one"),
        ({"rank": 0}, "at least 1"),
        ({"energy": 1.5}, r"\(0, 1\]"),
    ]:
        with pytest.raises(ValueError, match=msg):
            keep_rank(s, **kw)
    assert keep_rank(torch.zeros(3), energy=0.9) == 1


def test_resize_file_writes_the_input_format_and_reports_each_layer(tmp_path):
    lora = ll.LoRA(
        [
            ll.LoRALayer(f"model.layers.{i}.q_proj", torch.randn(16, 8), torch.randn(12, 8))
            for i in range(2)
        ]
    )
    ll.save_lora(lora, tmp_path / "a")
    from loralens.resize import resize_file

    out, rows = resize_file(tmp_path / "a", tmp_path / "b", rank=3)
    assert ll.detect_format(out) == "peft" and [r["new_rank"] for r in rows] == [3, 3]
    back = ll.load_lora(out)
    for layer, row in zip(lora.layers, rows):
        err = float((back[layer.name].delta_weight() - layer.delta_weight()).norm())
        assert err == pytest.approx(row["error"], rel=1e-4)
    with pytest.raises(ll.errors.OutputExistsError):
        resize_file(tmp_path / "a", tmp_path / "b", rank=3)
