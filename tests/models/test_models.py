"""The six LoL models: invariances, padding, rank generalization, rebuild, cost, training."""

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import loralens as ll
from helpers import random_lora
from loralens.models import GLNonlinearity, example_batch
from loralens.models.glnet import EquivariantLinear
from loralens.symmetry import gl_equivariance_error


def _lora(ranks, shapes, seed=0, dtype=torch.float64, scale=1e-2):
    return random_lora(ranks, shapes, seed, dtype, scale, v_scale=scale * 10)


SHAPES = ((6, 5), (4, 7), (9, 3))
GL_INVARIANT = [
    ("mlp-svd", {}),
    ("mlp-dense", {}),
    ("glnet", {}),
    ("glnet", {"blocks": 2, "head": "mlp", "nonlinearity": "relu-sign"}),
    (
        "glnet",
        {
            "blocks": 2,
            "head": "transformer",
            "nonlinearity": "sigmoid",
            "d_model": 16,
            "n_layers": 1,
        },
    ),
    ("w2t", {"d_model": 16, "n_heads": 2, "n_layers": 1}),
    ("w2t", {"bilinear": True, "dropout": 0.1}),
]
ALL = [*GL_INVARIANT, ("mlp", {}), ("mlp-oalign", {})]


def _mixed_batch(shapes=SHAPES, seed=0):
    rows = [[3, 2, 4], [1, 2, 3], [2, 1, 1]]
    return ll.collate([_lora(r, shapes, seed + k) for k, r in enumerate(rows)])


structures = st.tuples(
    st.lists(st.tuples(st.integers(2, 9), st.integers(2, 9)), min_size=2, max_size=3),
    st.integers(0, 10_000),
)


@settings(max_examples=3, deadline=None)
@given(structures)
def test_invariant_models_are_gl_invariant_in_float64(structure):
    shapes, seed = structure
    batch = ll.collate(
        [_lora([3] * len(shapes), shapes, seed), _lora([2] * len(shapes), shapes, seed + 1)]
    )
    torch.manual_seed(seed)
    for name, hp in GL_INVARIANT:
        model = ll.build_model(name, like=batch, out_dim=3, **hp)
        assert ll.gl_invariance_error(model, batch, seed=seed, trials=2) < 1e-6, (name, hp)
        assert ll.gl_invariance_error(model, batch, group="o", seed=seed, trials=1) < 1e-6
        assert model.gl_invariant and model.o_invariant


def test_oalign_is_o_invariant_but_not_gl_invariant():
    batch = _mixed_batch()
    model = ll.build_model("mlp-oalign", like=batch, out_dim=3)
    assert ll.assert_o_invariant(model, batch) < 1e-6
    assert ll.gl_invariance_error(model, batch) > 1e-3
    with pytest.raises(AssertionError, match="not GL"):
        ll.assert_gl_invariant(model, batch)


def test_plain_mlp_is_not_even_o_invariant():
    batch = _mixed_batch()
    model = ll.build_model("mlp", like=batch, out_dim=3)
    assert ll.gl_invariance_error(model, batch, group="o") > 1e-3
    with pytest.raises(AssertionError, match="not O"):
        ll.assert_o_invariant(model, batch)


@pytest.mark.parametrize(("name", "hp"), ALL)
def test_padded_batch_gives_each_lora_its_own_output(name, hp):
    batch = _mixed_batch()
    torch.manual_seed(0)
    model = ll.build_model(name, like=batch, out_dim=2, **hp).double().eval()
    with torch.no_grad():
        together = model(batch)
        for k, lora in enumerate(batch.unbatch()):
            alone = model(ll.collate([lora]))
            assert torch.allclose(alone[0], together[k], rtol=1e-9, atol=1e-12), name


def test_glnet_equivariant_layers_are_gl_equivariant():
    batch = _mixed_batch()
    for kind in GLNonlinearity.KINDS:
        model = ll.build_model("glnet", like=batch, out_dim=1, blocks=2, nonlinearity=kind)
        model = model.double().eval()
        err = gl_equivariance_error(model.equivariant_features, batch)
        assert err < 1e-9, kind
    lin = EquivariantLinear(batch.shapes, 5).double()

    def apply(b):
        U, V = lin(b.U, b.V)
        return ll.LoRABatch(b.names, U, V, b.ranks)

    assert gl_equivariance_error(apply, batch, dtype=None) < 1e-9


def test_glnet_gates_rows_by_the_row_sums_of_the_product():
    u = torch.tensor([[[1.0], [-1.0]]])  # (1, 2, 1)
    v = torch.tensor([[[2.0], [1.0], [0.5]]])  # (1, 3, 1)
    (gu,), (gv,) = GLNonlinearity("relu-sign")([u], [v])
    assert torch.equal(gu, torch.tensor([[[1.0], [0.0]]]))  # row sums of U V^T: 3.5, -3.5
    assert torch.equal(gv, torch.zeros_like(v))  # column sums: 0, 0, 0 -> not > 0


@pytest.mark.parametrize("name", ["glnet", "mlp-svd", "mlp-dense", "mlp", "mlp-oalign", "w2t"])
def test_any_rank_at_inference(name):
    train_like = ll.collate([_lora([4, 4, 4], SHAPES, s) for s in range(3)])
    model = ll.build_model(name, like=train_like, out_dim=2).double().eval()
    for r in (1, 8):
        out = model(ll.collate([_lora([r] * 3, SHAPES, 7)]))
        assert out.shape == (1, 2) and torch.isfinite(out).all()


@pytest.mark.parametrize(("name", "hp"), ALL)
def test_rebuild_from_hparams_and_state_dict(name, hp):
    batch = _mixed_batch(seed=3).to(torch.float32)
    model = ll.build_model(name, like=batch, out_dim=4, **hp)
    model.train()
    model(batch)  # moves the running statistics away from their initial values
    model.eval()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    import json

    hparams = json.loads(json.dumps(model.hparams))  # what a checkpoint stores
    spec = ll.LayerSpec.from_dict(json.loads(json.dumps(model.spec.to_dict())))
    rebuilt = ll.build_model(model.name, like=spec, out_dim=model.out_dim, **hparams)
    rebuilt.load_state_dict(torch.load(buf, weights_only=True))
    rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(model(batch), rebuilt(batch))


def test_oalign_template_is_data_not_a_parameter():
    batch = _mixed_batch()
    template = _lora([2, 2, 2], SHAPES, seed=11)
    model = ll.build_model("mlp-oalign", like=batch.spec, out_dim=1, template=template)
    assert model.hparams["ranks"] == [2, 2, 2]
    assert torch.equal(model.template[0][0], template.layers[0].U.float())
    names = {n for n, _ in model.named_parameters()}
    assert not any("template" in n for n in names)
    assert any("template" in n for n in model.state_dict())
    with pytest.raises(ValueError, match="template layer 0"):
        model.set_template(_lora([3, 2, 2], SHAPES))
    empty = ll.build_model("mlp-oalign", like=batch.spec, out_dim=1)
    with pytest.raises(RuntimeError, match="no template yet"):
        empty(batch)
    empty.set_template(_lora(list(batch.spec.ranks), SHAPES, seed=12))
    assert empty(batch).shape == (3, 1)


def test_clear_errors():
    batch = _mixed_batch()
    with pytest.raises(ValueError, match=r"unknown model 'gnn'.*glnet"):
        ll.build_model("gnn", like=batch, out_dim=1)
    with pytest.raises(ValueError, match=r"no hyperparameter.*'widht'"):
        ll.build_model("glnet", like=batch, out_dim=1, widht=3)
    with pytest.raises(ValueError, match="head must be"):
        ll.build_model("glnet", like=batch, out_dim=1, head="gru")
    model = ll.build_model("glnet", like=batch, out_dim=1)
    other = ll.collate([_lora([2, 2, 2], ((6, 5), (4, 8), (9, 3)))])
    with pytest.raises(ValueError, match=r"l1: \(4, 8\) != \(4, 7\)"):
        model(other)


def test_mlp_dense_refuses_gpt3_shapes_up_front():
    spec = ll.LayerSpec(
        names=tuple(f"h.{i}.attn" for i in range(96)),
        shapes=((12288, 12288),) * 96,
        ranks=(4,) * 96,
    )
    with pytest.raises(MemoryError, match=r"mlp-dense does not fit.*GiB.*glnet"):
        ll.build_model("mlp-dense", like=spec, out_dim=1)
    with pytest.raises(MemoryError, match="GiB"):
        ll.build_model("mlp-dense", like=_mixed_batch(), out_dim=1, max_gib=1e-6)


def test_model_cost_counts_params_and_featurization_flops():
    batch = _mixed_batch()
    costs = {}
    for name in ll.MODEL_NAMES:
        model = ll.build_model(name, like=batch, out_dim=1)
        cost = ll.model_cost(model)
        assert cost["params"] == sum(p.numel() for p in model.parameters())
        assert cost["flops"] > 0
        costs[name] = cost
    # dense featurization alone is 2 * out * in * r per layer
    dense = ll.build_model("mlp-dense", like=batch, out_dim=1)
    assert costs["mlp-dense"]["flops"] >= sum(2 * o * i * 4 for o, i in batch.shapes)
    # glnet's cost grows linearly in the width of the base model; dense's quadratically
    wide = ll.LayerSpec(("a",), ((512, 512),), (4,))
    wider = ll.LayerSpec(("a",), ((1024, 1024),), (4,))
    g1 = ll.model_cost(ll.build_model("glnet", like=wide, out_dim=1))["flops"]
    g2 = ll.model_cost(ll.build_model("glnet", like=wider, out_dim=1))["flops"]
    assert g2 < 2.5 * g1
    d1 = ll.model_cost(ll.build_model("mlp-dense", like=wide, out_dim=1, hidden=4))["flops"]
    d2 = ll.model_cost(ll.build_model("mlp-dense", like=wider, out_dim=1, hidden=4))["flops"]
    assert d2 > 3.5 * d1
    assert dense.training  # model_cost restores the mode


@pytest.mark.parametrize("name", ll.MODEL_NAMES)
def test_float32_and_bfloat16_forward_and_backward(name):
    batch = _mixed_batch().to(torch.float32)
    model = ll.build_model(name, like=batch, out_dim=2)
    out = model(batch)
    out.sum().backward()
    assert out.dtype == torch.float32
    bf = model.to(torch.bfloat16)
    out = bf(batch)  # the batch is cast to the model's dtype
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def _toy_task(n=64, seed=0):
    """LoRAs at raw, varied scales; the target depends on the delta W only (GL-invariant)."""
    g = torch.Generator().manual_seed(seed)
    loras, ys = [], []
    for k in range(n):
        scale = 10 ** (-3 + 2 * torch.rand(1, generator=g).item())
        lora = _lora(
            [2, 2], ((8, 6), (5, 7)), seed=seed * 1000 + k, dtype=torch.float32, scale=scale
        )
        d0 = lora.layers[0].delta_weight()
        ys.append([float(torch.log10(d0.norm())), float(d0[0, 0] / d0.norm())])
        loras.append(lora)
    return ll.collate(loras), torch.tensor(ys)


@pytest.mark.parametrize(
    ("name", "hp"),
    [
        ("mlp-svd", {}),
        ("mlp-dense", {}),
        ("glnet", {}),
        ("glnet", {"head": "transformer", "hidden": 8}),
        ("w2t", {}),
        ("w2t", {"bilinear": True}),
    ],
)
def test_models_train_out_of_the_box_on_raw_lora_scales(name, hp):
    batch, y = _toy_task()
    y = (y - y.mean(0)) / y.std(0)
    torch.manual_seed(0)
    model = ll.build_model(name, like=batch, out_dim=2, **hp)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(batch), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], (name, losses[0], losses[-1])
    assert torch.isfinite(model(batch)).all()


def test_example_batch_follows_the_spec():
    spec = _mixed_batch().spec
    b = example_batch(spec, batch_size=2)
    assert b.spec == spec and len(b) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ll.MODEL_NAMES)
def test_models_on_cuda(name):
    batch = _mixed_batch()
    model = ll.build_model(name, like=batch, out_dim=2).double().eval()
    cpu = model(batch)
    gpu_model = model.to("cuda")
    out = gpu_model(batch)  # moved to the model's device
    assert out.device.type == "cuda"
    assert torch.allclose(out.cpu(), cpu, rtol=1e-6, atol=1e-8)
    assert ll.gl_invariance_error(gpu_model, batch) < (1e-6 if model.gl_invariant else float("inf"))
    bf = gpu_model.to(torch.bfloat16)
    assert torch.isfinite(bf(batch)).all()
