"""The canonical form of LoRA layers: exact, GL(r)-invariant, masked where it carries no data."""

import importlib

import pytest
import torch

import loralens as ll
from helpers import random_lora
from loralens.canonical_form import CanonicalCache, canonical_form

#: the module (``loralens.canonical_form`` is also the function, re-exported by the package)
canonical_module = importlib.import_module("loralens.canonical_form")

SHAPES = ((6, 5), (4, 7), (9, 3))


def _batch(ranks=(3, 2, 4), n=3, seed=0):
    return ll.collate([random_lora(list(ranks), SHAPES, seed + k) for k in range(n)])


def _close(a, b, tol=1e-9):
    for x, y in zip(a, b):
        assert torch.equal(x.mask, y.mask)
        for t, u in zip((x.left, x.s, x.right), (y.left, y.s, y.right)):
            assert (t - u).abs().max() <= tol * max(1.0, float(u.abs().max()))


def test_components_rebuild_delta_w_with_orthonormal_vectors():
    batch = _batch()
    for c, d in zip(canonical_form(batch), batch.delta_weights()):
        rebuilt = (c.left * c.s[:, None]) @ c.right.mT
        assert torch.allclose(rebuilt, d, atol=1e-15)
        kept = c.mask[0]
        gram = c.left[0][:, kept].mT @ c.left[0][:, kept]
        assert torch.allclose(gram, torch.eye(int(kept.sum()), dtype=gram.dtype), atol=1e-12)
        assert (c.s[:, :-1] >= c.s[:, 1:]).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_canonical_form_of_u_r_and_v_r_inv_t_equals_that_of_u_v(seed):
    batch = _batch(seed=seed)
    _close(canonical_form(ll.gl_transform(batch, seed + 10)), canonical_form(batch))


def test_qr_route_agrees_with_the_gram_route(monkeypatch):
    batch = _batch(ranks=(3, 3, 3))
    gram = canonical_form(batch)
    monkeypatch.setattr(canonical_module, "GRAM_MAX_COND", 0.0)  # every layer takes QR
    _close(canonical_form(batch), gram)


def test_ill_conditioned_factors_take_qr_and_stay_invariant():
    lora = random_lora([3, 3, 3], SHAPES, 4)
    u = lora.layers[0].U.clone()
    u[:, 2] = u[:, 1] + 1e-7 * u[:, 2]  # condition number ~1e7: the Gram route would lose it
    lora.layers[0] = lora.layers[0].with_factors(u, lora.layers[0].V)
    batch = ll.collate([lora])
    c = canonical_form(batch)[0]
    assert torch.allclose(
        (c.left * c.s[:, None]) @ c.right.mT, batch.delta_weights()[0], atol=1e-18
    )
    _close(canonical_form(ll.gl_transform(batch, 3)), canonical_form(batch), tol=1e-6)


def test_padding_and_zero_components_are_masked_and_zero():
    batch = ll.collate([random_lora([1, 2, 4], SHAPES, 0), random_lora([3, 3, 2], SHAPES, 1)])
    forms = canonical_form(batch)
    # (9, 3) caps layer 2 at rank 3: its 4th component is zero even for the rank-4 LoRA
    assert forms[2].mask.tolist() == [[True, True, True, False], [True, True, False, False]]
    assert forms[0].mask.tolist() == [[True, False, False], [True, True, True]]
    for c in forms:
        assert (c.left[~c.mask[:, None, :].expand_as(c.left)] == 0).all()
        assert (c.s[~c.mask] == 0).all()
    zero = random_lora([2, 2, 2], SHAPES, 2).map_factors(lambda i, la: (la.U * 0, la.V))
    assert not canonical_form(ll.collate([zero]))[0].mask.any()


def test_sign_convention_makes_the_largest_left_entry_positive():
    batch = _batch()
    flipped = ll.collate([lo.map_factors(lambda i, la: (-la.U, -la.V)) for lo in batch.unbatch()])
    _close(canonical_form(flipped), canonical_form(batch))
    for c in canonical_form(batch):
        peak = c.left.gather(1, c.left.abs().argmax(dim=1, keepdim=True))
        assert (peak[c.mask[:, None, :]] > 0).all()


def test_tied_singular_values_do_not_crash():
    # U, V with orthonormal columns: every singular value is 1, the form is any basis (measure
    # zero: the documented case where invariance of the vectors, not of delta W, is lost)
    q = torch.linalg.qr(torch.randn(6, 3, dtype=torch.float64))[0]
    p = torch.linalg.qr(torch.randn(5, 3, dtype=torch.float64))[0]
    lora = ll.LoRA(layers=[ll.LoRALayer("a", q, p)])
    c = canonical_form(ll.gl_transform(ll.collate([lora]), 0))[0]
    assert torch.isfinite(c.left).all() and torch.allclose(c.s, torch.ones(1, 3, dtype=c.s.dtype))
    assert torch.allclose((c.left * c.s[:, None]) @ c.right.mT, q @ p.T, atol=1e-12)


def test_cache_gives_each_lora_its_own_form_in_any_batch_order_padding_or_dtype():
    ranks = [[1 + (k + i) % 4 for i in range(3)] for k in range(6)]  # mixed ranks
    batch = ll.collate([random_lora(r, SHAPES, k) for k, r in enumerate(ranks)])
    cache = CanonicalCache()
    cache(batch.select([4, 2, 0]))  # kept in other batch positions than asked for below
    cache(batch.select([5, 1]).pad_to([6, 6, 6]))  # and some padded wider first
    for order in ([1, 3, 5, 0, 2, 4], [2, 0, 4]):
        sub = batch.select(order)
        _close(cache(sub), canonical_form(sub), tol=1e-12)
    wide = batch.pad_to([5, 5, 5])
    _close(cache(wide), canonical_form(wide), tol=1e-12)
    single = batch.to(torch.float32)
    assert all(c.left.dtype == torch.float32 for c in cache(single))
    _close(cache(single), canonical_form(single), tol=1e-6)
    assert len(cache) == 6 + 2 + 6 + 6  # each LoRA once per layout (padding, dtype)


def test_cache_tells_apart_loras_and_layouts_that_share_bytes():
    cache = CanonicalCache()
    lora = random_lora([3, 2, 3], SHAPES, 0)
    other_v = lora.map_factors(lambda i, la: (la.U, la.V.flip(0)))  # the same U, another V
    cache(ll.collate([lora]))
    _close(cache(ll.collate([other_v])), canonical_form(ll.collate([other_v])), tol=1e-12)
    # zero factors: the same bytes in float64 at width 2 as in float32 at width 4
    zero = random_lora([2, 2, 2], SHAPES, 1).map_factors(
        lambda i, la: (torch.zeros_like(la.U), torch.zeros_like(la.V))  # +0.0, not -0.0
    )
    zero = ll.collate([zero])
    cache(zero)
    wide32 = zero.to(torch.float32).pad_to([4, 4, 4])
    _close(cache(wide32), canonical_form(wide32))
    assert all(c.s.shape == (1, 4) and c.s.dtype == torch.float32 for c in cache(wide32))


def test_cache_past_its_budget_computes_without_keeping():
    batch = _batch()
    cache = CanonicalCache(max_bytes=0)
    _close(cache(batch), canonical_form(batch), tol=1e-12)
    assert len(cache) == 0 and cache.nbytes == 0
