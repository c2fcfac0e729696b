"""A run's calibration: conformal intervals (regression) or temperature-scaled probabilities and
prediction sets (classification), and the fit check (:mod:`loralens.learn.trust.fitcheck`), fitted
once after training and stored beside the model.

Calibration scores come from rows no part of the model was fitted on (``METHODS``, chosen by
:mod:`loralens.learn.training.calibrating`). With ``normalized`` intervals, a LoRA's difficulty
is ``offset + ood_score`` (offset: the median calibration ood_score), so intervals widen where
the adapter lies far from the training LoRAs. ``problems`` holds what the check on the test
split found (empty: the intervals or sets held there; None: never checked, a run saved before
the check, which ``load_run`` judges from the run's metrics.json when it has one).

Files: ``calibration.json`` (settings, scalars, problems) and ``calibration.safetensors``
(arrays); both read as untrusted input. Runs without them (saved before) predict without
intervals; version 1 files (saved before the fit check's scale score) load with the ood_score
alone, version 2 files (before the span score) with the ood and scale scores, versions 1-3
without the check's outcome.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loralens.errors import RunError
from loralens.jsonio import read_json_object, write_json
from loralens.learn.fitting.tasks import CLASSIFICATION, Task
from loralens.learn.trust import conformal as cp
from loralens.learn.trust.fitcheck import FitCheck, FitInputs, ScaleModel
from loralens.learn.trust.span import SPAN_MAX_RANK, Span
from loralens.lora import LayerSpec

CALIBRATION = "calibration.json"
ARRAYS = "calibration.safetensors"
FORMAT = "loralens-calibration"
VERSION = 4
VERSIONS = (1, 2, 3, 4)
#: What a run calibrates on: held-out rows (split), with the linear base's out-of-fold outputs
#: on train + val (split+cv) or those alone (cv), validation rows (val; val+cv: the base out of
#: fold), out-of-fold outputs of cross-validation (cross).
METHODS = ("split", "split+cv", "cv", "val", "val+cv", "cross")
#: Longest problem line kept from a calibration file, and most lines.
MAX_PROBLEM = 1000
MAX_PROBLEMS = 1000
#: Training LoRAs kept as the fit check's reference (a seeded sample above this).
MAX_REFERENCE = 2048


@dataclass
class Calibration:
    """What a run needs to put an interval (or set) and a fit verdict on a prediction."""

    kind: str
    targets: list[str]
    coverage: float  # the default level
    method: str
    normalized: bool
    scores: np.ndarray  # (n, T) calibration nonconformity: |res| / difficulty, or 1 - p(true)
    baseline: np.ndarray  # (n, T) |y - train mean|: the no-weights interval's scores
    temperature: np.ndarray  # (T,) 1 for regression
    offset: float
    fit: FitCheck
    ood: np.ndarray  # (n,) ood_score of each calibration LoRA
    size: np.ndarray  # (n,) its scale_score (zeros for version 1 files)
    span: np.ndarray  # (n,) its span_score (zeros before version 3)
    #: what the check on the test split found (empty: held; None: never checked)
    problems: list[str] | None = None

    @property
    def calibrated(self) -> bool:
        """Whether the intervals or sets kept their promise on the run's test split."""
        return self.problems == []

    def quantiles(self, level: float | None = None) -> np.ndarray:
        """(T,) conformal quantile of the calibration scores at ``level`` (default: the run's)."""
        level = cp.check_level(self.coverage if level is None else level)
        return np.array([cp.conformal_quantile(s, level) for s in self.scores.T])

    def difficulty(self, ood: np.ndarray) -> np.ndarray:
        """(N,) per-LoRA scale of the intervals (ones when not ``normalized``)."""
        ood = np.asarray(ood, dtype=np.float64)
        return self.offset + ood if self.normalized else np.ones_like(ood)

    def apply(
        self,
        task: Task,
        raw: np.ndarray,
        inputs: FitInputs,
        level: float | None = None,
    ) -> dict[str, Any]:
        """Calibrated predictions of raw outputs: ``pred`` (N, T) and ``lo``/``hi``, or ``prob``
        and ``sets`` (per target, per LoRA); ``fit``: the fit check's row per LoRA."""
        fit = self.fit.check(inputs)
        q = self.quantiles(level)
        if task.kind == CLASSIFICATION:
            prob = cp.calibrated(raw, self.temperature)
            sets = [cp.prediction_sets(prob[:, j], q[j]) for j in range(prob.shape[1])]
            return {"pred": prob, "prob": prob, "sets": sets, "fit": fit}
        pred = task.decode(raw)
        scale = self.difficulty([f["ood_score"] for f in fit])
        lo, hi = cp.intervals(pred, scale, q)
        return {"pred": pred, "lo": lo, "hi": hi, "fit": fit}

    def report(
        self,
        task: Task,
        raw: np.ndarray,
        inputs: FitInputs,
        y: np.ndarray,
        level: float | None = None,
    ) -> dict[str, Any]:
        """How the promise holds on labelled LoRAs: coverage, width (and the no-weights
        interval's) or set size and ECE, the share flagged by the fit check, and the
        ``problems`` of targets covered below what the number of LoRAs explains."""
        level = self.coverage if level is None else cp.check_level(level)
        out = self.apply(task, raw, inputs, level)
        flagged = [not f["in_distribution"] for f in out["fit"]]
        rep: dict[str, Any] = {"level": level, "n": len(y)}
        if task.kind == CLASSIFICATION:
            rep.update(cp.set_report(out["prob"], y, self.quantiles(level)))
            rep["ece_uncalibrated"] = cp.set_report(task.decode(raw), y, self.quantiles(level))[
                "ece"
            ]
        else:
            rep.update(cp.interval_report(out["lo"], out["hi"], y, np.asarray(task.std)))
            qb = np.array([cp.conformal_quantile(s, level) for s in self.baseline.T])
            rep["width_no_weights_rel_std"] = float(np.mean(2 * qb / np.asarray(task.std)))
        rep["flagged"] = float(np.mean(flagged)) if flagged else math.nan
        rep["ood_score_mean"] = float(np.mean([f["ood_score"] for f in out["fit"]] or [math.nan]))
        rep["problems"] = cp.coverage_problems(rep, self.targets)
        return rep

    def summary(self) -> dict[str, Any]:
        """The settings (for metrics.json)."""
        return {
            "method": self.method,
            "coverage": self.coverage,
            "normalized": self.normalized,
            "n_calibration": len(self.scores),
            "ood_share": self.fit.share,
            "ood_threshold": self.fit.threshold,
            "scale_threshold": self.fit.size_threshold if self.fit.size else None,
            "span_threshold": self.fit.span_threshold if self.fit.span else None,
            "temperature": self.temperature.tolist() if self.kind == CLASSIFICATION else None,
            "calibrated": self.calibrated,
            "problems": self.problems,
        }

    # -------------------------------------------------------------------------- files

    def save(self, out: Path) -> None:
        from safetensors.numpy import save_file

        f = self.fit
        arrays = {
            "scores": self.scores,
            "baseline": self.baseline,
            "temperature": self.temperature,
            "mean": f.mean,
            "scale": f.scale,
            "reference": f.reference,
            "log_rms_lo": f.log_rms_lo,
            "log_rms_hi": f.log_rms_hi,
            "ood": self.ood,
            "size": self.size,
            "span": self.span,
        }
        if f.size is not None:
            arrays["size_coef"] = f.size.coef
        if f.span is not None:
            for i, (b_in, b_out) in enumerate(zip(f.span.inputs, f.span.outputs)):
                arrays[f"span_in.{i}"], arrays[f"span_out.{i}"] = b_in, b_out
        save_file(
            {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in arrays.items()},
            str(out / ARRAYS),
            metadata={"format": FORMAT},
        )
        write_json(
            out / CALIBRATION,
            {
                "format": FORMAT,
                "version": VERSION,
                "kind": self.kind,
                "targets": self.targets,
                "coverage": self.coverage,
                "method": self.method,
                "normalized": self.normalized,
                "offset": self.offset,
                "threshold": None if math.isinf(f.threshold) else f.threshold,
                "share": f.share,
                "shrinkage": f.shrinkage,
                "trace": f.trace,
                "layer_names": f.layer_names,
                "size_bias": None if f.size is None else f.size.bias,
                "size_threshold": None if math.isinf(f.size_threshold) else f.size_threshold,
                "span": f.span is not None,
                "span_threshold": None if math.isinf(f.span_threshold) else f.span_threshold,
                "problems": self.problems,
            },
        )


def read_calibration(
    run_dir: Path, task: Task, spec: LayerSpec, unit_dim: int | None = None
) -> Calibration | None:
    """The calibration of the run in ``run_dir``, checked against its task and layers (names
    and shapes of ``spec``; and the length ``unit_dim`` of the model's scale-free features, when
    given); None when the run has none (saved before calibration existed); :class:`RunError` if
    it is damaged."""
    layer_names = list(spec.names)
    path = run_dir / CALIBRATION
    if not path.exists() and not (run_dir / ARRAYS).exists():
        return None
    d = read_json_object(path, error=RunError)

    def bad(what: str) -> RunError:
        return RunError(f"{path}: {what}")

    version = d.get("version")
    if d.get("format") != FORMAT or version not in VERSIONS:
        raise bad(f"not a {FORMAT} file of version {' or '.join(map(str, VERSIONS))}")
    if d.get("kind") != task.kind or d.get("targets") != task.targets:
        raise bad("its task or targets differ from the run's config.json")
    if d.get("method") not in METHODS or not isinstance(d.get("normalized"), bool):
        raise bad(f"method must be one of {METHODS} and normalized true or false")
    if d.get("layer_names") != layer_names:
        raise bad("its layer names differ from the model's")
    try:
        coverage = cp.check_level(d.get("coverage"))
        share = cp.check_level(d.get("share"), "share")
    except ValueError as e:
        raise bad(str(e)) from None
    offset, threshold = d.get("offset"), d.get("threshold")
    shrinkage, trace = d.get("shrinkage"), d.get("trace")
    if not (_finite_number(shrinkage) and 0 <= shrinkage <= 1 and _finite_number(trace)):
        raise bad("shrinkage must be a number in [0, 1] and trace a finite number")
    for name, v in (("offset", offset), ("threshold", threshold)):
        if not (v is None and name == "threshold") and not _finite_number(v):
            raise bad(f"{name} must be a finite number")
    a = _read_arrays(run_dir / ARRAYS, version)
    T, L = len(task.targets), len(layer_names)
    D = a["mean"].shape[0] if a["mean"].ndim == 1 else -1
    want = {
        "scores": (None, T),
        "baseline": (None, T),
        "temperature": (T,),
        "mean": (D,),
        "scale": (D,),
        "reference": (None, D),
        "log_rms_lo": (L,),
        "log_rms_hi": (L,),
        "ood": (len(a["scores"]),),
        "size": (len(a["scores"]),),
        "span": (len(a["scores"]),),
    }
    size, bias, size_threshold = None, d.get("size_bias"), d.get("size_threshold")
    if version > 1 and bias is not None:
        if not _finite_number(bias) or not (
            size_threshold is None or _finite_number(size_threshold)
        ):
            raise bad("size_bias must be a finite number and size_threshold one or null")
        if "size_coef" not in a:
            raise RunError(f"{run_dir / ARRAYS}: lacks size_coef (calibration.json has size_bias)")
        want["size_coef"] = (unit_dim,)
        size = ScaleModel(a["size_coef"], float(bias))
    span, span_threshold = None, d.get("span_threshold")
    if version > 2 and d.get("span"):
        if not (span_threshold is None or _finite_number(span_threshold)):
            raise bad("span_threshold must be a finite number or null")
        for i, (o, n) in enumerate(spec.shapes):
            for side, width in (("in", n), ("out", o)):
                key = f"span_{side}.{i}"
                if key not in a:
                    raise RunError(f"{run_dir / ARRAYS}: lacks {key} (calibration.json has span)")
                if a[key].shape[0] > min(SPAN_MAX_RANK, width):
                    raise RunError(f"{run_dir / ARRAYS}: {key} has {a[key].shape[0]} rows")
                want[key] = (None, width)
        span = Span([a[f"span_in.{i}"] for i in range(L)], [a[f"span_out.{i}"] for i in range(L)])
    for key, shape in want.items():
        got = a[key].shape
        if len(got) != len(shape) or any(w is not None and g != w for g, w in zip(got, shape)):
            raise RunError(f"{run_dir / ARRAYS}: {key} has shape {list(got)}")
    if not 1 <= len(a["reference"]) <= MAX_REFERENCE or (a["scale"] <= 0).any():
        raise RunError(f"{run_dir / ARRAYS}: reference or scale out of range")
    fit = FitCheck(
        a["mean"],
        a["scale"],
        a["reference"],
        float(shrinkage),
        float(trace),
        a["log_rms_lo"],
        a["log_rms_hi"],
        list(layer_names),
        math.inf if threshold is None else float(threshold),
        share,
        size,
        math.inf if size is None or size_threshold is None else float(size_threshold),
        span,
        math.inf if span is None or span_threshold is None else float(span_threshold),
    )
    problems = d.get("problems")
    if version > 3 and not (
        problems is None
        or (
            isinstance(problems, list)
            and len(problems) <= MAX_PROBLEMS
            and all(isinstance(p, str) and len(p) <= MAX_PROBLEM for p in problems)
        )
    ):
        raise bad("problems must be null or a list of short strings")
    return Calibration(
        task.kind,
        list(task.targets),
        coverage,
        d["method"],
        d["normalized"],
        a["scores"],
        a["baseline"],
        a["temperature"],
        float(offset),
        fit,
        a["ood"],
        a["size"],
        a["span"],
        problems if version > 3 else None,
    )


def _finite_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _read_arrays(path: Path, version: int) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    if not path.is_file():
        raise RunError(f"{path}: missing (calibration.json names it)")
    try:
        arrays = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise RunError(f"{path}: not a readable safetensors file ({e})") from None
    missing = {"scores", "baseline", "temperature", "mean", "scale", "reference"}
    missing |= {"log_rms_lo", "log_rms_hi", "ood"}
    missing |= {"size"} if version > 1 else set()
    missing |= {"span"} if version > 2 else set()
    missing -= set(arrays)
    if missing:
        raise RunError(f"{path}: lacks {sorted(missing)}")
    out = {k: v.astype(np.float64) for k, v in arrays.items()}
    out.setdefault("size", np.zeros(len(out["scores"])))
    out.setdefault("span", np.zeros(len(out["scores"])))
    for k, v in out.items():
        if k not in ("scores", "baseline", "ood", "size", "span") and not np.isfinite(v).all():
            raise RunError(f"{path}: {k} holds NaN/inf")
    return out


__all__ = ["ARRAYS", "CALIBRATION", "Calibration", "read_calibration"]
