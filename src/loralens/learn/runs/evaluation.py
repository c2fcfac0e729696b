"""Evaluating a run on a store: metrics on the LoRAs it never trained on (those it did are
counted and left out), and how its intervals or sets and its fit check hold there."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from loralens.errors import NonFiniteOutputError
from loralens.jsonio import json_safe, write_json
from loralens.learn.fitting.data import check_finite_labels, select_rows
from loralens.learn.runs.folder import Run, load_run
from loralens.learn.runs.prediction import UNCALIBRATED
from loralens.learn.runs.report import headline
from loralens.learn.runs.seen import read_trained_on, seen_mask
from loralens.lora import LayerSpec
from loralens.store import LoRAStore, StoreError


def evaluate(
    run: Run | str | os.PathLike,
    store: LoRAStore | str | os.PathLike,
    *,
    where: str | None = None,
    batch_size: int = 256,
    out_dir: str | os.PathLike | None = None,
    coverage: float | None = None,
) -> dict[str, Any]:
    """Metrics of a trained model on the (selected) LoRAs of a store that it never trained on.

    LoRAs the run trained or early-stopped on (``runs.seen``: same content, or same id and
    source) are left out of the metrics and counted in ``warnings``; when every LoRA was seen,
    the metrics are on all of them and the warning says they are training-set numbers.
    ``calibration`` says how the run's intervals (at ``coverage``, default the run's) or sets
    hold on these LoRAs and what share of them the fit check flags; ``run`` what the run says
    about itself (``runs.standing``).
    """
    run = run if isinstance(run, Run) else load_run(run)
    store = store if isinstance(store, LoRAStore) else LoRAStore(store)
    store_spec = LayerSpec(tuple(store.names), tuple(store.shapes), tuple(store.spec.ranks))
    run.check(store_spec, f"store {store.path}")
    rows = select_rows(store, where)
    y_all = store.labels(run.task.targets)
    check_finite_labels(store, run.task.targets, y_all, rows)
    rows = rows[~np.isnan(y_all[rows]).all(axis=1)]
    if len(rows) == 0:
        raise StoreError(f"no LoRA in {store.path} has labels {run.task.targets}")
    t0 = time.time()
    out, fit_in = run.store_outputs(store, rows, batch_size)
    bad = ~np.isfinite(run.task.decode(out)).all(axis=1)
    if bad.any():
        ids = [store.ids[r] for r in rows[bad][:5]]
        raise NonFiniteOutputError(
            f"the model in {run.path} gives non-finite (NaN/inf) predictions for {int(bad.sum())} "
            f"of {len(rows)} LoRAs of {store.path} (ids {', '.join(ids)}"
            + (", ...)" if bad.sum() > 5 else ")")
        )
    warnings = []
    record = read_trained_on(run.path)
    if record is None:
        warnings.append(
            "this run records no training LoRAs (written by an older loralens): some of these "
            "LoRAs may have been training data"
        )
        seen = np.zeros(len(rows), dtype=bool)
    else:
        seen = seen_mask(record, store, rows)
    n_seen = int(seen.sum())
    if n_seen == len(rows):
        warnings.append(
            f"all {len(rows)} LoRAs were used to train this run: these are training-set "
            "metrics, not a measure of how it does on new LoRAs"
        )
        seen[:] = False
    elif n_seen:
        warnings.append(
            f"{n_seen} of {len(rows)} LoRAs were used to train this run and are left out: "
            f"the metrics are on the {len(rows) - n_seen} unseen ones"
        )
    metrics = run.task.metrics(out[~seen], y_all[rows[~seen]])
    cal = run.calibration
    trust = (
        {"calibrated": False, "note": UNCALIBRATED}
        if cal is None
        else {
            **cal.summary(),
            "report": cal.report(
                run.task, out[~seen], fit_in.take(~seen), y_all[rows[~seen]], coverage
            ),
        }
    )
    result = json_safe(
        {
            "task": run.task.kind,
            "model": run.config["model"]["name"],
            "targets": run.task.targets,
            "store": str(store.path),
            "where": where,
            "n": int((~seen).sum()),
            "n_seen": n_seen,
            "warnings": warnings,
            "metrics": headline(metrics, run.task.kind),
            "detail": metrics,
            "calibration": trust,
            "run": run.standing,
            "seconds": time.time() - t0,
        }
    )
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        write_json(Path(out_dir) / "evaluate.json", result)
    return result


__all__ = ["evaluate"]
