"""The calibration step of ``train``: which LoRAs are held out to calibrate on, and the run's
calibration (:mod:`loralens.learn.trust.calibration`) with its report on the test split."""

from __future__ import annotations

from typing import Any

import numpy as np

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
    column is kept as it is: its "cal" rows, else its validation rows, calibrate."""
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


def calibrate_run(
    model: Any,
    store: LoRAStore,
    task: Task,
    y_all: np.ndarray,
    splits: list[dict[str, np.ndarray]],
    oof: tuple[np.ndarray, np.ndarray],
    config: TrainConfig,
) -> tuple[Calibration | None, dict[str, Any]]:
    """The calibration of a trained run and its metrics entry (settings and the test report):
    on ``splits[0]["cal"]`` for one split, else on the out-of-fold (rows, raw outputs) ``oof``.
    (None, {}) when the config asks for no calibration."""
    settings = {
        "coverage": config.coverage,
        "share": config.ood_share,
        "normalized": config.interval == "normalized",
        "seed": config.seed,
    }
    if len(splits) == 1:
        split = splits[0]
        if not config.calibration:
            return None, {}
        held = len(split.get("cal", ())) > 0  # else a split column without cal rows: val
        fitted = np.union1d(split["train"], split["val"])  # what the linear base was fitted on
        pooled = None
        if held and base_only(model):
            pooled = (fitted, base_out_of_fold(model, store, task, y_all, fitted, config.seed))
        cal = calibrate(
            model,
            store,
            task,
            y_all,
            reference_rows=split["train"],
            cal_rows=split["cal"] if held else split["val"],
            method="split" if held else "val",
            pooled=pooled,
            **settings,
        )
        rows = split["test"]
        rep = cal.report(task, *store_outputs(model, store, rows, span=cal.fit.span), y_all[rows])
    else:
        if not config.calibration:
            return None, {}
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
    return cal, {**cal.summary(), "test": rep}


__all__ = ["calibrate_run", "hold_out_calibration"]
