"""The update basis (models.basis): what a model's projection keeps, at any width."""

from __future__ import annotations

import pytest
import torch

import loralens as ll
from loralens.lora import LoRABatch
from loralens.models import basis as basis_module
from loralens.models.basis import UpdateBasis, bases_bytes

SHAPES = ((20, 12), (8, 30), (16, 16))


def _batch(n: int = 12, rank: int = 3, seed: int = 0, shapes=SHAPES) -> LoRABatch:
    g = torch.Generator().manual_seed(seed)
    loras = [
        ll.LoRA(
            [
                ll.LoRALayer(
                    f"l{i}",
                    torch.randn(o, rank, generator=g, dtype=torch.float64),
                    torch.randn(m, rank, generator=g, dtype=torch.float64) * (1 + k % 3),
                )
                for i, (o, m) in enumerate(shapes)
            ]
        )
        for k in range(n)
    ]
    return ll.collate(loras)


def _lift(batch: LoRABatch, factor: int, seed: int = 1) -> LoRABatch:
    """Every layer embedded isometrically in one ``factor`` times wider: U' = Q_out U,
    V' = Q_in V with fixed orthonormal columns (the same Q for every LoRA)."""
    g = torch.Generator().manual_seed(seed)
    us, vs = [], []
    for u, v in zip(batch.U, batch.V):
        q_out = torch.linalg.qr(torch.randn(u.shape[1] * factor, u.shape[1], generator=g).double())
        q_in = torch.linalg.qr(torch.randn(v.shape[1] * factor, v.shape[1], generator=g).double())
        us.append(q_out.Q @ u)
        vs.append(q_in.Q @ v)
    return LoRABatch(names=list(batch.names), U=us, V=vs, ranks=batch.ranks)


def _gram(batch: LoRABatch) -> torch.Tensor:
    flat = torch.cat([w.flatten(1) for w in batch.delta_weights()], dim=1)
    return flat @ flat.T


def test_projection_keeps_every_inner_product_of_the_updates_it_was_fitted_on():
    """Inside the span of the fitted updates the projection is an isometry: the Gram matrix of
    the projected updates is that of the updates (to 1e-10 of the largest entry)."""
    batch = _batch()
    projected = UpdateBasis.fit(batch).project(batch)
    want, got = _gram(batch), _gram(projected)
    assert torch.allclose(got, want, atol=1e-10 * float(want.abs().max()), rtol=0)


def test_a_lifted_zoo_projects_to_the_same_updates():
    """Embedding every layer in a 16x wider one changes no projected factor (to 1e-9 of the
    factors' scale): the bases rotate with the layer and the sign rule keeps their signs."""
    batch = _batch()
    wide = _lift(batch, 16)
    small = UpdateBasis.fit(batch).project(batch)
    large = UpdateBasis.fit(wide).project(wide)
    assert [u.shape for u in small.U] == [u.shape for u in large.U]
    for a, b in zip([*small.U, *small.V], [*large.U, *large.V]):
        assert torch.allclose(a, b, atol=1e-9 * float(a.abs().max()), rtol=0)


def test_bases_stay_within_their_budget_at_any_width(monkeypatch):
    """Where the updates span more than the budget allows, the bases keep the leading
    directions: features and bytes within the bounds, energy kept reported below 1."""
    monkeypatch.setattr(basis_module, "BASIS_FEATURES", 3 * 6 * 6)
    monkeypatch.setattr(basis_module, "BASIS_BYTES", 10**9)
    basis = UpdateBasis.fit(_batch(n=20, rank=4))
    assert sum(a * b for a, b in basis.sizes) <= 3 * 6 * 6
    assert all(a <= 6 and b <= 6 for a, b in basis.sizes)
    assert 0 < basis.energy() < 1
    monkeypatch.setattr(basis_module, "BASIS_FEATURES", 10**9)
    monkeypatch.setattr(basis_module, "BASIS_BYTES", 4 * 2 * sum(o + i for o, i in SHAPES))
    assert bases_bytes(UpdateBasis.fit(_batch(n=20, rank=4))) <= basis_module.BASIS_BYTES


def test_the_randomized_route_finds_the_leading_directions(monkeypatch):
    """Past EXACT_BELOW, the seeded range finder's top directions span the exact ones (the
    projection of one on the other has singular values 1 to 1e-6) where updates share a few
    leading directions, as a zoo's finetunes of one base do."""
    g = torch.Generator().manual_seed(0)
    shared = torch.linalg.qr(torch.randn(300, 8, generator=g, dtype=torch.float64)).Q
    weights = torch.logspace(1, 0, 8, dtype=torch.float64)
    us = [
        shared @ (weights[:, None] * torch.randn(8, 4, generator=g, dtype=torch.float64))
        + 1e-3 * torch.randn(300, 4, generator=g, dtype=torch.float64)
        for _ in range(40)
    ]
    vs = [torch.randn(200, 4, generator=g, dtype=torch.float64) for _ in range(40)]
    batch = ll.collate([ll.LoRA([ll.LoRALayer("l", u, v)]) for u, v in zip(us, vs)])
    _, f_out = basis_module.side_factors([batch])[0]
    exact, _ = basis_module.leading_directions(f_out, 8)
    monkeypatch.setattr(basis_module, "EXACT_BELOW", 50)
    fast, _ = basis_module.leading_directions(f_out, 8)
    overlap = torch.linalg.svdvals(exact @ fast.T)
    assert float(overlap.min()) > 1 - 1e-6


@pytest.mark.parametrize("name", ll.MODEL_NAMES)
def test_a_model_reading_through_a_basis_is_invariant_and_rebuilds(name):
    """Every model built with a fitted basis keeps its invariances (the projection commutes
    with GL(r)) and is rebuilt from its hyperparameters and state dict to the same outputs."""
    batch = _batch(n=8)
    model = ll.build_model(name, like=batch, out_dim=2, basis=UpdateBasis.fit(batch))
    model = model.double().eval()
    out = model(batch)
    if model.gl_invariant:
        ll.assert_gl_invariant(model, batch)
    again = ll.build_model(name, like=model.spec, out_dim=2, **model.hparams).double().eval()
    again.load_state_dict(model.state_dict())
    assert torch.equal(again(batch), out)
    assert model.hparams["basis"] == UpdateBasis.flat(model.basis.sizes)
