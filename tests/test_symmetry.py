"""The GL(r)/O(r) actions and the invariance checks shipped to users."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import loralens as ll
from helpers import random_lora
from loralens.errors import InputError
from loralens.symmetry import (
    assert_gl_equivariant,
    gl_equivariance_error,
    random_gl,
    random_orthogonal,
)

SHAPES = ((6, 5), (4, 7), (9, 3))

structures = st.integers(1, 3).flatmap(
    lambda L: st.tuples(
        st.lists(st.tuples(st.integers(1, 8), st.integers(1, 8)), min_size=L, max_size=L),
        st.lists(st.lists(st.integers(0, 5), min_size=L, max_size=L), min_size=1, max_size=3),
        st.integers(0, 2**31 - 1),
    )
)


@settings(max_examples=15, deadline=None)
@given(structures)
def test_gl_transform_keeps_every_delta_and_padding(structure):
    shapes, rank_rows, seed = structure
    loras = [random_lora(r, shapes, seed + k) for k, r in enumerate(rank_rows)]
    batch = ll.collate(loras)
    moved = ll.gl_transform(batch, seed)
    assert torch.equal(moved.ranks, batch.ranks)
    for d0, d1 in zip(batch.delta_weights(), moved.delta_weights()):
        assert torch.allclose(d0, d1, rtol=1e-9, atol=1e-14)
    for i, (u, v) in enumerate(zip(moved.U, moved.V)):
        for b in range(len(batch)):
            k = int(batch.ranks[b, i])
            assert not u[b, :, k:].any() and not v[b, :, k:].any()
    for lora in loras:
        one = ll.gl_transform(lora, seed)
        for name, d in lora.delta_weights().items():
            assert torch.allclose(d, one.delta_weights()[name], rtol=1e-9, atol=1e-14)
        oq = ll.o_transform(lora, seed)
        for la, lb in zip(lora.layers, oq.layers):
            assert torch.allclose(la.delta_weight(), lb.delta_weight(), rtol=1e-9, atol=1e-14)
            # orthogonal: Gram matrices are conjugated, norms kept
            assert torch.allclose(la.U.norm(), lb.U.norm(), rtol=1e-12)


def test_transforms_really_move_the_factors_and_are_seeded():
    lora = random_lora([3, 2, 4], SHAPES)
    a, b, c = ll.gl_transform(lora, 1), ll.gl_transform(lora, 1), ll.gl_transform(lora, 2)
    assert torch.equal(a.layers[0].U, b.layers[0].U)
    assert not torch.allclose(a.layers[0].U, c.layers[0].U)
    assert not torch.allclose(a.layers[0].U, lora.layers[0].U)
    # the gl action really changes the norms of the factors (not only a rotation)
    assert not torch.allclose(a.layers[0].U.norm(), lora.layers[0].U.norm(), rtol=1e-3)


def test_random_group_elements_are_well_conditioned_and_orthogonal():
    g = torch.Generator().manual_seed(0)
    for r in (1, 2, 5, 16):
        R = random_gl(r, g, cond=10.0)
        s = torch.linalg.svdvals(R)
        assert s.max() / s.min() <= 10.0 + 1e-9
        Q = random_orthogonal(r, g)
        assert torch.allclose(Q.T @ Q, torch.eye(r, dtype=Q.dtype), atol=1e-12)
    with pytest.raises(ValueError, match="cond"):
        random_gl(3, g, cond=0.5)


def test_transform_keeps_dtype_and_works_in_low_precision():
    lora = random_lora([2, 2, 2], SHAPES, dtype=torch.bfloat16)
    moved = ll.gl_transform(ll.collate([lora]), 0)
    assert moved.dtype == torch.bfloat16
    assert moved.U[0].shape == (1, 6, 2)


def _delta_norm_model(batch):
    return torch.stack([d.flatten(1).norm(dim=1) for d in batch.delta_weights()], dim=1)


def _u_sum_model(batch):
    return torch.stack([u.sum(dim=(1, 2)) for u in batch.U], dim=1)


def test_invariance_checks_pass_and_fail_when_they_should():
    batch = ll.collate([random_lora([3, 2, 1], SHAPES, 1), random_lora([1, 2, 3], SHAPES, 2)])
    assert ll.gl_invariance_error(_delta_norm_model, batch) < 1e-12
    assert ll.assert_gl_invariant(_delta_norm_model, batch) < 1e-12
    assert ll.assert_o_invariant(_delta_norm_model, batch) < 1e-12
    assert ll.gl_invariance_error(_u_sum_model, batch) > 1e-2
    with pytest.raises(AssertionError, match="not GL"):
        ll.assert_gl_invariant(_u_sum_model, batch)
    with pytest.raises(AssertionError, match="not O"):
        ll.assert_o_invariant(_u_sum_model, batch)

    # U^T U is O-invariant in trace but not GL-invariant
    def trace_gram(b):
        return torch.stack([(u * u).sum(dim=(1, 2)) for u in b.U], dim=1)

    assert ll.gl_invariance_error(trace_gram, batch, group="o") < 1e-12
    assert ll.gl_invariance_error(trace_gram, batch, group="gl") > 1e-2
    with pytest.raises(ValueError, match="group"):
        ll.gl_invariance_error(trace_gram, batch, group="sl")


def test_invariance_check_leaves_a_module_untouched():
    batch = ll.collate([random_lora([2, 2, 2], SHAPES)])
    model = ll.build_model("mlp-svd", like=batch, out_dim=2)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ll.assert_gl_invariant(model, batch)
    assert model.training
    assert next(model.parameters()).dtype == torch.float32
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_equivariance_check():
    batch = ll.collate([random_lora([3, 2, 1], SHAPES, 1), random_lora([1, 2, 3], SHAPES, 2)])
    mats = [torch.randn(7, o, dtype=torch.float64) for o, _ in batch.shapes]

    def left_multiply(b):  # U -> M U, V -> V: equivariant
        return ll.LoRABatch(b.names, [m @ u for m, u in zip(mats, b.U)], list(b.V), b.ranks)

    def right_square(b):  # U -> U (U^T U): not equivariant
        return ll.LoRABatch(b.names, [u @ (u.transpose(1, 2) @ u) for u in b.U], list(b.V), b.ranks)

    assert assert_gl_equivariant(left_multiply, batch) < 1e-12
    assert gl_equivariance_error(right_square, batch) > 1e-2
    assert gl_equivariance_error(right_square, batch, group="o") < 1e-12


@settings(max_examples=20, deadline=None)
@given(
    factor=st.integers(1, 5),
    shapes=st.lists(
        st.tuples(st.integers(1, 9), st.integers(1, 9), st.integers(1, 4)), min_size=1, max_size=3
    ),
)
def test_lift_width_keeps_every_inner_product_and_singular_value(factor, shapes):
    """Two LoRAs lifted with one seed: each layer is factor times wider, and the Frobenius inner
    product of their updates, their norms and singular values are those of the originals."""
    g = torch.Generator().manual_seed(0)

    def draw() -> ll.LoRA:
        return ll.LoRA(
            [
                ll.LoRALayer(
                    f"l{k}",
                    torch.randn(o, r, generator=g, dtype=torch.float64),
                    torch.randn(i, r, generator=g, dtype=torch.float64),
                )
                for k, (o, i, r) in enumerate(shapes)
            ]
        )

    a, b = draw(), draw()
    la, lb = ll.lift_width(a, factor, seed=3), ll.lift_width(b, factor, seed=3)
    for x, y, lx, ly in zip(a.layers, b.layers, la.layers, lb.layers):
        assert lx.U.shape[0] == factor * x.U.shape[0] and lx.V.shape[0] == factor * x.V.shape[0]
        dx, dy = x.U @ x.V.T, y.U @ y.V.T
        dlx, dly = lx.U @ lx.V.T, ly.U @ ly.V.T
        scale = float(dx.norm() * dy.norm())
        assert abs(float((dlx * dly).sum() - (dx * dy).sum())) <= 1e-10 * scale
        s, sl = torch.linalg.svdvals(dx), torch.linalg.svdvals(dlx)[: len(torch.linalg.svdvals(dx))]
        torch.testing.assert_close(sl, s, rtol=0, atol=1e-10 * float(s[0]))


def test_lift_width_refuses_a_conv_layer():
    conv = ll.LoRALayer("c", torch.randn(4, 2), torch.randn(18, 2), {"kind": "conv"})
    with pytest.raises(InputError, match="'c' is not linear"):
        ll.lift_width(ll.LoRA([conv]), 2)
