"""Model hyperparameters are checked (type, range, size) on every build, and a model's state
shapes can be known without allocating it (the meta device), which is what lets ``load_run``
and ``train`` refuse a 10 GB request before making it."""

from __future__ import annotations

import pytest
import torch

import loralens as ll
from loralens.models import MODEL_NAMES, HParamError, ModelSizeError
from loralens.models.registry import _REGISTRY, check_fits, check_hparams, state_shapes

SPEC = ll.LayerSpec(names=("a", "b"), shapes=((12, 10), (6, 10)), ranks=(2, 3))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_hyperparameter_has_a_schema_and_its_default_passes(name):
    cls = _REGISTRY[name][0]
    assert set(cls.schema) == set(cls.defaults)
    check_hparams(name, dict(cls.defaults))
    check_hparams(name, dict(cls.saved_defaults))


@pytest.mark.parametrize(
    ("name", "hparams", "pattern"),
    [
        ("glnet", {"head_hidden": 1e7}, r"head_hidden must be an integer in \[1, 65536\], got 10000000.0"),
        ("glnet", {"head_hidden": 10**7}, r"head_hidden must be an integer"),
        ("glnet", {"hidden": True}, r"hidden must be an integer"),
        ("glnet", {"n_layers": 0, "head": "transformer"}, r"n_layers must be an integer in \[1, 64\]"),
        ("glnet", {"dropout": float("nan")}, r"dropout must be a number in \[0, 1\]"),
        ("glnet", {"nonlinearity": "tanh"}, r"nonlinearity must be one of \['relu-sign', 'sigmoid'\]"),
        ("mlp", {"ranks": [2, -1]}, r"ranks has entries \[-1\]"),
        ("mlp", {"ranks": "2,3"}, r"ranks must be a list of integers"),
        ("mlp", {"layout": "column-major"}, r"layout must be one of"),
        ("mlp-svd", {"k": 0}, r"k must be an integer in \[1, 65536\]"),
        ("mlp-dense", {"max_gib": -1.0}, r"max_gib must be a number"),
        ("mlp-dense", {"depth": 10**6}, r"depth must be an integer in \[0, 64\]"),
    ],
)  # fmt: skip
def test_out_of_range_hyperparameters_are_refused_before_building(name, hparams, pattern):
    with pytest.raises(HParamError, match=pattern):
        check_hparams(name, hparams)
    with pytest.raises(HParamError, match=pattern):
        ll.build_model(name, like=SPEC, out_dim=1, **hparams)


def test_transformer_width_must_split_into_heads():
    with pytest.raises(ValueError, match=r"d_model \(30\) must be a multiple of n_heads \(4\)"):
        ll.build_model("glnet", like=SPEC, out_dim=1, head="transformer", d_model=30)


@pytest.mark.parametrize(
    ("name", "hparams"), [(n, {}) for n in MODEL_NAMES] + [("glnet", {"head": "transformer"})]
)
def test_state_shapes_match_a_real_build_and_allocate_nothing(name, hparams):
    shapes = state_shapes(name, SPEC, 3, hparams, saved=False)
    real = ll.build_model(name, like=SPEC, out_dim=3, **hparams).state_dict()
    assert {k: (t.shape, t.dtype) for k, t in shapes.items()} == {
        k: (t.shape, t.dtype) for k, t in real.items()
    }
    assert all(t.device.type == "meta" for t in shapes.values())
    # a model of 550 GB: still only shapes
    huge = state_shapes("glnet", SPEC, 1, {"hidden": 1024, "head_hidden": 65536})
    assert huge["head.0.weight"].shape == (65536, 2 * (1024 * 1024 + 1))


def test_check_fits_refuses_what_would_not_fit_and_passes_real_models():
    check_fits("glnet", SPEC, 1, {})
    with pytest.raises(
        ModelSizeError, match=r"model 'glnet' .* 141,735,335,995 weights, 528.0 GiB"
    ):
        check_fits("glnet", SPEC, 1, {"hidden": 1024, "head_hidden": 65536})
    rng = torch.random.get_rng_state()
    state_shapes("mlp", SPEC, 1, {})
    assert torch.equal(rng, torch.random.get_rng_state())  # runs stay reproducible
