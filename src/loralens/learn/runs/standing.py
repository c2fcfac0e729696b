"""What a run says about itself beside every prediction it makes: its test metric and the number
of LoRAs that measured it, whether its network or its linear base alone predicts, and how its
intervals or sets covered its test split, in numbers (:func:`standing`) and in words
(:func:`standing_line`). Read from ``metrics.json`` as untrusted input."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from loralens.errors import RunError
from loralens.jsonio import read_json_object
from loralens.learn.runs.checkpoint import METRICS
from loralens.learn.runs.report import PRIMARY
from loralens.learn.trust.calibration import Calibration

#: Largest metrics.json read (a run's metrics are a few KiB).
MAX_METRICS_BYTES = 16 << 20
#: How each primary metric reads in a sentence.
METRIC_NAMES = {"r2": "R²", "accuracy": "accuracy"}


def read_metrics(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """A run folder's ``metrics.json`` (None when it has none); RunError naming a damaged one."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return None
    return read_json_object(path, error=RunError, max_bytes=MAX_METRICS_BYTES)


def _number(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        d = d.get(k) if isinstance(d, Mapping) else None
    return d


def standing(
    metrics: Mapping[str, Any] | None, calibration: Calibration | None, base_alone: bool
) -> dict[str, Any]:
    """``metric`` and its test ``value`` (``std`` over folds when cross-validated) on ``n_test``
    LoRAs, ``predictor`` (:func:`_predictor`), the interval or set ``level`` and
    the ``coverage`` measured on the test split, ``calibrated`` and the ``problems`` found."""
    kind = _get(metrics, "task")
    metric = PRIMARY.get(kind) if isinstance(kind, str) else None
    n = _get(metrics, "n", "test")
    problems = None if calibration is None else calibration.problems
    return {
        "metric": metric,
        "value": _number(_get(metrics, "test", metric)) if metric else None,
        "std": _number(_get(metrics, "test_std", metric)) if metric else None,
        "n_test": int(n) if _number(n) is not None else None,
        "predictor": _predictor(metrics, base_alone),
        "level": None if calibration is None else calibration.coverage,
        "coverage": _number(_get(metrics, "calibration", "test", "coverage")),
        "calibrated": calibration is not None and calibration.calibrated,
        "problems": list(problems or []),
    }


def _predictor(metrics: Mapping[str, Any] | None, base_alone: bool) -> str:
    """What predicts: the linear base alone, the network at its warm start (a network without
    a base whose best epoch was 0, before any training), or the trained network."""
    if base_alone:
        return "linear base alone"
    return "network at its warm start" if _get(metrics, "best_epoch") == 0 else "network"


def standing_line(st: Mapping[str, Any]) -> str:
    """One sentence of :func:`standing`: "test R² 0.912 on 80 LoRAs (network); 90% intervals
    covered 0.89 of them", and "NOT calibrated" when they did not keep their promise."""
    what = METRIC_NAMES.get(st.get("metric") or "", "score")
    value = "-" if st.get("value") is None else f"{st['value']:.3f}"
    if st.get("std") is not None:
        value += f" ± {st['std']:.3f}"
    n = st.get("n_test")
    line = f"test {what} {value}" + (f" on {n} LoRAs" if n else "") + f" ({st['predictor']})"
    if st.get("level") is None:
        return line + "; no intervals (uncalibrated run)"
    shape = "sets" if st.get("metric") == "accuracy" else "intervals"
    cov = "-" if st.get("coverage") is None else f"{st['coverage']:.2f}"
    line += f"; {st['level']:.0%} {shape} covered {cov} of its test LoRAs"
    return line if st.get("calibrated") else line + " (NOT calibrated: treat them as unreliable)"


__all__ = ["read_metrics", "standing", "standing_line"]
