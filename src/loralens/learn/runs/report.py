"""How a training run's metrics read to a person: the table's title, its columns (model, linear
probes, no weights) and one line saying whether the model beats its probes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from loralens.jsonio import json_safe
from loralens.learn.fitting.probes import PROBES
from loralens.learn.fitting.tasks import CLASSIFICATION, FPR_LEVELS, tpr_key

PRIMARY = {"regression": "r2", "classification": "accuracy"}


def cell(mean: float | None, std: float | None = None, fmt: str = ".4g") -> str:
    """``mean ± std``, or the mean alone where there is no spread (one split, one seed)."""
    if mean is None:
        return "-"
    return format(mean, fmt) + ("" if std is None else f" ± {format(std, fmt)}")


def train_title(metrics: Mapping[str, Any]) -> str:
    """What the numbers are measured on: the test split, or k-fold cross-validation."""
    n, what = metrics["n"], f"{metrics['model']} on {', '.join(metrics['targets'][:6])}"
    cv = metrics.get("cv")
    if cv:
        return (
            f"{what}: {cv['folds']}-fold cross-validation over {n['test']} LoRAs, mean ± std "
            f"over folds (saved model: refit on {cv['refit']})"
        )
    return (
        f"{what}: test split ({n['test']} LoRAs; trained on {n['train']}, best epoch "
        f"{metrics['best_epoch']} of {metrics['epochs_run']} by {n['val']} validation LoRAs)"
    )


def _column(test: Mapping[str, Any], std: Mapping[str, Any] | None) -> dict[str, str]:
    return {k: cell(v, (std or {}).get(k)) for k, v in test.items()}


def train_columns(metrics: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """Formatted metric columns: the model, each probe that ran, and the no-weights baseline."""
    cols = {"model": _column(metrics["test"], metrics.get("test_std"))}
    for name in PROBES:
        p = metrics.get("probes", {}).get(name)
        if p and "test" in p:
            cols[name] = _column(p["test"], p.get("test_std"))
    base = metrics["baseline"]
    cols["no weights"] = _column(base["test"], base.get("test_std"))
    return cols


def below(mine: float | None, theirs: float | None) -> bool:
    """``mine`` is below ``theirs`` at the three decimals every table shows (a model that is its
    linear base, equal to the probe but for float rounding, is not "below" it)."""
    return mine is not None and theirs is not None and round(mine, 3) < round(theirs, 3)


def probe_verdict(metrics: Mapping[str, Any]) -> list[str]:
    """One line per probe the model loses to (on the primary metric), and skipped probes."""
    key = PRIMARY[metrics["task"]]
    mine = metrics["test"].get(key)
    lines = []
    for name, p in metrics.get("probes", {}).items():
        if "skipped" in p:
            lines.append(f"{name}: {p['skipped']}")
            continue
        theirs = p["test"].get(key)
        if below(mine, theirs):
            lines.append(
                f"note: the model ({key} {mine:.3f}) does worse than the linear {name} "
                f"({theirs:.3f}); prefer the probe, or more LoRAs"
            )
    return lines


def calibration_lines(entry: dict[str, Any] | None, key: str = "test") -> list[str]:
    """How a run's intervals or sets held (on its test split, or ``key``'s report) and what
    share its fit check flagged, then a line per target they failed; one line saying so when
    it has no calibration."""
    if not entry or not entry.get(key):
        note = (entry or {}).get("note", "no calibration: predictions come without intervals")
        return [note]
    rep = entry[key]
    where = "the test split" if key == "test" else f"these {rep['n']} LoRAs"
    level = f"{rep['level']:.0%}"
    if rep.get("set_size") is not None:
        shape = f"mean set size {cell(rep['set_size'], fmt='.2f')}, ECE {cell(rep.get('ece'), fmt='.3f')}"
    else:
        shape = (
            f"mean width {cell(rep['width_rel_std'], fmt='.2f')} label std (no weights: "
            f"{cell(rep['width_no_weights_rel_std'], fmt='.2f')})"
        )
    lines = [
        f"{level} {'sets' if rep.get('set_size') is not None else 'intervals'} on {where}: "
        f"coverage {cell(rep['coverage'], fmt='.2f')}, {shape}; fit check flags {cell(rep['flagged'], fmt='.0%')} "
        f"(threshold {cell(entry['ood_threshold'], fmt='.3g')}, {entry['method']} calibration on "
        f"{entry['n_calibration']} LoRAs)"
    ]
    for problem in rep.get("problems") or []:
        lines.append(f"not calibrated on {where}: {problem}")
    return lines


def kept(metrics: Mapping[str, Any]) -> str:
    """Which model a run saved: the network after its best epoch, or at epoch 0 (before any
    training) its linear base alone, or the network at its warm start where it has no base."""
    if metrics["best_epoch"] > 0:
        return f"the network, epoch {metrics['best_epoch']}"
    base = (metrics.get("linear_base") or {}).get("kind", "none")
    return "the linear base alone" if base != "none" else "the network at its warm start"


def headline(metrics: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """The metrics a run reports for a task ``kind`` (the per-target detail left out)."""
    keys = (
        ("accuracy", "auroc", *map(tpr_key, FPR_LEVELS), "loss")
        if kind == CLASSIFICATION
        else ("r2", "kendall_tau", "spearman", "mse", "mse_standardized", "loss")
    )
    return {k: json_safe(metrics[k]) for k in keys if k in metrics}


__all__ = [
    "calibration_lines",
    "cell",
    "headline",
    "kept",
    "probe_verdict",
    "train_columns",
    "train_title",
]
