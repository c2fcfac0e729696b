"""The linear base of a trained model (models.linear_base, fitted by learn.loop)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_probes import _linear_store

import loralens as ll
from loralens.learn.fitting.probes import PROBE_DENSE, PROBE_SPECTRAL
from loralens.learn.runs.folder import load_run
from loralens.learn.training.config import TrainConfig
from loralens.learn.training.loop import train


@pytest.mark.parametrize(
    ("kind", "label"), [("dense", "y"), ("spectral", "y"), ("dense", "positive")]
)
def test_linear_base_is_the_probe_fitted_on_the_same_rows(tmp_path, kind, label):
    """A run's linear base alone (the gate shut) scores on the test rows exactly what the probe
    of the same kind scores, computed on another path (probes.probe_folds on features read from
    the store, not through the model): both are fitted on the train and val rows, in the same
    order (a logistic fit's cross-validation folds follow it). The probes read ΔW as it is, so
    the run does too (no basis)."""
    store = _linear_store(tmp_path / "s")
    cfg = TrainConfig("glnet", [label], epochs=1, plots=False, linear_base=kind, basis="none")
    m = train(store, cfg, tmp_path / "run")
    run = load_run(tmp_path / "run")
    with torch.no_grad():
        run.model.gate.fill_(0.0)
    ids = np.loadtxt(
        tmp_path / "run" / "predictions.csv", delimiter=",", skiprows=1, usecols=0, dtype=str
    )
    rows = np.array([store.ids.index(i) for i in ids])
    y = store.labels([label])[rows]
    got = run.task.metrics(run.raw(store.batch(rows)), y)
    probe = m["probes"][PROBE_DENSE if kind == "dense" else PROBE_SPECTRAL]["test"]
    for key in ("r2", "auroc", "accuracy"):
        if key in probe:
            assert got[key] == pytest.approx(probe[key], abs=1e-6)
    if "mse" in probe:  # at the scale of the labels, as r2 is: an error near 0 has no digits
        assert got["mse"] == pytest.approx(probe["mse"], abs=1e-6 * float(np.var(y)))


def test_saved_run_predicts_with_its_base(tmp_path):
    """The base is part of the checkpoint: a loaded run predicts what training measured."""
    store = _linear_store(tmp_path / "s")
    train(store, TrainConfig("mlp", ["y"], epochs=2, plots=False), tmp_path / "run")
    run = load_run(tmp_path / "run")
    assert run.model.hparams["linear_base"] == "update"
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["model"]["hparams"]["linear_base"] == "update"
    ids = [r.split(",")[0] for r in (tmp_path / "run" / "predictions.csv").read_text().split()[1:]]
    rows = [store.ids.index(i) for i in ids]
    pred = run.task.decode(run.raw(store.batch(np.array(rows))))[:, 0]
    expected = np.loadtxt(
        tmp_path / "run" / "predictions.csv", delimiter=",", skiprows=1, usecols=2
    )
    np.testing.assert_allclose(pred, expected, rtol=1e-4, atol=1e-4)


def test_linear_label_is_learned_with_the_base_and_not_without(tmp_path):
    """On a label linear in ΔW, the default base (which then chooses ΔW itself over its
    directions) is near perfect; the network alone, on 100 training LoRAs, is not: the base is
    what carries it."""
    store = _linear_store(tmp_path / "s", n=150)
    with_base = train(store, TrainConfig("glnet", ["y"], epochs=5, plots=False), None)
    assert with_base["model_hparams"]["linear_base"] == "update"
    alone = TrainConfig("glnet", ["y"], epochs=5, plots=False, linear_base="none")
    without = train(store, alone, None)
    assert with_base["test"]["r2"] > 0.95
    assert without["test"]["r2"] < 0.9


@pytest.mark.parametrize("kind", ["update", "dense", "spectral"])
def test_base_keeps_gl_invariance(kind):
    """A model with a (random) linear base is still GL(r)-invariant: the base reads ΔW only."""
    batch = ll.collate([ll.gl_transform(_lora(k), seed=k) for k in range(3)])
    model = ll.build_model("glnet", like=batch, out_dim=2, linear_base=kind).double()
    g = torch.Generator().manual_seed(0)
    base = model.linear_base
    base.set(torch.randn(base.weight.shape, generator=g) * 1e-2, torch.randn(2, generator=g))
    with torch.no_grad():
        model.gate.fill_(0.5)
    ll.assert_gl_invariant(model.eval(), batch.to(torch.float64))


def test_unknown_linear_base_is_refused():
    with pytest.raises(ValueError, match="linear_base must be one of"):
        TrainConfig("glnet", ["y"], linear_base="quadratic")


def _lora(seed: int) -> ll.LoRA:
    g = torch.Generator().manual_seed(seed)
    return ll.LoRA(
        [
            ll.LoRALayer("a", torch.randn(7, 3, generator=g), torch.randn(5, 3, generator=g)),
            ll.LoRALayer("b", torch.randn(4, 2, generator=g), torch.randn(6, 2, generator=g)),
        ]
    )


def test_update_base_is_the_ridge_on_flattened_directions_and_spectra():
    """Read through a basis fitted on its training LoRAs, the update base's features give, on
    new LoRAs, the predictions of a ridge on the flattened ΔW_l / |ΔW_l| of every layer and the
    spectral features, scaled alike (block RMS, per-feature std), to 1e-8 of their scale: the
    projection loses nothing where the training updates span the layers."""
    from sklearn.linear_model import Ridge

    from loralens.models.basis import UpdateBasis
    from loralens.models.linear_base import fit_scale, linear_features

    g = torch.Generator().manual_seed(0)
    loras = [
        ll.LoRA(
            [
                ll.LoRALayer(
                    f"l{i}", torch.randn(o, 3, generator=g), torch.randn(m, 3, generator=g)
                )
                for i, (o, m) in enumerate(((8, 6), (5, 9)))
            ]
        )
        for _ in range(40)
    ]
    batch = ll.collate(loras).to(torch.float64)
    fit, test = np.arange(30), np.arange(30, 40)
    y = np.array([float(torch.log(lo.layers[0].U.norm()) + lo.layers[1].V[0, 0]) for lo in loras])
    basis = UpdateBasis.fit(batch.select(torch.as_tensor(fit)))
    model = ll.build_model("glnet", like=batch, out_dim=1, basis=basis, linear_base="update")
    model = model.double()

    def ridge(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
        z = (x - x[fit].mean(axis=0)) / scale
        return Ridge(alpha=1.0).fit(z[fit], y[fit]).predict(z[test])

    x = model.linear_base.features(model.prepare(batch), False).numpy()
    got = ridge(x, fit_scale(x[fit], "update", model.inner, False, 2.0))
    flat = [
        (w / w.flatten(1).norm(dim=1)[:, None, None]).flatten(1).numpy()
        for w in batch.delta_weights()
    ]
    spectral = linear_features(batch, "spectral", 3).numpy()
    blocks = [np.sqrt(((f - f[fit].mean(0)) ** 2).sum(1)[fit].mean()) for f in flat]
    std = spectral[fit].std(axis=0)
    scale = np.concatenate(
        [np.full(f.shape[1], s) for f, s in zip(flat, blocks)]
        + [np.where(std > 0, std, 1.0) * np.sqrt(2 * (3 + 1) / 2.0)]
    )
    want = ridge(np.concatenate([*flat, spectral], axis=1), scale)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-8 * np.abs(want).max())


def test_glnet_alone_starts_at_the_ridge_on_its_scales_and_spectra(tmp_path, make_store):
    """Without a linear base, GL-net's linear path from each layer's log scale and spectrum
    starts at their ridge fit on the training rows (and its head at zero), so epoch 0 is that
    fit: on a label read from the layers' sizes it scores, at once, what the spectral probe
    fitted on the same rows scores (to 0.01 R²)."""
    store = make_store(tmp_path / "s", n=120, extra=lambda k, s: {"z": float(np.log(s))})
    cfg = TrainConfig("glnet", ["z"], epochs=1, plots=False, linear_base="none")
    m = train(store, cfg, None)
    probe = m["probes"][PROBE_SPECTRAL]["test"]["r2"]
    assert m["best_epoch"] == 0 and m["test"]["r2"] == pytest.approx(probe, abs=0.01)
    assert probe > 0.9
