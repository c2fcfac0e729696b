"""Screening one adapter: what it is (the ``inspect`` report), whether it is sane (flags), what
it looks like it was trained on (a base-model guess) and what trained runs predict about it.

:func:`screen_adapter` is the one implementation behind ``loralens serve`` (``POST /api/screen``)
and ``loralens screen``; its ``layers`` rows are ``inspect --json``'s and each prediction entry
holds one run's ``predict --json`` row (``learn.predict``): prediction, interval or set, the fit
check's verdict, whether the run trained on the adapter (``seen``) and is ``calibrated``, and
what the run says about itself (``standing``).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loralens.families import guess_base_model
from loralens.flags import layer_flags
from loralens.inspection import inspect_adapter
from loralens.jsonio import json_safe
from loralens.learn.runs.folder import METRICS, Run, load_run
from loralens.learn.runs.report import headline
from loralens.learn.runs.standing import standing_line

#: singular values kept per layer (the page plots these spectra)
SPECTRUM = 64


@dataclass
class ScreeningRun:
    """A trained run ready to predict on screened adapters (its calibration gives intervals)."""

    name: str
    run: Run

    def summary(self) -> dict[str, Any]:
        """What the run predicts, what it was trained on and how well it did on its test split."""
        metrics_path = self.run.path / METRICS
        metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
        spec = self.run.spec
        store = metrics.get("store")
        cal = self.run.calibration
        return json_safe(
            {
                "name": self.name,
                "model": self.run.config["model"]["name"],
                "task": self.run.task.kind,
                "targets": list(self.run.task.targets),
                "trained_on": {"store": Path(store).name if store else None, "n": metrics.get("n")},
                "test": headline(metrics.get("test", {}), self.run.task.kind),
                "baseline_test": metrics.get("baseline", {}).get("test"),
                "layout": {"num_layers": len(spec.names), "ranks": sorted(set(spec.ranks))},
                "interval_level": None if cal is None else cal.coverage,
                "standing": self.run.standing,
                "standing_line": standing_line(self.run.standing),
            }
        )


def load_screening_runs(paths: Sequence[str | os.PathLike]) -> list[ScreeningRun]:
    """Load run directories for screening; each is named by its folder (made unique)."""
    runs: list[ScreeningRun] = []
    seen: set[str] = set()
    for p in paths:
        run = load_run(p)
        name = base = run.path.resolve().name
        k = 2
        while name in seen:
            name, k = f"{base}-{k}", k + 1
        seen.add(name)
        runs.append(ScreeningRun(name, run))
    return runs


def screen_adapter(
    path: str | os.PathLike,
    runs: Sequence[ScreeningRun] = (),
    *,
    name: str | None = None,
    top: int = SPECTRUM,
) -> dict[str, Any]:
    """Screen the adapter at ``path``: the ``inspect`` report (``top`` singular values per
    layer, ``base_model_guess``, ``flags``, ``training``), the reader's ``warnings`` and one
    ``predictions`` entry per run, with ``seconds``. ``name`` replaces the path in the report and in messages (an upload's name).

    Raises :class:`~loralens.formats.LoRAFormatError` when the file cannot be read at all;
    a run whose layout the adapter does not fit gets ``{"run", "error"}`` instead of a number.
    """
    t0 = time.perf_counter()
    shown = name if name is not None else str(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            report = inspect_adapter(path, top=top, allow_nonfinite=True)
        except ValueError as e:  # LoRAFormatError included: name the upload, not the temp file
            raise type(e)(*_renamed_args(e, path, shown)) from None
    report["path"] = shown
    report["warnings"] = list(
        dict.fromkeys(str(w.message).replace(str(path), shown) for w in caught)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reader's warnings were collected above
        report["predictions"] = [_prediction(r, path, shown) for r in runs]
    report["seconds"] = time.perf_counter() - t0
    return json_safe(report)


def _renamed_args(e: ValueError, path: str | os.PathLike, shown: str) -> tuple[Any, ...]:
    from loralens.formats import LoRAFormatError

    if isinstance(e, LoRAFormatError):
        return (e.path.replace(str(path), shown), e.problem)
    return (str(e).replace(str(path), shown),)


def _prediction(srun: ScreeningRun, path: str | os.PathLike, shown: str) -> dict[str, Any]:
    """One run's ``predict`` row for the adapter (interval or set, fit check); an error entry if
    it does not fit the run (or cannot be read at the run's strictness, e.g. NaN weights)."""
    task = srun.run.task
    entry: dict[str, Any] = {
        "run": srun.name,
        "model": srun.run.config["model"]["name"],
        "task": task.kind,
        "targets": list(task.targets),
    }
    row = srun.run.predict([path])[0]
    if row["error"] is not None:  # named by the upload and the run, not by server paths
        message = row["error"].replace(str(path), shown).replace(str(srun.run.path), srun.name)
        return {**entry, "error": message}
    keep = ("prediction", "label", "interval", "set", "in_distribution", "ood_score", "threshold")
    entry.update({k: row[k] for k in (*keep, "calibrated", "seen") if k in row})
    entry["reasons"] = [r.replace(str(path), shown) for r in row["reasons"]]
    entry["interval_level"] = row["coverage"]
    entry["standing"] = row["run"]
    return entry


__all__ = [
    "SPECTRUM",
    "ScreeningRun",
    "guess_base_model",
    "layer_flags",
    "load_screening_runs",
    "screen_adapter",
]
