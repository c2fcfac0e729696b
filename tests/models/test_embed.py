"""``LoLModel.embed``: the representation before the final layer, which the fit check measures
distances in: the output is read from it, it is GL-invariant where the model is, and renaming
GL-net's token embedding (to make room for it) keeps older checkpoints loading."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import loralens as ll
from helpers import random_lora
from loralens.learn.runs.checkpoint import load_checkpoint, read_config
from loralens.models import example_batch
from loralens.models.registry import MODEL_NAMES, build_model
from loralens.symmetry import gl_transform

SHAPES = ((12, 10), (6, 10))


def _batch(n=4):
    return ll.collate([random_lora((3, 2), SHAPES, seed=k, dtype=torch.float32) for k in range(n)])


@pytest.mark.parametrize("linear_base", ["none", "dense"])
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_output_of_embed_is_the_forward_pass(name, linear_base):
    """``output(batch, embed(batch))`` is the forward pass, a fitted linear base included (what
    calibration reads it through)."""
    torch.manual_seed(0)
    batch = _batch()
    model = build_model(name, like=batch, out_dim=2, linear_base=linear_base).eval()
    if linear_base != "none":
        base = model.linear_base
        base.set(torch.randn(base.weight.shape).double(), torch.randn(2).double())
        model.gate.data.fill_(0.3)
    z = model.embed(batch)
    assert z.ndim == 2 and z.shape[0] == 4
    torch.testing.assert_close(model.output(batch, z), model(batch))
    if linear_base == "none":
        torch.testing.assert_close(model.readout(z), model(batch))


@pytest.mark.parametrize("head", ["mlp", "transformer"])
def test_glnet_embedding_is_gl_invariant(head):
    torch.manual_seed(0)
    batch = _batch().to(dtype=torch.float64)
    model = build_model("glnet", like=batch, out_dim=1, head=head).double().eval()
    moved = gl_transform(batch, seed=1)
    torch.testing.assert_close(model.embed(moved), model.embed(batch), rtol=1e-6, atol=1e-8)


def test_glnet_checkpoints_saved_with_the_old_token_embedding_name_load(tmp_path):
    batch = example_batch(ll.LayerSpec(("a", "b"), SHAPES, (2, 2)), batch_size=2)
    model = build_model("glnet", like=batch, out_dim=1, head="transformer").eval()
    old = {k.replace("token_embed.", "embed."): v for k, v in model.state_dict().items()}
    assert any(k.startswith("embed.") for k in old)
    save_file({k: v.contiguous() for k, v in old.items()}, tmp_path / "model.safetensors")
    cfg = {
        "format": "loralens-run",
        "version": 1,
        "model": {
            "name": "glnet",
            "hparams": dict(model.hparams),
            "spec": model.spec.to_dict(),
            "out_dim": 1,
        },
        "task": {"kind": "regression", "targets": ["y"], "mean": [0.0], "std": [1.0]},
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    state = load_checkpoint(tmp_path / "model.safetensors", read_config(tmp_path / "config.json"))
    fresh = build_model("glnet", like=batch, out_dim=1, head="transformer").eval()
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh(batch), model(batch))
