"""w2t beside the others: padding masked, ties survive, and every model's ``embed``."""

import pytest
import torch

import loralens as ll
from helpers import random_lora

SHAPES = ((6, 5), (4, 7), (9, 3))


def _batch(rows=((3, 2, 4), (1, 2, 3), (2, 1, 1)), seed=0):
    return ll.collate([random_lora(list(r), SHAPES, seed + k) for k, r in enumerate(rows)])


def test_w2t_ignores_zero_padded_components():
    batch = _batch()
    torch.manual_seed(0)
    model = ll.build_model("w2t", like=batch, out_dim=2).double().eval()
    with torch.no_grad():
        out = model(batch)
        wide = model(batch.pad_to([9, 9, 9]))
    assert torch.allclose(wide, out, rtol=1e-9, atol=1e-12)


def test_w2t_outputs_are_the_same_with_its_canonical_form_cache_as_without():
    from loralens.canonical_form import canonical_form

    batch = _batch(rows=[(1 + k % 3, 2, 1 + k % 4) for k in range(5)])
    torch.manual_seed(0)
    cached = ll.build_model("w2t", like=batch, out_dim=2).double().eval()
    plain = ll.build_model("w2t", like=batch, out_dim=2).double().eval()
    plain.load_state_dict(cached.state_dict())
    with torch.no_grad(), cached.caching():
        for order in ([4, 1, 3], [0, 1, 2, 3, 4], [3, 2, 1, 0, 4]):  # hits in other positions
            sub = batch.select(order)
            assert torch.allclose(cached(sub), plain(sub), rtol=1e-10, atol=1e-12)
        assert len(cached.canonical) == 5
    assert cached.canonical is canonical_form  # nothing kept past the context


def test_w2t_on_tied_singular_values_runs_forward_and_backward():
    # orthonormal factors: every layer's singular values tie (the measure-zero case)
    def orthonormal(n):
        return torch.linalg.qr(torch.randn(n, 3, dtype=torch.float64))[0]

    layers = [
        ll.LoRALayer(f"l{k}", orthonormal(o), orthonormal(i)) for k, (o, i) in enumerate(SHAPES)
    ]
    batch = ll.collate([ll.LoRA(layers=layers)] * 2)
    model = ll.build_model("w2t", like=batch, out_dim=1).double()
    out = model(batch)
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_w2t_of_a_zero_lora_is_finite():
    zero = random_lora([2, 2, 2], SHAPES, 0).map_factors(lambda i, la: (la.U * 0, la.V))
    model = ll.build_model("w2t", like=zero, out_dim=1).eval()
    assert torch.isfinite(model(ll.collate([zero]))).all()


@pytest.mark.parametrize("name", ll.MODEL_NAMES)
def test_embed_is_what_the_head_reads_and_keeps_invariance(name):
    batch = _batch()
    torch.manual_seed(0)
    model = ll.build_model(name, like=batch, out_dim=2).double().eval()
    with torch.no_grad():
        emb = model.embed(batch)
    assert emb.ndim == 2 and emb.shape[0] == len(batch) and torch.isfinite(emb).all()
    if model.gl_invariant:
        assert ll.gl_invariance_error(model.embed, batch, dtype=None) < 1e-6
