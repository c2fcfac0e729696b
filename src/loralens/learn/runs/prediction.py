"""Predicting with a trained run on adapters: one row per adapter, with its interval (or
probability and prediction set), the fit check's verdict, and the error instead when the
adapter cannot be read or does not fit. The one implementation behind ``loralens predict``,
``Run.predict``, screening and the service.

A row (strict JSON) has ``adapter``, ``prediction`` ({target: value}), ``coverage`` (the level,
or None), ``in_distribution``, ``ood_score``, ``threshold``, ``reasons`` (why flagged; [] when
not), ``calibrated`` and ``error`` (None unless it failed); regression adds ``interval``
({target: [lo, hi]}), classification ``probability``, ``set`` ({target: [classes]}) and
``label``. Runs saved without calibration give ``interval``/``set`` None and the fit verdict
None: they say so with ``calibrated: false``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from loralens.jsonio import json_safe
from loralens.learn.fitting.tasks import CLASSIFICATION, THRESHOLD
from loralens.learn.trust.fitcheck import FitInputs
from loralens.lora import LoRA, collate, spec_of

if TYPE_CHECKING:
    from loralens.learn.runs.folder import Run

#: What a run saved without calibration says about its predictions.
UNCALIBRATED = (
    "this run has no calibration (saved before loralens calibrated runs): no interval and no "
    "fit check beyond the layout"
)


def predict_adapters(
    run: Run,
    adapters: Sequence[LoRA | str | os.PathLike],
    *,
    coverage: float | None = None,
    batch_size: int = 64,
) -> list[dict[str, Any]]:
    """One row per adapter (files, adapter folders, folders of adapters expanded in place, or
    ``LoRA`` objects); an adapter that cannot be read, does not fit the model's layout or has
    non-finite weights gets a row with ``error`` and the others are still predicted."""
    from loralens.formats import expand_adapters

    items: list[tuple[str, LoRA | None, str | None]] = []
    for a in adapters:
        if isinstance(a, LoRA):
            items.append((str(a.metadata.get("source", f"adapter #{len(items)}")), a, None))
            continue
        for path in expand_adapters([a]):
            items.append(_load(path))
    good = [k for k, (_, lora, err) in enumerate(items) if err is None]
    for k in good:
        name, lora, _ = items[k]
        problem = _problem(run, lora, name)
        if problem:
            items[k] = (name, None, problem)
    good = [k for k, (_, _, err) in enumerate(items) if err is None]
    results: dict[int, dict[str, Any]] = {}
    for s in range(0, len(good), batch_size):
        chunk = good[s : s + batch_size]
        batch = collate([items[k][1] for k in chunk])
        batch = batch.pad_to(np.maximum(batch.spec.ranks, run.spec.ranks))
        raw, fit_in = run.outputs([batch])
        for k, row in zip(chunk, _rows(run, raw, fit_in, coverage)):
            results[k] = row
    rows = []
    for k, (name, _, err) in enumerate(items):
        row = results.get(k) or _failed(run, err)
        if row.get("error") is None and not all(np.isfinite(list(row["prediction"].values()))):
            row = _failed(
                run,
                f"the model gives a non-finite prediction for {name} (an overflow or an invalid value)",
            )
        rows.append({"adapter": name, **row})
    return json_safe(rows)


def _load(path: os.PathLike) -> tuple[str, LoRA | None, str | None]:
    """(name, the LoRA, None), or (name, None, why it cannot be read)."""
    from loralens.formats import LoRAFormatError, load_lora

    try:
        return str(path), load_lora(path), None
    except (LoRAFormatError, OSError, ValueError) as e:
        return str(path), None, str(e)


def _problem(run: Run, lora: LoRA, name: str) -> str | None:
    """Why ``lora`` cannot be predicted at all: a layout the model does not take, or weights
    that are not finite (layer 1 and the refusal part of layer 2 of the fit check)."""
    try:
        run.check(spec_of(lora), name)
    except ValueError as e:
        return str(e)
    bad = [
        layer.name
        for layer in lora.layers
        if not (bool(torch.isfinite(layer.U).all()) and bool(torch.isfinite(layer.V).all()))
    ]
    if bad:
        return f"{name}: non-finite weights (not a number or infinite) in {', '.join(bad[:3])}"
    return None


def _rows(
    run: Run, raw: np.ndarray, fit_in: FitInputs, coverage: float | None
) -> list[dict[str, Any]]:
    """The rows of predicted adapters, calibrated when the run has a calibration."""
    task, cal = run.task, run.calibration
    targets = task.targets
    if cal is None:
        pred = task.decode(raw)
        fit = [{"in_distribution": None, "ood_score": None, "threshold": None, "reasons": []}]
        fit *= len(raw)
        level = None
    else:
        out = cal.apply(task, raw, fit_in, coverage)
        pred, fit = out["pred"], out["fit"]
        level = cal.coverage if coverage is None else coverage
    rows = []
    for i, p in enumerate(pred):
        row: dict[str, Any] = {"prediction": dict(zip(targets, map(float, p)))}
        if task.kind == CLASSIFICATION:
            row["probability"] = dict(row["prediction"])
            row["set"] = (
                None if cal is None else {t: out["sets"][j][i] for j, t in enumerate(targets)}
            )
            row["label"] = {t: int(v >= THRESHOLD) for t, v in zip(targets, p)}
        else:
            row["interval"] = (
                None
                if cal is None
                else {
                    t: [float(out["lo"][i, j]), float(out["hi"][i, j])]
                    for j, t in enumerate(targets)
                }
            )
        rows.append(
            {**row, "coverage": level, **fit[i], "calibrated": cal is not None, "error": None}
        )
    return rows


def _failed(run: Run, error: str | None) -> dict[str, Any]:
    row: dict[str, Any] = {"prediction": None}
    if run.task.kind == CLASSIFICATION:
        row.update(probability=None, set=None, label=None)
    else:
        row["interval"] = None
    return {
        **row,
        "coverage": None,
        "in_distribution": None,
        "ood_score": None,
        "threshold": None,
        "reasons": [],
        "calibrated": run.calibration is not None,
        "error": error,
    }


def predict(
    run: Run,
    adapters: Sequence[LoRA | str | os.PathLike],
    *,
    batch_size: int = 64,
    coverage: float | None = None,
) -> list[dict[str, Any]]:
    """One strict-JSON row per adapter (files, adapter folders, folders of adapters): see
    the module docstring. A row that failed holds ``error``; the others are predicted."""
    return run.predict(list(adapters), coverage=coverage, batch_size=batch_size)


__all__ = ["UNCALIBRATED", "predict", "predict_adapters"]
