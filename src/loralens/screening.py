"""Screening one adapter: what it is (the ``inspect`` report), whether it is sane (flags), what
it looks like it was trained on (a base-model guess) and what trained runs predict about it.

:func:`screen_adapter` is the one implementation behind ``loralens serve`` (``POST /api/screen``)
and ``loralens screen``; its ``layers`` rows are ``inspect --json``'s and each prediction entry
holds one run's ``predict --json`` row (``learn.predict``): prediction, interval or set, the fit
check's verdict.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loralens.inspection import inspect_adapter
from loralens.jsonio import json_safe
from loralens.learn.runs import METRICS, Run, headline, load_run

#: singular values kept per layer (the page plots these spectra)
SPECTRUM = 64
#: a layer whose |delta W|_F is this many times above or below the median layer's is an outlier
OUTLIER_FACTOR = 100.0
#: singular values below this fraction of a layer's largest count as zero (for "collapsed")
COLLAPSE_TOL = 1e-3


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
    layer), the reader's ``warnings``, ``base_model_guess``, ``flags`` and one ``predictions``
    entry per run, with ``seconds``. ``name`` replaces the path in the report and in messages (an upload's name).

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
    report["base_model_guess"] = guess_base_model(report)
    report["flags"] = layer_flags(report["layers"])
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
    keep = ("prediction", "label", "interval", "set", "in_distribution", "ood_score")
    entry.update({k: row[k] for k in (*keep, "threshold", "reasons") if k in row})
    entry["reasons"] = [r.replace(str(path), shown) for r in row["reasons"]]
    entry["interval_level"] = row["coverage"]
    return entry


# ---------------------------------------------------------------------------------- flags


def layer_flags(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Sanity flags from ``inspect`` rows: non-finite weights or norms (error), dead layers
    (delta W = 0; all of them: the adapter does nothing), collapsed layers (rank > 1 but one
    singular value carries it) and outlier layers (|delta W|_F 100x off the median layer)."""
    flags = []
    nonfinite = [r["name"] for r in rows if not r["finite"] or not _finite(r["fro_norm"])]
    if nonfinite:
        flags.append(_flag("nonfinite", "error", nonfinite, "NaN/inf weights or norm"))
    healthy = [r for r in rows if r["finite"] and _finite(r["fro_norm"])]
    dead = [r["name"] for r in healthy if r["fro_norm"] == 0]
    if dead:
        what = "all layers are zero: the adapter changes nothing" if len(dead) == len(rows) else ""
        flags.append(_flag("dead", "warning", dead, what or "delta W is zero"))
    collapsed = [
        r["name"]
        for r in healthy
        if r["rank"] > 1
        and len(s := r["top_svals"]) > 1
        and s[0] > 0
        and s[1] <= COLLAPSE_TOL * s[0]
    ]
    if collapsed:
        flags.append(_flag("collapsed", "warning", collapsed, "rank > 1 but numerically rank 1"))
    norms = sorted(r["fro_norm"] for r in healthy if r["fro_norm"] > 0)
    if len(norms) >= 4:
        median = norms[len(norms) // 2]
        outliers = [
            r["name"]
            for r in healthy
            if r["fro_norm"] > 0
            and not 1 / OUTLIER_FACTOR <= r["fro_norm"] / median <= OUTLIER_FACTOR
        ]
        if outliers:
            what = f"|delta W|_F over {OUTLIER_FACTOR:g}x off the median layer ({median:.3g})"
            flags.append(_flag("outlier", "warning", outliers, what))
    return flags


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _flag(kind: str, severity: str, layers: list[str], message: str) -> dict[str, Any]:
    return {
        "kind": kind,
        "severity": severity,
        "layers": layers,
        "message": f"{len(layers)} layer{'s' * (len(layers) != 1)}: {message}",
    }


# ---------------------------------------------------------------------------------- base model

_BLOCK = re.compile(r"(?:^|[._])(?:layers|h|blocks|layer)[._](\d+)[._]")
#: (family, hidden size, blocks) -> well-known models with that shape
_KNOWN = {
    ("decoder", 4096, 32): "a 7-8B decoder (Llama-2-7B, Llama-3-8B, Mistral-7B class)",
    ("decoder", 5120, 40): "a 13B decoder (Llama-2-13B class)",
    ("decoder", 8192, 80): "a 70B decoder (Llama-2/3-70B class)",
    ("decoder", 2048, 22): "TinyLlama-1.1B",
    ("decoder", 2048, 16): "Llama-3.2-1B",
    ("decoder", 3072, 28): "Llama-3.2-3B",
    ("decoder", 896, 24): "Qwen2.5-0.5B",
    ("decoder", 1536, 28): "Qwen2.5-1.5B",
    ("decoder", 3584, 28): "Qwen2.5-7B",
    ("gpt2", 768, 12): "GPT-2 (124M)",
    ("gpt2", 1024, 24): "GPT-2 medium",
    ("unet", 768, None): "Stable Diffusion 1.x",
    ("unet", 1024, None): "Stable Diffusion 2.x",
    ("unet", 2048, None): "Stable Diffusion XL",
}


def guess_base_model(report: dict[str, Any]) -> dict[str, Any]:
    """The base model: the file's own word when it has one, else a guess from layer names and
    shapes (architecture family, hidden size, number of blocks, and a known model's name)."""
    names = [r["name"] for r in report["layers"]]
    shapes = [r["shape"] for r in report["layers"]]
    family, hidden, blocks = _layout(names, shapes)
    guess = {
        "name": report.get("base_model"),
        "source": "metadata" if report.get("base_model") else None,
        "family": family,
        "hidden_size": hidden,
        "blocks": blocks,
    }
    if guess["name"] is None and family is not None:
        known = _KNOWN.get((family, hidden, None if family == "unet" else blocks))
        guess["name"], guess["source"] = known, "layout" if known else None
    return guess


def _layout(names: list[str], shapes: list[list[int]]) -> tuple[str | None, int | None, Any]:
    joined = " ".join(names)
    if any(k in joined for k in ("down_blocks", "up_blocks", "mid_block", "lora_unet")):
        # cross-attention keys/values read the text encoder's width
        cross = [s[1] for n, s in zip(names, shapes) if re.search(r"attn2[._]to_[kv]", n)]
        return "unet", max(cross) if cross else None, None
    blocks = {int(m.group(1)) for n in names if (m := _BLOCK.search(n))}
    if "c_attn" in joined:
        hidden = next((s[1] for n, s in zip(names, shapes) if "c_attn" in n), None)
        return "gpt2", hidden, max(blocks) + 1 if blocks else None
    q = [s[1] for n, s in zip(names, shapes) if re.search(r"(?:q_proj|query)$", n)]
    if blocks and q:
        return "decoder", q[0], max(blocks) + 1
    return None, None, None


__all__ = [
    "SPECTRUM",
    "ScreeningRun",
    "guess_base_model",
    "layer_flags",
    "load_screening_runs",
    "screen_adapter",
]
