"""Featurizers: flatten, dense, svals (never U V^T), oalign, templates, layer descriptions."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import loralens as ll
from helpers import random_lora
from loralens import features

SHAPES = ((6, 5), (4, 7), (9, 3))


@settings(max_examples=20, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 9), st.integers(1, 9)), min_size=1, max_size=3),
    st.lists(st.integers(0, 6), min_size=3, max_size=3),
    st.integers(1, 8),
    st.integers(0, 1000),
)
def test_svals_match_svdvals_of_the_dense_product(shapes, ranks, k, seed):
    ranks = ranks[: len(shapes)]
    other = [max(r - 1, 0) for r in ranks]
    batch = ll.collate([random_lora(ranks, shapes, seed), random_lora(other, shapes, seed + 1)])
    s = features.svals(batch, k)
    assert s.shape == (2, len(shapes), k)
    for i, d in enumerate(batch.delta_weights()):
        gold = torch.linalg.svdvals(d)  # (2, min(out, in))
        gold = features.pad_rank(gold, k)
        assert torch.allclose(s[:, i], gold, rtol=1e-8, atol=1e-15)
    norms = features.delta_norms(batch)
    for i, d in enumerate(batch.delta_weights()):
        assert torch.allclose(norms[:, i], d.flatten(1).norm(dim=1), rtol=1e-8, atol=1e-15)


def test_svals_and_norms_never_form_the_dense_product():
    # delta W would be 100000 x 100000: 40 GB in float32. The factors are 800 kB each.
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(100_000, 2, generator=g), torch.randn(100_000, 2, generator=g)
    lora = ll.LoRA(layers=[ll.LoRALayer("huge", u, v)])
    batch = ll.collate([lora])
    s = features.svals(batch, 4)
    gram = (u.T @ u).double() @ (v.T @ v).double()
    gold = torch.linalg.eigvals(gram).real.clamp_min(0).sqrt().sort(descending=True).values
    assert torch.allclose(s[0, 0, :2].double(), gold, rtol=1e-4)
    assert s[0, 0, 2:].abs().max() == 0
    assert math.isclose(float(features.delta_norms(batch)[0, 0]), float(gold.norm()), rel_tol=1e-4)
    row = features.describe_layers(lora)[0]
    assert row["shape"] == [100_000, 100_000] and row["rank"] == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_featurizers_keep_the_input_dtype(dtype):
    batch = ll.collate([random_lora([2, 3, 1], SHAPES, dtype=dtype)])
    assert features.svals(batch).dtype == dtype
    assert features.flatten(batch).dtype == dtype
    assert all(d.dtype == dtype for d in features.dense(batch))
    template = random_lora([2, 3, 1], SHAPES, seed=5, dtype=dtype)
    U, _ = features.oalign(batch, template)
    assert U[0].dtype == dtype and U[0].shape == (1, 6, 2)


def test_dense_and_flatten():
    batch = ll.collate([random_lora([2, 3, 1], SHAPES, 1), random_lora([1, 1, 1], SHAPES, 2)])
    for d, u, v in zip(features.dense(batch), batch.U, batch.V):
        assert torch.allclose(d, u @ v.transpose(1, 2))
    flat = features.flatten(batch)
    assert flat.shape == (2, sum((o + i) * r for (o, i), r in zip(SHAPES, [2, 3, 1])))
    # fixed widths: truncate to 1, pad to 4
    one = features.flatten(batch, 1)
    assert one.shape == (2, sum(o + i for o, i in SHAPES))
    assert torch.equal(one[:, :6], batch.U[0][:, :, 0])
    four = features.flatten(batch, [4, 4, 4])
    assert four.shape == (2, 4 * sum(o + i for o, i in SHAPES))
    # rank-major: U_0's first column, then its second, ...; padded columns are zero
    assert torch.equal(four[:, : 6 * 4].reshape(2, 4, 6)[:, :2], batch.U[0].mT)
    assert not four[:, : 6 * 4].reshape(2, 4, 6)[:, 2:].any()
    assert torch.equal(flat[:, 6 * 2 : 6 * 2 + SHAPES[0][1]], batch.V[0][:, :, 0])
    with pytest.raises(ValueError, match="widths"):
        features.flatten(batch, [1, 2])


def test_oalign_is_o_invariant_not_gl_invariant_and_padding_safe():
    template = random_lora([3, 2, 4], SHAPES, seed=9)
    loras = [random_lora([3, 2, 4], SHAPES, seed=1), random_lora([2, 1, 3], SHAPES, seed=2)]
    batch = ll.collate(loras)
    U0, V0 = features.oalign(batch, template)
    assert [u.shape[2] for u in U0] == [3, 2, 4]  # the template's widths
    U1, V1 = features.oalign(ll.o_transform(batch, 3), template)
    for a, b in zip(U0 + V0, U1 + V1):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-13)
    U2, _ = features.oalign(ll.gl_transform(batch, 3), template)
    assert max(float((a - b).abs().max() / a.abs().max()) for a, b in zip(U0, U2)) > 1e-2
    # each LoRA alone gives what it gets in the padded batch
    for k, lora in enumerate(loras):
        Ua, Va = features.oalign(ll.collate([lora]), template)
        for a, b in zip(Ua + Va, U0 + V0):
            assert torch.allclose(a[0], b[k], rtol=1e-9, atol=1e-13)
    # the template aligned to itself is itself
    Ut, _ = features.oalign(ll.collate([template]), template)
    for a, layer in zip(Ut, template.layers):
        assert torch.allclose(a[0], layer.U, atol=1e-12)


def test_pick_template_takes_a_full_rank_lora_of_median_size():
    loras = [random_lora([2, 2, 2], SHAPES, seed=s, scale=sc) for s, sc in enumerate([1, 3, 2, 5])]
    loras.append(random_lora([1, 2, 2], SHAPES, seed=7, scale=2.5))  # not full rank
    t = features.pick_template(loras)
    assert torch.equal(t.layers[0].U, loras[2].layers[0].U)
    assert features.pick_template(ll.collate(loras)).ranks == [2, 2, 2]


def test_effective_rank_and_describe_layers():
    assert math.isclose(
        float(features.effective_rank(torch.tensor([1.0, 1.0, 1.0]))), 3.0, rel_tol=1e-9
    )
    assert math.isclose(float(features.effective_rank(torch.tensor([2.0, 0.0]))), 1.0, rel_tol=1e-9)
    assert float(features.effective_rank(torch.zeros(3))) == 0.0
    lora = random_lora([2, 3, 1], SHAPES)
    lora.layers[0].meta["scale"] = 2.0
    rows = features.describe_layers(lora, k=2)
    for row, layer in zip(rows, lora.layers):
        d = layer.delta_weight()
        assert math.isclose(row["fro_norm"], float(d.norm()), rel_tol=1e-9)
        gold = torch.linalg.svdvals(d)[:2].tolist()
        assert all(math.isclose(a, b, rel_tol=1e-8) for a, b in zip(row["top_svals"], gold))
        assert 1.0 <= row["effective_rank"] <= layer.rank + 1e-9
    assert rows[0]["scale"] == 2.0 and rows[1]["scale"] is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_featurizers_on_cuda():
    batch = ll.collate([random_lora([2, 3, 1], SHAPES, 1), random_lora([1, 1, 1], SHAPES, 2)])
    cpu = features.svals(batch)
    for dtype in (torch.float32, torch.bfloat16):
        gpu = batch.to(device="cuda", dtype=dtype)
        s = features.svals(gpu)
        assert s.device.type == "cuda" and s.dtype == dtype
        assert torch.allclose(s.double().cpu(), cpu, rtol=2e-2, atol=1e-4)
        U, _ = features.oalign(gpu, random_lora([2, 3, 1], SHAPES, 5))
        assert U[0].device.type == "cuda"


def test_inspect_command(tmp_path):
    import json

    from typer.testing import CliRunner

    from loralens.cli import app

    lora = random_lora([2, 3], ((12, 10), (8, 6)), dtype=torch.float32)
    lora = ll.LoRA(
        [ll.LoRALayer(f"model.layers.{i}.q_proj", la.U, la.V) for i, la in enumerate(lora)]
    )
    ll.save_lora(lora, tmp_path / "adapter")
    runner = CliRunner()
    res = runner.invoke(app, ["inspect", str(tmp_path / "adapter"), "--json", "-k", "2"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["num_layers"] == 2 and out["ranks"] == [2, 3]
    for row, layer in zip(out["layers"], lora.layers):
        d = layer.delta_weight().double()
        assert row["shape"] == list(d.shape)
        assert math.isclose(row["fro_norm"], float(d.norm()), rel_tol=1e-5)
        assert len(row["top_svals"]) == 2
    res = runner.invoke(app, ["inspect", str(tmp_path / "adapter")])
    assert res.exit_code == 0 and "model.layers.1.q_proj" in res.output
    res = runner.invoke(app, ["inspect", str(tmp_path / "missing")])
    assert res.exit_code == 1 and "missing" in res.output


@pytest.mark.parametrize("kappa", [1.0, 4.0, 1e3])
def test_svals_stay_accurate_in_float32_at_any_conditioning(kappa):
    """Well-conditioned layers take the fast Gram route, ill-conditioned ones fall back to QR:
    the relative error of every singular value stays near float32 rounding either way."""
    g = torch.Generator().manual_seed(1)
    n, r = 96, 4
    spread = torch.logspace(0, -math.log10(kappa), r, dtype=torch.float64)
    layers = []
    for i in range(3):
        qu, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
        qv, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
        mix, _ = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=torch.float64))
        layers.append(ll.LoRALayer(f"l{i}", (qu * spread * 0.01 @ mix).float(), qv.float()))
    well = ll.LoRA(layers=[ll.LoRALayer(la.name, la.V * 0.01, la.V) for la in layers])
    batch = ll.collate([ll.LoRA(layers=layers), well])
    s = features.svals(batch)
    assert s.dtype == torch.float32
    for i, (u, v) in enumerate(zip(batch.U, batch.V)):
        gold = torch.linalg.svdvals(u.double() @ v.double().mT)[:, :r]
        assert ((s[:, i].double() - gold).abs() / gold).max() < 2e-5


def test_spectral_stats_are_gl_invariant_and_match_the_dense_svd():
    batch = ll.collate([random_lora([3, 2, 4], SHAPES, seed=s) for s in (4, 5)])
    ll.assert_gl_invariant(lambda b: features.spectral_stats(b).flatten(1), batch, tol=1e-8)
    stats = features.spectral_stats(batch)
    assert stats.shape == (2, 3, 4 + len(features.SPECTRAL_STATS))
    for i, w in enumerate(features.dense(batch)):
        s = torch.linalg.svdvals(w[1])
        s = torch.cat([s, s.new_zeros(4)])[:4]
        fro, top, nuc, stable, share, entropy, kurt = stats[1, i, 4:]
        assert torch.allclose(stats[1, i, :4], s, atol=1e-12)
        assert math.isclose(fro, torch.linalg.norm(w[1]), rel_tol=1e-9)
        assert math.isclose(top, s[0], rel_tol=1e-9) and math.isclose(nuc, s.sum(), rel_tol=1e-9)
        assert math.isclose(stable, (s**2).sum() / s[0] ** 2, rel_tol=1e-9)
        assert math.isclose(share, s[0] ** 2 / (s**2).sum(), rel_tol=1e-9)
        p = s**2 / (s**2).sum()
        p = p[p > 0]
        assert math.isclose(entropy, float(-(p * p.log()).sum()), rel_tol=1e-9)
        c = s - s.mean()
        assert math.isclose(kurt, float((c**4).mean() / (c**2).mean() ** 2), rel_tol=1e-9)
