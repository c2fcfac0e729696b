"""The fit check's span score: the dense projection it stands for, its invariances, and end to
end, a LoRA whose update uses directions no training LoRA used is flagged and told why, while
calibrations saved before the score still load."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import loralens as ll
from helpers import older_calibration
from loralens.errors import RunError
from loralens.learn.runs.folder import load_run
from loralens.learn.training.config import TrainConfig
from loralens.learn.training.loop import train
from loralens.learn.trust.span import Span, fit_out_of_fold
from loralens.lora import LoRABatch
from loralens.models.basis import side_factors
from loralens.store import write_store

OUT, IN = 12, 10


def _batch(n: int, rank: int, seed: int, used: tuple[int, int] = (OUT, IN)) -> LoRABatch:
    """``n`` rank-``rank`` LoRAs of one OUT x IN layer whose factors live in the first
    ``used`` output and input coordinates (plus a little noise everywhere)."""
    g = torch.Generator().manual_seed(seed)
    u = 0.02 * torch.randn(n, OUT, rank, generator=g, dtype=torch.float64)
    v = 0.02 * torch.randn(n, IN, rank, generator=g, dtype=torch.float64)
    u[:, : used[0]] += torch.randn(n, used[0], rank, generator=g, dtype=torch.float64)
    v[:, : used[1]] += torch.randn(n, used[1], rank, generator=g, dtype=torch.float64)
    return LoRABatch(names=["l"], U=[u], V=[v], ranks=torch.full((n, 1), rank))


def _dense_scores(train: LoRABatch, test: LoRABatch, energy: float = 0.9) -> np.ndarray:
    """The same score from dense ΔW: SVD of the stacked unit-norm updates' rows and columns."""
    w = (train.U[0] @ train.V[0].mT).numpy()
    w /= np.linalg.norm(w.reshape(len(w), -1), axis=1)[:, None, None]
    bases = []
    for stacked in (w.reshape(-1, IN), w.transpose(0, 2, 1).reshape(-1, OUT)):
        _, s, vt = np.linalg.svd(stacked, full_matrices=False)
        k = int(np.searchsorted(np.cumsum(s**2) / (s**2).sum(), energy)) + 1
        bases.append(vt[:k])
    t = (test.U[0] @ test.V[0].mT).numpy()
    total = (t**2).sum(axis=(1, 2))
    inside_in = ((t @ bases[0].T) ** 2).sum(axis=(1, 2)) / total
    inside_out = ((bases[1] @ t) ** 2).sum(axis=(1, 2)) / total
    return 1 - inside_in * inside_out


@pytest.mark.parametrize("rank", [1, 3, 12])
def test_the_span_score_is_the_share_of_dense_delta_w_outside_the_training_subspaces(rank):
    """Rank 12 > IN: the bases come from the factors' Gram on the other side."""
    train, test = _batch(40, rank, 0, used=(5, 4)), _batch(20, rank, 1)
    span = Span.fit(side_factors([train]))
    assert np.allclose(span.scores(test), _dense_scores(train, test), atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), rank=st.integers(1, 4), scale=st.floats(1e-3, 1e3))
def test_the_span_score_ignores_scale_and_the_choice_of_factors(seed, rank, scale):
    """(U R, V R^-T) for a random invertible R, and ΔW times any scale, score the same, and
    bases fitted on transformed training factors are the same bases."""
    train, test = _batch(30, rank, seed, used=(6, 5)), _batch(10, rank, seed + 1)
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(rank, rank, generator=g, dtype=torch.float64) + 3 * torch.eye(rank)

    def moved(b: LoRABatch) -> LoRABatch:
        v = b.V[0] @ torch.linalg.inv(r).mT
        return LoRABatch(names=b.names, U=[b.U[0] @ r * scale], V=[v], ranks=b.ranks)

    span = Span.fit(side_factors([train]))
    want = span.scores(test)
    assert np.allclose(span.scores(moved(test)), want, atol=1e-8)
    assert np.allclose(Span.fit(side_factors([moved(train)])).scores(test), want, atol=1e-8)


def test_out_of_fold_bases_leave_each_fold_out():
    """A fold's bases are those fitted on the other folds' LoRAs alone."""
    train = _batch(30, 2, 3, used=(6, 5))
    folds = np.arange(30) % 3
    for g, span in zip(range(3), fit_out_of_fold(side_factors([train]), folds)):
        alone = Span.fit(side_factors([train.select(np.flatnonzero(folds != g))]))
        for a, b in zip(span.inputs + span.outputs, alone.inputs + alone.outputs):
            assert np.allclose(a.T @ a, b.T @ b, atol=1e-8)  # the same projection


def _subspace_loras(n: int, seed: int, used: slice) -> list[ll.LoRA]:
    """LoRAs whose two layers' factors use only the coordinates ``used`` (size s labels y)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        s = 0.5 + float(torch.rand(1, generator=g))
        layers = []
        for i, (o, m) in enumerate(((OUT, IN), (8, IN))):
            u, v = torch.zeros(o, 2), torch.zeros(m, 2)
            u[used] = torch.randn(len(range(o)[used]), 2, generator=g) * s
            v[used] = torch.randn(len(range(m)[used]), 2, generator=g)
            layers.append(ll.LoRALayer(f"h.{i}.attn", u, v))
        out.append(ll.LoRA(layers))
    return out


@pytest.fixture(scope="module")
def span_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("span")
    loras = _subspace_loras(100, 0, slice(0, 4))
    items = [
        (f"x{k:03d}", lora, {"y": float(lora.layers[0].U.norm())}) for k, lora in enumerate(loras)
    ]
    store = write_store(root / "s", items)
    config = TrainConfig(model="glnet", targets=["y"], epochs=3, seed=0, plots=False)
    train(store, config, root / "run")
    return root / "run"


def test_a_lora_using_directions_no_training_lora_used_is_flagged_and_told_why(span_run):
    run = load_run(span_run)
    assert run.calibration.fit.span is not None
    same = run.predict(_subspace_loras(20, 1, slice(0, 4)))
    other = run.predict(_subspace_loras(20, 2, slice(4, 8)))
    assert np.mean([r["in_distribution"] for r in same]) >= 0.8
    assert all("outside the directions" in " ".join(r["reasons"]) for r in other)


def test_calibrations_saved_before_the_span_score_load_and_predict_without_it(span_run, tmp_path):
    """A version-2 calibration is this one without the span arrays and keys."""
    older_calibration(span_run, tmp_path / "run", version=2)
    old = load_run(tmp_path / "run")
    assert old.calibration.fit.span is None and old.calibration.fit.shares() == (0.025, 0.025, 0.0)
    (row,) = old.predict(_subspace_loras(1, 2, slice(4, 8)))
    assert row["error"] is None and not any("outside the directions" in r for r in row["reasons"])


def test_a_span_basis_of_the_wrong_width_is_refused_naming_the_file(span_run, tmp_path):
    from safetensors.numpy import load_file, save_file

    shutil.copytree(span_run, tmp_path / "run")
    path = tmp_path / "run" / "calibration.safetensors"
    arrays = load_file(str(path))
    arrays["span_in.1"] = arrays["span_in.1"][:, :-1].copy()
    save_file(arrays, str(path))
    with pytest.raises(RunError, match=r"calibration\.safetensors: span_in\.1 has shape"):
        load_run(tmp_path / "run")
