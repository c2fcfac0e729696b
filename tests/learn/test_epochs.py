"""Choosing the epoch: a network epoch replaces the linear base only when its paired validation
gain exceeds one standard error (golden values computed by hand)."""

import numpy as np

from loralens.learn.epochs import Best, clearly_better


def _best(losses: list[float]) -> Best:
    return Best(val_row_loss=np.array(losses))


def test_a_steady_gain_replaces_the_base():
    # differences -1, -1, -1, -1: mean -1, standard error 0
    assert clearly_better(_best([1.0, 2.0, 3.0, 4.0]), _best([2.0, 3.0, 4.0, 5.0]))


def test_a_lower_mean_within_its_noise_keeps_the_base():
    # differences -3, 1, 1, -1: mean -0.5, sd sqrt(11/3) = 1.915, se 0.957: -0.5 + 0.957 > 0
    assert not clearly_better(_best([0.0, 2.0, 2.0, 0.0]), _best([3.0, 1.0, 1.0, 1.0]))
    # the same differences ten times over: se 0.304, -0.5 + 0.304 < 0
    net, base = [0.0, 2.0, 2.0, 0.0] * 10, [3.0, 1.0, 1.0, 1.0] * 10
    assert clearly_better(_best(net), _best(base))


def test_unlabelled_validation_rows_are_left_out():
    nan = float("nan")
    assert clearly_better(_best([1.0, nan, 2.0, 3.0]), _best([2.0, nan, 3.0, 4.0]))
    assert not clearly_better(_best([1.0, nan]), _best([0.5, nan]))
