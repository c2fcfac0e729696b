"""Choosing the epoch: a network epoch replaces the linear base only when a one-sided paired
t-test at 5% says its validation losses are lower (golden values computed by hand)."""

import numpy as np

from loralens.learn.fitting.epochs import Best, clearly_better


def _best(losses: list[float]) -> Best:
    return Best(val_row_loss=np.array(losses))


def test_a_steady_gain_replaces_the_base():
    # differences -1, -1, -1, -1: mean -1, standard error 0
    assert clearly_better(_best([1.0, 2.0, 3.0, 4.0]), _best([2.0, 3.0, 4.0, 5.0]))


def test_a_lower_mean_within_its_noise_keeps_the_base():
    # differences -3, 1, 1, -1: mean -0.5, sd sqrt(11/3) = 1.915, se 0.957, t = 0.52
    assert not clearly_better(_best([0.0, 2.0, 2.0, 0.0]), _best([3.0, 1.0, 1.0, 1.0]))
    # the same ten times over: sd 1.679, se 0.266, t = 1.88 > t(0.95, 39) = 1.685
    net, base = [0.0, 2.0, 2.0, 0.0] * 10, [3.0, 1.0, 1.0, 1.0] * 10
    assert clearly_better(_best(net), _best(base))


def test_a_gain_of_more_than_one_standard_error_on_seven_loras_is_not_enough():
    # differences -2, -1, 0, -1, -2, 1, 0: mean -0.714, se 0.421, t = 1.70 < t(0.95, 6) = 1.943
    base = [3.0] * 7
    net = [1.0, 2.0, 3.0, 2.0, 1.0, 4.0, 3.0]
    assert not clearly_better(_best(net), _best(base))
    assert clearly_better(_best([x - 0.5 for x in net]), _best(base))  # t = 2.89


def test_unlabelled_validation_rows_are_left_out():
    nan = float("nan")
    assert clearly_better(_best([1.0, nan, 2.0, 3.0]), _best([2.0, nan, 3.0, 4.0]))
    assert not clearly_better(_best([1.0, nan]), _best([0.5, nan]))
