"""Task inference, scaling, losses and metrics (checked against hand-computed values)."""

import math

import numpy as np
import pytest
import torch

from loralens.learn.fitting.tasks import (
    Task,
    baseline_metrics,
    classification_metrics,
    infer_task,
    kendall_tau,
    spearman_rho,
    tpr_at_fpr,
    tpr_key,
)


def test_infer_task():
    assert infer_task(np.array([[0, 1], [1, 1], [np.nan, 0]])) == "classification"
    assert infer_task(np.array([0.0, 0.5, 1.0])) == "regression"
    assert infer_task(np.array([2, 3])) == "regression"


def test_scaling_round_trip_and_masked_loss():
    y = np.array([[1.0, 10.0], [3.0, 30.0], [5.0, np.nan]])
    task = Task.fit(["a", "b"], y)
    assert task.kind == "regression"
    enc = task.encode(y)
    np.testing.assert_allclose(np.nanmean(enc, axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(task.decode(enc), y)
    loss = task.loss(torch.zeros(3, 2), torch.tensor(enc, dtype=torch.float32))
    assert torch.isfinite(loss)
    assert Task.from_dict(task.to_dict()) == task


def test_regression_predictions_are_clipped_to_the_training_labels_range():
    """Outputs past the training labels predict the nearest end of their range, per target, and
    are scored so; a task saved before the range (no ``low``/``high``) does not clip."""
    y = np.array([[1.0, 10.0], [3.0, 30.0], [5.0, 20.0]])
    task = Task.fit(["a", "b"], y)
    assert (task.low, task.high) == ([1.0, 10.0], [5.0, 30.0])
    wide = task.encode(np.array([[9.0, 0.0], [0.0, 99.0], [2.0, 25.0]]))
    np.testing.assert_allclose(task.decode(wide), [[5.0, 10.0], [1.0, 30.0], [2.0, 25.0]])
    truth = np.array([[5.0, 10.0], [1.0, 30.0], [2.0, 25.0]])
    assert task.metrics(wide, truth)["r2"] == pytest.approx(1.0)
    seen = Task.fit(["a", "b"], y, y_seen=np.vstack([y, [[0.0, 40.0]]]))
    assert (seen.low, seen.high, seen.mean) == ([0.0, 10.0], [5.0, 40.0], task.mean)
    old = Task.from_dict({k: v for k, v in task.to_dict().items() if k not in ("low", "high")})
    np.testing.assert_allclose(old.decode(wide)[0], [9.0, 0.0])
    assert Task.fit(["p"], np.array([[0.0], [1.0]])).to_dict().keys() == {
        "kind",
        "targets",
        "mean",
        "std",
    }


def test_rank_correlations_match_known_values():
    a = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    assert kendall_tau(a, a) == pytest.approx(1.0)
    assert kendall_tau(a, -a) == pytest.approx(-1.0)
    # one discordant pair out of 10: tau = (9 - 1) / 10
    assert kendall_tau(a, np.array([1.0, 3.0, 2.0, 4.0, 5.0])) == pytest.approx(0.8)
    # ties: tau-b with ties in x (scipy.stats.kendalltau gives 0.912870929175277)
    x, y = np.array([1.0, 1.0, 2.0, 3.0]), np.array([1.0, 2.0, 3.0, 4.0])
    assert kendall_tau(x, y) == pytest.approx(0.912870929175277)
    # spearman with ties (scipy.stats.spearmanr gives 0.9486832980505138)
    assert spearman_rho(x, y) == pytest.approx(0.9486832980505138)


def test_regression_and_classification_metrics():
    y = np.array([[1.0], [2.0], [3.0], [4.0]])
    task = Task.fit(["t"], y)
    m = task.metrics(task.encode(y), y)
    assert m["r2"] == pytest.approx(1.0) and m["kendall_tau"] == pytest.approx(1.0)
    base = baseline_metrics(task, y, y)
    assert base["r2"] == pytest.approx(0.0)

    yc = np.array([[0, 1], [1, 1], [1, 0], [0, 0]], dtype=float)
    ctask = Task.fit(["p", "q"], yc)
    assert ctask.kind == "classification"
    logits = np.array([[-2, 3], [2, 1], [1, -1], [-1, 1]], dtype=float)
    m = ctask.metrics(logits, yc)
    assert m["accuracy"] == pytest.approx((1.0 + 0.75) / 2)
    assert m["auroc"] == pytest.approx((1.0 + 0.875) / 2)  # one tied pair in q
    assert baseline_metrics(ctask, yc, yc)["auroc"] == 0.5


def test_loss_is_the_mean_over_labelled_entries_only():
    """Missing (NaN) targets add nothing to the loss and do not count in its mean."""
    out = torch.tensor([[0.5, 1.0], [2.0, -1.0], [0.0, 3.0]])
    nan = float("nan")
    y = torch.tensor([[1.0, nan], [0.0, 2.0], [nan, nan]])
    reg = Task("regression", ["a", "b"], [0.0, 0.0], [1.0, 1.0])
    # labelled entries: (0.5 - 1)^2, (2 - 0)^2, (-1 - 2)^2
    assert float(reg.loss(out, y)) == pytest.approx((0.25 + 4.0 + 9.0) / 3)
    yc = torch.tensor([[1.0, nan], [0.0, 1.0], [nan, nan]])
    cls = Task("classification", ["a", "b"], [0.0, 0.0], [1.0, 1.0])

    def bce(logit: float, label: float) -> float:
        p = 1 / (1 + math.exp(-logit))
        return -(label * math.log(p) + (1 - label) * math.log(1 - p))

    want = (bce(0.5, 1.0) + bce(2.0, 0.0) + bce(-1.0, 1.0)) / 3
    assert float(cls.loss(out, yc)) == pytest.approx(want, rel=1e-6)
    # metrics() reports the same loss (on encoded targets; here the identity scaling)
    assert reg.metrics(out.numpy(), y.numpy())["loss"] == pytest.approx((0.25 + 4.0 + 9.0) / 3)


def test_tpr_at_fpr_golden_values():
    # negatives 0.9, 0.6, 0.5 ... 0.1 (ten); positives 0.95, 0.8, 0.6, 0.55, 0.3
    neg = [0.9, 0.6, 0.5, 0.45, 0.4, 0.35, 0.3, 0.2, 0.15, 0.1]
    pos = [0.95, 0.8, 0.6, 0.55, 0.3]
    score = np.array(neg + pos)
    label = np.array([0] * 10 + [1] * 5)
    assert tpr_at_fpr(score, label, 0.0) == pytest.approx(1 / 5)  # only above 0.9
    assert tpr_at_fpr(score, label, 0.05) == pytest.approx(1 / 5)  # 0.5 negatives: none allowed
    assert tpr_at_fpr(score, label, 0.1) == pytest.approx(2 / 5)  # above 0.6: the tie at 0.6 lost
    assert tpr_at_fpr(score, label, 0.2) == pytest.approx(4 / 5)  # above 0.5
    assert tpr_at_fpr(score, label, 1.0) == 1.0
    assert np.isnan(tpr_at_fpr(score[:10], label[:10], 0.05))
    m = classification_metrics(score[:, None], label[:, None].astype(float), ["b"])
    assert m[tpr_key(0.05)] == pytest.approx(1 / 5) and tpr_key(0.05) == "tpr@5%fpr"
    assert m["per_target"]["b"][tpr_key(0.01)] == pytest.approx(1 / 5)
