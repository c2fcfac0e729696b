"""Linear probes: the baseline rows of every run and benchmark (learn.probes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import loralens as ll
from loralens.learn.fitting.probes import (
    PROBE_DENSE,
    PROBE_SPECTRAL,
    PROBE_SPECTRAL_STATS,
    fit_linear,
    fit_predict,
    probe_features,
    probe_folds,
)
from loralens.learn.fitting.tasks import Task
from loralens.learn.training.config import TrainConfig
from loralens.learn.training.loop import train
from loralens.store import write_store


def _linear_store(path, n=120, seed=0):
    """LoRAs whose label ``y`` is a fixed linear function of the flattened ΔW (plus no noise)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 6, generator=g)
    items = []
    for k in range(n):
        u, v = torch.randn(8, 2, generator=g), torch.randn(6, 2, generator=g)
        y = float((u @ v.T * w).sum())
        label = {"y": y, "positive": float(y > 0)}
        items.append((f"l{k:03d}", ll.LoRA([ll.LoRALayer("h.0.attn", u, v)]), label))
    return write_store(path, items)


def test_dense_probe_recovers_a_linear_label(tmp_path):
    store = _linear_store(tmp_path / "s")
    y = store.labels(["y"])
    rows = np.arange(len(store))
    folds = [(rows[:100], rows[100:])]
    res = probe_folds(store, "regression", ["y"], y, folds)
    assert res[PROBE_DENSE]["folds"][0]["r2"] > 0.95
    assert "folds" in res[PROBE_SPECTRAL]  # runs everywhere (no claim on a linear label)


def test_probe_never_sees_test_rows(tmp_path):
    """Garbage test labels change nothing in what the probe predicts for the test rows: its
    error against them is that of the predictions made from the training rows alone."""
    store = _linear_store(tmp_path / "s")
    y = store.labels(["y"])
    rows = np.arange(len(store))
    x = probe_features(store, rows, PROBE_DENSE)
    task = Task.fit(["y"], y[:100])
    pred = task.decode(fit_predict(x[:100], y[:100], x[100:], task))
    garbage = y.copy()
    garbage[100:] = np.random.default_rng(0).normal(size=(20, 1)) * 1e3
    res = probe_folds(store, "regression", ["y"], garbage, [(rows[:100], rows[100:])])
    expected = float(np.mean((pred - garbage[100:]) ** 2))
    assert res[PROBE_DENSE]["folds"][0]["mse"] == pytest.approx(expected, rel=1e-6)


def test_train_reports_probes_on_its_split(tmp_path, make_store):
    store = make_store(tmp_path / "s", n=80)
    m = train(store, TrainConfig("mlp", ["y"], epochs=2, plots=False), None)
    assert set(m["probes"]) == {PROBE_DENSE, PROBE_SPECTRAL, PROBE_SPECTRAL_STATS}
    for p in m["probes"].values():
        assert p["test"]["r2"] is not None and p["test_std"] is None  # one split: no spread
    # label = scale² of U: the spectral probe (norms) gets it
    assert m["probes"][PROBE_SPECTRAL]["test"]["r2"] > 0.8


def test_below_the_probe_is_judged_at_the_precision_shown():
    """A model equal to its probe but for float rounding is not marked below it; a real gap is."""
    from loralens.learn.runs.report import below

    assert not below(0.29551, 0.29559) and not below(0.5, 0.5) and not below(None, 0.3)
    assert below(0.294, 0.296) and below(-1e9, 0.0)


def test_a_repeated_fit_is_the_kept_one_and_cannot_be_changed_through_its_result(monkeypatch):
    """fit_linear keeps recent fits by the content of their inputs: the same rows again give the
    same coefficients without fitting; changing a returned array or the labels changes nothing
    kept."""
    import loralens.learn.fitting.probes as probes

    g = np.random.default_rng(0)
    x, y = g.normal(size=(40, 300)), g.normal(size=40)
    fits = []
    real = probes._fit_linear
    monkeypatch.setattr(probes, "_fit_linear", lambda *a: fits.append(1) or real(*a))
    coef, b = fit_linear(x, y, False)
    coef[:] = 0.0
    again, b2 = fit_linear(x.copy(), y.copy(), False)
    assert len(fits) == 1 and b2 == b and np.abs(again).max() > 0
    np.testing.assert_array_equal(again, real(x, y, False, None)[0])
    y[0] += 1.0
    fit_linear(x, y, False)
    fit_linear(x, y > 0, True)
    assert len(fits) == 3


def test_the_fast_log_loss_scorer_gives_scikit_learns_fit_exactly():
    """The cross-validated logistic fit scores each penalty with ``neg_log_loss`` without
    scikit-learn's input checks (most of its time): the same scores, penalty and weights."""
    import warnings

    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold

    from loralens.learn.fitting.probes import ALPHAS, neg_log_loss

    rng = np.random.default_rng(0)
    for n, d in ((150, 40), (60, 150)):
        x = rng.normal(size=(n, d))
        y = (x[:, 0] + 0.7 * rng.normal(size=n) > 0).astype(int)
        fits = []
        for scoring in ("neg_log_loss", neg_log_loss):
            folds = StratifiedKFold(5, shuffle=True, random_state=0)
            model = LogisticRegressionCV(Cs=1.0 / ALPHAS, cv=folds, scoring=scoring, max_iter=2000)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                model.fit(x, y)
            fits.append((model.coef_, model.intercept_, next(iter(model.scores_.values()))))
        for a, b in zip(*fits):
            np.testing.assert_array_equal(a, b)
