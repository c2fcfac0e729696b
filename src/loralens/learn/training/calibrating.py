"""The calibration step of ``train``: which LoRAs a run calibrates on, its calibration
(:mod:`loralens.learn.trust.calibration`), and the check of that calibration on the test split.

No calibration score comes from a row that the part of the model predicting it was fitted on.
The final linear base is refitted on train + val, the network trains on train and stops early
on val, so one split calibrates on:

- ``split``: its ``cal`` rows (seeded, ``TrainConfig.calibration`` of the labelled LoRAs, held
  out of training and early stopping; or a split column's ``cal`` rows);
- ``split+cv``: those and, for a model that is its linear base alone (early stopping chose
  epoch 0), the train and val rows with the base refitted without each fold (CV+);
- ``cv``: a base-alone model whose split column has no ``cal`` rows: those train and val rows;
- ``val+cv``: a network with a base whose split column has no ``cal`` rows: the val rows, the
  base refitted without each fold (val also chose the epoch: a little optimistic);
- ``val``: the same for a network without a base.

Cross-validated runs calibrate on the folds' out-of-fold outputs (``cross``). The calibration
is then judged on the test split (cross-validated runs: each fold by the others): a target
whose coverage falls below what the number of test LoRAs explains (a binomial bound) is a
problem the run records and warns of, and its intervals or sets are then not called calibrated.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from loralens.errors import LoRALensWarning
from loralens.learn.fitting.data import class_strata, hold_out
from loralens.learn.fitting.tasks import CLASSIFICATION, Task
from loralens.learn.training.config import TrainConfig
from loralens.learn.trust.calibrate import (
    base_only,
    base_out_of_fold,
    calibrate,
    cross_report,
    store_outputs,
)
from loralens.learn.trust.calibration import Calibration
from loralens.store import LoRAStore


def hold_out_calibration(
    split: dict[str, np.ndarray], config: TrainConfig, y_all: np.ndarray, kind: str, store: Any
) -> dict[str, np.ndarray]:
    """``split`` with ``config.calibration`` of its labelled LoRAs moved from train to "cal"
    (seeded by ``config.seed``; stratified by class for classification). A split read from a
    column is kept as it is (see the module docstring for what then calibrates)."""
    column = config.split_column
    if column == "auto":
        column = "split" if "split" in store.index.columns else None
    if column or "cal" in split:
        return split
    n = sum(len(v) for v in split.values())
    share = min(config.calibration * n / max(len(split["train"]), 1), 0.5)
    strata = class_strata(y_all[split["train"]]) if kind == CLASSIFICATION else None
    train, cal = hold_out(split["train"], share, config.seed, strata)
    return {**split, "train": train, "cal": cal}


def calibration_rows(
    model: Any,
    store: LoRAStore,
    task: Task,
    y_all: np.ndarray,
    split: dict[str, np.ndarray],
    seed: int,
) -> tuple[str, np.ndarray, np.ndarray]:
    """(method, rows, raw outputs) that one split's run calibrates on (the module docstring):
    held-out rows as the model predicts them, and rows its linear base was fitted on with that
    base refitted out of fold."""
    held = np.asarray(split.get("cal", np.zeros(0, dtype=np.int64)), dtype=np.int64)
    has_base = getattr(model, "linear_base", None) is not None
    if base_only(model):
        refit = np.union1d(split["train"], split["val"])
        method = "split+cv" if len(held) else "cv"
    elif len(held):
        refit, method = np.zeros(0, dtype=np.int64), "split"
    else:
        refit, method = np.sort(split["val"]), "val+cv" if has_base else "val"
    raw_held, _ = store_outputs(model, store, held)
    raw_refit, _ = store_outputs(model, store, refit)
    if has_base and len(refit):
        fitted = np.union1d(split["train"], split["val"])
        raw_refit = base_out_of_fold(model, store, task, y_all, fitted, refit, raw_refit, seed)
    return method, np.r_[held, refit], np.r_[raw_held, raw_refit]


def calibrate_run(
    model: Any,
    store: LoRAStore,
    task: Task,
    y_all: np.ndarray,
    splits: list[dict[str, np.ndarray]],
    oof: tuple[np.ndarray, np.ndarray],
    config: TrainConfig,
) -> tuple[Calibration | None, dict[str, Any]]:
    """The calibration of a trained run and its metrics entry (settings, the test report and
    the check's problems): on the rows of :func:`calibration_rows` for one split, else on the
    out-of-fold (rows, raw outputs) ``oof``. (None, {}) when the config asks for no
    calibration."""
    if not config.calibration:
        return None, {}
    settings = {
        "coverage": config.coverage,
        "share": config.ood_share,
        "normalized": config.interval == "normalized",
        "seed": config.seed,
    }
    if len(splits) == 1:
        split = splits[0]
        method, rows, raw = calibration_rows(model, store, task, y_all, split, config.seed)
        cal = calibrate(
            model,
            store,
            task,
            y_all,
            reference_rows=split["train"],
            cal_rows=rows,
            cal_raw=raw,
            method=method,
            **settings,
        )
        test = split["test"]
        rep = cal.report(task, *store_outputs(model, store, test, span=cal.fit.span), y_all[test])
    else:
        rows, raw = oof
        every = np.sort(np.concatenate([splits[0][k] for k in ("train", "val", "test")]))
        groups = np.concatenate([np.full(len(s["test"]), i) for i, s in enumerate(splits)])
        cal = calibrate(
            model,
            store,
            task,
            y_all,
            reference_rows=every,
            cal_rows=rows,
            cal_raw=raw,
            groups=groups,
            **settings,
        )
        rep = cross_report(cal, task, y_all[rows], groups)
    cal.problems = list(rep["problems"])
    for problem in cal.problems:
        warnings.warn(
            f"the run's calibration fails its check on the test split: {problem}; its "
            "intervals or sets are marked as not calibrated",
            LoRALensWarning,
            stacklevel=2,
        )
    return cal, {**cal.summary(), "test": rep}


__all__ = ["calibrate_run", "calibration_rows", "hold_out_calibration"]
