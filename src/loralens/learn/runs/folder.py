"""Run directories: writing one after training, loading it back as a :class:`Run`, and using it
(``evaluate`` on a store, ``predict`` on adapter files).

A run directory holds:

    model.safetensors   the model's state (weights and every buffer chosen from data)
    config.json         model name/hparams/spec, task (targets, scaling), training config
    metrics.json        {"task", "test", "val", "best_epoch", "baseline", ...}
    history.json        per-epoch losses
    predictions.csv     test-set predictions vs truth (out-of-fold under cross-validation)
    trained_on.json     ids, sources and content hashes of the LoRAs trained on (``learn.seen``)
    pred_vs_true.png, learning_curves.png

Every JSON written or returned here is strict JSON: NaN/inf become null (``json_safe``). A model
whose outputs are not finite is refused, not reported: ``predict``/``evaluate`` (and ``train``)
raise :class:`NonFiniteOutputError` naming the adapters or the count of LoRAs concerned.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from loralens.errors import OutputExistsError
from loralens.jsonio import json_safe, write_json
from loralens.learn.calibrate import outputs, store_outputs, unit_dim
from loralens.learn.checkpoint import (
    CHECKPOINT,
    CONFIG,
    METRICS,
    RunNotFoundError,
    load_checkpoint,
    read_config,
)
from loralens.learn.data import check_finite_labels, select_rows
from loralens.learn.fitcheck import FitInputs, check_layout
from loralens.learn.predict import UNCALIBRATED
from loralens.learn.seen import TRAINED_ON, read_trained_on, seen_mask
from loralens.learn.tasks import CLASSIFICATION, FPR_LEVELS, Task, tpr_key
from loralens.learn.trust import Calibration, read_calibration
from loralens.lora import LayerSpec, LoRA, LoRABatch, collate, spec_of
from loralens.store import LoRAStore, StoreError

if TYPE_CHECKING:
    from loralens.learn.config import TrainConfig
    from loralens.learn.span import Span


class NonFiniteOutputError(ValueError):
    """A model whose outputs are NaN/inf for some inputs (diverged, or inputs far off scale)."""


def headline(metrics: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """The metrics a run reports for a task ``kind`` (the per-target detail left out)."""
    keys = (
        ("accuracy", "auroc", *map(tpr_key, FPR_LEVELS), "loss")
        if kind == CLASSIFICATION
        else ("r2", "kendall_tau", "spearman", "mse", "mse_standardized", "loss")
    )
    return {k: json_safe(metrics[k]) for k in keys if k in metrics}


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
    config: TrainConfig,
    metrics: Mapping[str, Any],
    history: Sequence[Mapping[str, Any]],
    test: tuple[np.ndarray, np.ndarray, LoRAStore, np.ndarray],
    trained_on: Mapping[str, Any],
    calibration: Calibration | None = None,
) -> None:
    """Write a run directory; ``test`` is (store rows, raw outputs, store, all labels),
    ``trained_on`` the record of the LoRAs trained on (``learn.seen.trained_on``)."""
    from safetensors.torch import save_file

    from loralens.learn.plots import plot_run

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
        "train": {**asdict(config), "resolved": config.resolved()},
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
    if config.plots:
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
        """Rows of :func:`loralens.learn.predict.predict_adapters` (prediction, interval or
        probability and set, fit verdict, or the error) for one adapter or several."""
        from loralens.learn.predict import predict_adapters

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
    """Load a run directory written by :func:`loralens.learn.loop.train`.

    The directory is untrusted input: ``config.json`` is checked and the checkpoint's shapes are
    compared with it before anything is allocated (:mod:`loralens.learn.checkpoint`); any
    problem is a :class:`~loralens.learn.checkpoint.RunError` naming the file.
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
    return Run(path=path, model=model, task=cfg.task, config=cfg.raw, calibration=calibration)


# ---------------------------------------------------------------------------------- using


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

    LoRAs the run trained or early-stopped on (``learn.seen``: same content, or same id and
    source) are left out of the metrics and counted in ``warnings``; when every LoRA was seen,
    the metrics are on all of them and the warning says they are training-set numbers.
    ``calibration`` says how the run's intervals (at ``coverage``, default the run's) or sets
    hold on these LoRAs and what share of them the fit check flags.
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
            "calibrated": True,
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
            "seconds": time.time() - t0,
        }
    )
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        write_json(Path(out_dir) / "evaluate.json", result)
    return result


def predict(
    run: Run,
    adapters: Sequence[LoRA | str | os.PathLike],
    *,
    batch_size: int = 64,
    coverage: float | None = None,
) -> list[dict[str, Any]]:
    """One strict-JSON row per adapter (files, adapter folders, folders of adapters): see
    :mod:`loralens.learn.predict`. A row that failed holds ``error``; the others are predicted."""
    return run.predict(list(adapters), coverage=coverage, batch_size=batch_size)


__all__ = [
    "NonFiniteOutputError",
    "Run",
    "evaluate",
    "headline",
    "json_safe",
    "load_run",
    "predict",
    "save_run",
    "write_json",
]
