"""Run directories: writing one after training and loading it back as a :class:`Run`, the
object that predicts (``learn.runs.prediction``) and is evaluated (``learn.runs.evaluation``).

A run directory holds:

    model.safetensors   the model's state (weights and every buffer chosen from data)
    config.json         model name/hparams/spec, task (targets, scaling), training config
    metrics.json        {"task", "test", "val", "best_epoch", "baseline", ...}
    history.json        per-epoch losses
    predictions.csv     test-set predictions vs truth (out-of-fold under cross-validation)
    trained_on.json     ids, sources and content hashes of the LoRAs trained on (``runs.seen``)
    calibration.json    + .safetensors: intervals and the fit check (``learn.trust``)
    pred_vs_true.png, learning_curves.png

Every JSON written here is strict JSON: NaN/inf become null (``json_safe``). A model whose
outputs are not finite is refused, not reported: :class:`NonFiniteOutputError` names the
adapters or the count of LoRAs concerned.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from loralens.errors import NonFiniteOutputError, OutputExistsError, RunNotFoundError
from loralens.jsonio import write_json
from loralens.learn.fitting.tasks import Task
from loralens.learn.runs.checkpoint import (
    CHECKPOINT,
    CONFIG,
    METRICS,
    load_checkpoint,
    read_config,
)
from loralens.learn.runs.seen import TRAINED_ON, read_trained_on
from loralens.learn.runs.standing import read_metrics, standing
from loralens.learn.trust.calibrate import base_only, outputs, store_outputs, unit_dim
from loralens.learn.trust.calibration import Calibration, read_calibration
from loralens.learn.trust.conformal import coverage_problems
from loralens.learn.trust.fitcheck import FitInputs, check_layout
from loralens.lora import LayerSpec, LoRA, LoRABatch, collate, spec_of

if TYPE_CHECKING:
    from loralens.learn.trust.span import Span
    from loralens.store import LoRAStore


# ---------------------------------------------------------------------------------- saving


def check_run_dir(out_dir: str | os.PathLike, *, overwrite: bool) -> None:
    """Refuse to write a run into a folder that already holds files, unless ``overwrite``."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a folder")
    if not overwrite and out.is_dir() and any(out.iterdir()):
        what = "a run" if (out / CONFIG).exists() else "files"
        raise OutputExistsError(f"{out} already holds {what} (use --overwrite to replace it)")


def save_run(
    out_dir: str | os.PathLike,
    *,
    model: torch.nn.Module,
    task: Task,
    settings: Mapping[str, Any],
    metrics: Mapping[str, Any],
    history: Sequence[Mapping[str, Any]],
    test: tuple[np.ndarray, np.ndarray, LoRAStore, np.ndarray],
    trained_on: Mapping[str, Any],
    calibration: Calibration | None = None,
) -> None:
    """Write a run directory; ``test`` is (store rows, raw outputs, store, all labels),
    ``trained_on`` the record of the LoRAs trained on (``learn.seen.trained_on``)."""
    from safetensors.torch import save_file

    from loralens.learn.runs.plots import plot_run

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, out / CHECKPOINT, metadata={"format": "loralens-run"})
    cfg = {
        "format": "loralens-run",
        "version": 1,
        "model": {
            "name": model.name,
            "hparams": dict(model.hparams),
            "spec": model.spec.to_dict(),
            "out_dim": int(model.out_dim),
        },
        "task": task.to_dict(),
        "train": dict(settings),
    }
    write_json(out / CONFIG, cfg)
    write_json(out / METRICS, metrics)
    write_json(out / "history.json", history)
    write_json(out / TRAINED_ON, trained_on)
    if calibration is not None:
        calibration.save(out)
    rows, raw, store, y_all = test
    pred = task.decode(raw)
    import pandas as pd

    frame = {"id": [store.ids[r] for r in rows]}
    for j, name in enumerate(task.targets):
        frame[f"{name}_true"] = y_all[rows, j]
        frame[f"{name}_pred"] = pred[:, j]
    pd.DataFrame(frame).to_csv(out / "predictions.csv", index=False)
    if settings.get("plots", True):
        plot_run(out, task, history, y_all[rows], pred, metrics)


# ---------------------------------------------------------------------------------- loading


@dataclass
class Run:
    """A trained model loaded from a run directory."""

    path: Path
    model: torch.nn.Module
    task: Task
    config: dict[str, Any]
    #: intervals / sets and the fit check (None: a run saved before calibration existed)
    calibration: Calibration | None = None
    #: what the run says about itself beside each prediction (``runs.standing``)
    standing: dict[str, Any] = field(default_factory=dict)
    #: content hashes of the LoRAs it trained on (``runs.seen``; None: a run without the record)
    trained_hashes: frozenset[str] | None = None

    @property
    def spec(self) -> LayerSpec:
        return self.model.spec

    def check(self, lora_spec: LayerSpec, what: str = "adapter") -> None:
        """The fit check's first layer: refuse (LayoutError) a layout the model does not take."""
        where = (
            f"the model in {self.path} ({self.config['model']['name']}, "
            f"{len(self.spec.names)} layers)"
        )
        check_layout(self.spec, lora_spec, what, where)

    def predict(
        self,
        adapters: LoRA | str | os.PathLike | Sequence[LoRA | str | os.PathLike],
        *,
        coverage: float | None = None,
        batch_size: int = 64,
    ) -> list[dict[str, Any]]:
        """Rows of :func:`loralens.learn.runs.prediction.predict_adapters` (prediction,
        interval or probability and set, fit verdict, or the error) for one adapter or several."""
        from loralens.learn.runs.prediction import predict_adapters

        if isinstance(adapters, (LoRA, str, os.PathLike)):
            adapters = [adapters]
        return predict_adapters(self, adapters, coverage=coverage, batch_size=batch_size)

    def outputs(self, batches: Iterable[LoRABatch]) -> tuple[np.ndarray, FitInputs]:
        """Raw outputs and what the fit check reads over ``batches`` (padded to the model's
        ranks), the span score taken against this run's bases."""
        return outputs(self.model, batches, self._span())

    def store_outputs(
        self, store: LoRAStore, rows: np.ndarray, batch_size: int = 256
    ) -> tuple[np.ndarray, FitInputs]:
        """:meth:`outputs` over store ``rows``, in row order."""
        return store_outputs(self.model, store, rows, batch_size, self._span())

    def _span(self) -> Span | None:
        return None if self.calibration is None else self.calibration.fit.span

    @torch.no_grad()
    def raw(self, batch: LoRABatch) -> np.ndarray:
        self.model.eval()
        return self.model(batch).float().cpu().numpy()

    def predict_loras(self, loras: Sequence[LoRA], batch_size: int = 64) -> np.ndarray:
        """Original-scale predictions (probabilities for classification), (N, out_dim)."""
        names = [str(lora.metadata.get("source", f"adapter #{k}")) for k, lora in enumerate(loras)]
        outs = []
        for name, lora in zip(names, loras):
            self.check(spec_of(lora), name)
        for s in range(0, len(loras), batch_size):
            chunk = list(loras[s : s + batch_size])
            batch = collate(chunk)
            batch = batch.pad_to(np.maximum(batch.spec.ranks, self.spec.ranks))
            outs.append(self.raw(batch))
        if not outs:
            return np.zeros((0, self.task.out_dim))
        pred = self.task.decode(np.concatenate(outs))
        bad = [n for n, ok in zip(names, np.isfinite(pred).all(axis=1)) if not ok]
        if bad:
            raise NonFiniteOutputError(
                f"the model in {self.path} gives non-finite (NaN/inf) predictions for "
                f"{len(bad)} of {len(names)} adapter(s): {', '.join(bad[:5])}"
                + (", ..." if len(bad) > 5 else "")
            )
        return pred


def load_run(run_dir: str | os.PathLike, *, device: str | torch.device = "cpu") -> Run:
    """Load a run directory written by :func:`loralens.learn.train`.

    The directory is untrusted input: ``config.json`` is checked and the checkpoint's shapes are
    compared with it before anything is allocated (:mod:`loralens.learn.runs.checkpoint`); any
    problem is a :class:`~loralens.errors.RunError` naming the file.
    """
    from loralens.models.registry import rebuild_model

    path = Path(run_dir)
    if not path.is_dir():
        raise RunNotFoundError(f"{path} is not a loralens run (no such directory)")
    cfg = read_config(path / CONFIG)
    state = load_checkpoint(path / CHECKPOINT, cfg)
    model = rebuild_model(cfg.name, cfg.spec, cfg.out_dim, cfg.hparams)
    model.load_state_dict(state)
    model.to(device).eval()
    calibration = read_calibration(path, cfg.task, cfg.spec, unit_dim(model))
    metrics = read_metrics(path)
    if calibration is not None and calibration.problems is None:
        calibration.problems = judged(metrics, calibration)
    facts = standing(metrics, calibration, base_only(model))
    record = read_trained_on(path)
    hashes = None if record is None else frozenset(record["hashes"])
    return Run(path, model, cfg.task, cfg.raw, calibration, facts, hashes)


def judged(metrics: dict[str, Any] | None, calibration: Calibration) -> list[str] | None:
    """The problems of a calibration saved before runs checked their own, found in the test
    report of the run's ``metrics``; None (not calibrated) without a readable one."""
    report = (metrics or {}).get("calibration", {})
    try:
        return coverage_problems(report["test"], calibration.targets)
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


__all__ = ["Run", "check_run_dir", "load_run", "save_run"]
