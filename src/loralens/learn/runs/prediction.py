"""Predicting with a trained run on adapters: one row per adapter, with its interval (or
probability and prediction set), the fit check's verdict, and the error instead when the
adapter cannot be read or does not fit. The one implementation behind ``loralens predict``,
``Run.predict``, screening and the service.

A row (strict JSON) has ``adapter``, ``prediction`` ({target: value}), ``coverage`` (the level,
or None), ``in_distribution``, ``ood_score``, ``threshold``, ``reasons`` (why flagged; [] when
not), ``calibrated`` and ``error`` (None unless it failed); regression adds ``interval``
({target: [lo, hi]}), classification ``probability``, ``set`` ({target: [classes]}) and
``label``; ``seen`` says whether the run trained on the adapter (its factors' hash is among
those of ``trained_on.json``; None for a run without that record) and ``run`` is what the run
says about itself (``runs.standing``: its test metric and n, network or linear base alone, the
coverage its intervals measured). ``calibrated`` is true only when the run's intervals or sets held on its own test
split (``Calibration.calibrated``). Runs saved without calibration give ``interval``/``set``
None and the fit verdict None: they say so with ``calibrated: false``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from loralens.jsonio import json_safe
from loralens.learn.fitting.tasks import CLASSIFICATION, THRESHOLD
from loralens.learn.runs.seen import fingerprint
from loralens.learn.trust.fitcheck import FitInputs
from loralens.lora import LayerSpec, LoRA, LoRABatch, LoRALayer, all_finite, collate

if TYPE_CHECKING:
    from loralens.learn.runs.folder import Run

#: What a run saved without calibration says about its predictions.
UNCALIBRATED = (
    "this run has no calibration (saved before loralens calibrated runs): no interval and no "
    "fit check beyond the layout"
)


#: A batch of adapters read to predict on is predicted once their factors reach this many bytes
#: (an adapter this large is predicted alone).
BATCH_BYTES = 64 * 2**20


def predict_adapters(
    run: Run,
    adapters: Sequence[LoRA | str | os.PathLike],
    *,
    coverage: float | None = None,
    batch_size: int = 64,
) -> list[dict[str, Any]]:
    """One row per adapter (files, adapter folders, folders of adapters expanded in place, or
    ``LoRA`` objects); an adapter that cannot be read, does not fit the model's layout or has
    non-finite weights gets a row with ``error`` and the others are still predicted.

    Adapters are read as they are predicted, ``batch_size`` at a time or fewer once their
    factors reach :data:`BATCH_BYTES`, each a layer at a time straight into the model's batch
    layout, and let go after: memory holds one batch (one adapter, for adapters that large),
    never all of them."""
    from loralens.formats import expand_adapters

    sources: list[LoRA | os.PathLike] = []
    for a in adapters:
        sources.extend([a] if isinstance(a, LoRA) else expand_adapters([a]))
    rows: list[dict[str, Any] | None] = [None] * len(sources)
    seen: list[bool | None] = [None] * len(sources)
    names: list[str] = []
    chunk: list[tuple[int, LoRABatch]] = []
    size = 0
    for k, source in enumerate(sources):
        name, batch, err = _read(run, source, len(names))
        names.append(name)
        if batch is None:
            rows[k] = _failed(run, err)
            continue
        if run.trained_hashes is not None:
            seen[k] = fingerprint(batch.unbatch()[0]) in run.trained_hashes
        chunk.append((k, batch))
        size += sum(u.nbytes + v.nbytes for u, v in zip(batch.U, batch.V))
        del batch
        if len(chunk) >= batch_size or size >= BATCH_BYTES:
            _predict_chunk(run, chunk, coverage, rows)
            chunk, size = [], 0
    if chunk:
        _predict_chunk(run, chunk, coverage, rows)
    out = []
    for name, row, was_seen in zip(names, rows, seen):
        if row.get("error") is None and not all(np.isfinite(list(row["prediction"].values()))):
            row = _failed(
                run,
                f"the model gives a non-finite prediction for {name} (an overflow or an invalid value)",
            )
        out.append({"adapter": name, **row, "seen": was_seen, "run": run.standing})
    return json_safe(out)


def _predict_chunk(
    run: Run,
    chunk: list[tuple[int, LoRABatch]],
    coverage: float | None,
    rows: list[dict[str, Any] | None],
) -> None:
    """Predict the adapters of ``chunk`` (batches of one; emptied, so that each is let go once
    it is in the model's batch) into ``rows``."""
    index = [k for k, _ in chunk]
    batches = [one for _, one in chunk]
    batch = batches[0] if len(batches) == 1 else collate([one.unbatch()[0] for one in batches])
    del batches
    chunk.clear()
    batch = batch.pad_to(np.maximum(batch.spec.ranks, run.spec.ranks))
    raw, fit_in = run.outputs([batch])
    del batch
    for k, row in zip(index, _rows(run, raw, fit_in, coverage)):
        rows[k] = row


def _read(run: Run, source: LoRA | os.PathLike, k: int) -> tuple[str, LoRABatch | None, str]:
    """(name, the adapter as a batch of one, ""), or (name, None, why it cannot be read or
    predicted); ``k`` numbers a LoRA object without a source. A file's layout is checked from
    its header, before any of its values is read."""
    from loralens.formats import LoRAFormatError, open_lora

    if isinstance(source, LoRA):
        name = str(source.metadata.get("source", f"adapter #{k}"))
        return name, *_batch_of_one(run, name, source.names, source.shapes, source.layers)
    name = str(source)
    try:
        with open_lora(source) as reader:
            return name, *_batch_of_one(run, name, reader.names, reader.shapes, reader)
    except (LoRAFormatError, OSError, ValueError) as e:
        return name, None, str(e)


def _batch_of_one(
    run: Run,
    name: str,
    names: Sequence[str],
    shapes: Sequence[tuple[int, int]],
    layers: Iterable[LoRALayer],
) -> tuple[LoRABatch | None, str]:
    """(what :func:`collate` makes of one adapter, ""), each layer copied into it as it is read
    and then let go; or (None, why it cannot be predicted at all: a layout the model does not
    take, or weights that are not finite: layer 1 and the refusal part of layer 2 of the fit
    check)."""
    try:
        run.check(LayerSpec(tuple(names), tuple(shapes), ()), name)
    except ValueError as e:
        return None, str(e)
    parts: list[LoRABatch] = []
    bad: list[str] = []
    for layer in layers:
        if not (all_finite(layer.U) and all_finite(layer.V)):
            bad.append(layer.name)
        dtype = parts[0].dtype if parts else None  # collate's: the first layer's
        parts.append(collate([LoRA(layers=[layer])], dtype=dtype))
        del layer  # before the next one is read
    if bad:
        return (
            None,
            f"{name}: non-finite weights (not a number or infinite) in {', '.join(bad[:3])}",
        )
    ranks = torch.cat([p.ranks for p in parts], dim=1)
    U, V = [p.U[0] for p in parts], [p.V[0] for p in parts]
    return LoRABatch(names=list(names), U=U, V=V, ranks=ranks), ""


def _rows(
    run: Run, raw: np.ndarray, fit_in: FitInputs, coverage: float | None
) -> list[dict[str, Any]]:
    """The rows of predicted adapters, calibrated when the run has a calibration."""
    task, cal = run.task, run.calibration
    targets = task.targets
    calibrated = cal is not None and cal.calibrated
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
        rows.append({**row, "coverage": level, **fit[i], "calibrated": calibrated, "error": None})
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
        "calibrated": run.calibration is not None and run.calibration.calibrated,
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
