"""The training loop: ``train(store, TrainConfig(model="glnet", targets=["eval_loss"]), out_dir)``.

It splits the store deterministically, trains with early stopping on the validation loss, takes
test metrics at the best epoch, restores that epoch's state and writes a run directory (see
:mod:`loralens.learn.runs.folder`) holding everything ``predict`` needs. Beside the model it fits
the linear probes of :mod:`loralens.learn.fitting.probes` on the same split, so every run says
whether the model beats them.

Small stores (below ``fitting.data.CV_BELOW`` labelled LoRAs) are cross-validated instead: every fold
trains with early stopping on its own validation rows and is tested on its own test fold; the
metrics are the mean ± std over folds, and the saved model is refit on every LoRA for the
median best epoch of the folds.

It runs unchanged in one process or under ``accelerate launch`` (DDP, mixed precision): data
loading is sharded by accelerate, evaluation outputs are gathered with ``gather_for_metrics``,
and only the main process writes.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from loralens.jsonio import json_safe
from loralens.learn.fitting.base_fit import (
    base_features,
    fit_linear_base,
    linear_base_kind,
    warm_start,
)
from loralens.learn.fitting.basis_fit import fit_basis
from loralens.learn.fitting.data import (
    SPLITS,
    ProjectedRows,
    check_finite_labels,
    encode_targets,
    make_loader,
    make_splits,
    select_rows,
)
from loralens.learn.fitting.epochs import Best, Progress, RunData, fit_epochs, outputs
from loralens.learn.fitting.probes import probe_folds
from loralens.learn.fitting.tasks import (
    CLASSIFICATION,
    Task,
    baseline_metrics,
    infer_task,
    mean_std,
)
from loralens.learn.runs.folder import check_run_dir, save_run
from loralens.learn.runs.report import headline
from loralens.learn.runs.seen import trained_on
from loralens.learn.training.calibrating import calibrate_run, hold_out_calibration
from loralens.learn.training.config import TrainConfig
from loralens.models.basis import UpdateBasis
from loralens.models.registry import build_model, check_fits
from loralens.store import LoRAStore


def train(
    store: LoRAStore | str | os.PathLike,
    config: TrainConfig,
    out_dir: str | os.PathLike | None = None,
    *,
    progress: Progress = False,
    accelerator: Any = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train ``config.model`` on ``store``; returns the metrics dict (also written to out_dir).

    ``progress``: True prints a line per epoch; a callable receives each epoch's record. A
    non-empty ``out_dir`` is refused unless ``overwrite`` (checked before any training).
    """
    from accelerate import Accelerator

    t0 = time.time()
    if out_dir is not None:
        check_run_dir(out_dir, overwrite=overwrite)
    store = store if isinstance(store, LoRAStore) else LoRAStore(store)
    acc = accelerator or Accelerator(cpu=_no_accelerator())
    hp = config.resolved()
    if config.threads:
        torch.set_num_threads(int(config.threads))

    targets = list(config.targets)
    y_all = store.labels(targets)
    kind, splits = run_splits(store, config, y_all)
    probes = {}
    if config.probes:
        # in store order, as the linear base is fitted: a cross-validated logistic fit's folds
        # follow the row order
        fit_test = [(np.union1d(s["train"], s["val"]), s["test"]) for s in splits]
        probes = probe_folds(store, kind, targets, y_all, fit_test)
    if len(splits) == 1:
        data = _data(store, targets, y_all, splits[0], kind)
        base, history, best = _run(store, config, data, hp, acc, progress)
        metrics = _summary(store, config, data, history, best, base, hp, acc, t0)
        test, used = (
            (best.test_rows, best.test_out),
            np.concatenate([v for k, v in splits[0].items() if k != "test"]),  # cal: seen
        )
    else:
        base, history, data, metrics, test = _cross_validate(
            store, config, splits, targets, y_all, kind, hp, acc, progress, t0
        )
        used = np.sort(np.concatenate([splits[0][k] for k in SPLITS]))
    metrics["probes"] = {name: _probe_summary(p, kind) for name, p in probes.items()}
    calibration, metrics["calibration"] = calibrate_run(
        base, store, data.task, y_all, splits, test, config
    )
    if out_dir is not None and acc.is_main_process:
        save_run(
            out_dir,
            model=base,
            task=data.task,
            settings={**asdict(config), "resolved": config.resolved()},
            metrics=metrics,
            history=history,
            test=(*test, store, data.y_all),
            trained_on=trained_on(store, np.sort(used)),
            calibration=calibration,
        )
    acc.wait_for_everyone()
    return json_safe(metrics)


def run_splits(
    store: LoRAStore, config: TrainConfig, y_all: np.ndarray
) -> tuple[str, list[dict[str, np.ndarray]]]:
    """The task kind and the splits ``train`` uses for ``config`` (one split with its "cal"
    rows, or the folds of a small store), from the labels ``y_all`` of ``config.targets``."""
    rows = select_rows(store, config.where)
    check_finite_labels(store, list(config.targets), y_all, rows)
    kind = config.task or infer_task(y_all[rows])
    splits = make_splits(
        store,
        rows,
        y_all,
        config.seed,
        fractions=config.fractions,
        split_column=config.split_column,
        classification=kind == CLASSIFICATION,
        folds=config.folds,
    )
    if len(splits) == 1 and config.calibration:
        splits = [hold_out_calibration(splits[0], config, y_all, kind, store)]
    return kind, splits


def _run(
    store: LoRAStore,
    config: TrainConfig,
    data: RunData,
    hp: dict[str, Any],
    acc: Any,
    progress: Progress,
) -> tuple[torch.nn.Module, list[dict[str, Any]], Best]:
    """Build, train with early stopping and restore the best epoch: (model, history, best)."""
    from accelerate.utils import set_seed

    set_seed(config.seed)
    model = _model(store, config, data)
    pad = [int(r) for r in model.spec.ranks]  # every batch padded to the model's widths
    rows = store
    if model.basis is not None:  # projected once: the epochs read the small factors
        rows = ProjectedRows(store, model, np.concatenate(list(data.split.values())), pad)
    with model.given_prepared() if rows is not store else contextlib.nullcontext():
        return _fit(rows, model, data, hp, acc, progress, pad, config.seed)


def _fit(
    rows: LoRAStore | ProjectedRows,
    model: torch.nn.Module,
    data: RunData,
    hp: dict[str, Any],
    acc: Any,
    progress: Progress,
    pad: list[int],
    seed: int,
) -> tuple[torch.nn.Module, list[dict[str, Any]], Best]:
    """The linear base's fit, the epochs and the best epoch restored, on store ``rows``."""
    if model.hparams["linear_base"] != "none":
        # features of train + val once: the base is fitted on train now, on both once the
        # epoch is chosen
        fit_rows = np.union1d(data.split["train"], data.split["val"])
        x_fit = base_features(rows, model, fit_rows)
        train_rows = data.split["train"]
        at = np.searchsorted(fit_rows, train_rows)
        fit_linear_base(
            model, data.task, data.y_enc[train_rows], {d: x[at] for d, x in x_fit.items()}
        )
    else:
        warm_start(model, data.task, data.y_enc[data.split["train"]], rows, data.split["train"])
    loaders = _loaders(rows, data, pad, int(hp["batch_size"]), seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=float(hp["lr"]), weight_decay=float(hp["weight_decay"]))
    model, opt, *prepared = acc.prepare(model, opt, *(loaders[s] for s in SPLITS))
    loaders = dict(zip(SPLITS, prepared))
    base = acc.unwrap_model(model)
    with base.caching():  # what the model derives from each LoRA, kept for the run (w2t)
        history, best = fit_epochs(model, opt, params, loaders, data, acc, hp, progress)
        base.load_state_dict(best.state)  # the run's model is the best epoch's, not the last
        if base.hparams["linear_base"] != "none":
            # the epoch is chosen; the linear base may now learn from the validation rows too
            fit_linear_base(base, data.task, data.y_enc[fit_rows], x_fit)
            trows, tout = outputs(model, loaders["test"], acc)
            best.test, best.test_rows, best.test_out = (
                data.task.metrics(tout, data.y_all[trows]),
                trows,
                tout,
            )
    return base, history, best


def _cross_validate(
    store: LoRAStore,
    config: TrainConfig,
    splits: list[dict[str, np.ndarray]],
    targets: list[str],
    y_all: np.ndarray,
    kind: str,
    hp: dict[str, Any],
    acc: Any,
    progress: Progress,
    t0: float,
) -> tuple[torch.nn.Module, list[dict[str, Any]], RunData, dict[str, Any], tuple]:
    """Train and test every fold, then refit on every row for the folds' median best epoch.

    Returns (refit model, its history, its data, metrics, (rows, raw outputs) out of fold).
    """
    folds = []
    for i, split in enumerate(splits):
        if progress is True and acc.is_main_process:
            print(f"fold {i + 1}/{len(splits)}")
        data = _data(store, targets, y_all, split, kind)
        _, history, best = _run(store, config, data, hp, acc, progress)
        base = baseline_metrics(data.task, y_all[split["train"]], y_all[split["test"]])
        folds.append((data, best, headline(base, kind)))
    refit_epochs = int(np.median([b.epoch for _, b, _ in folds]))
    every = np.sort(np.concatenate([splits[0][k] for k in SPLITS]))
    data = _data(store, targets, y_all, {"train": every, "val": every, "test": every}, kind)
    # 0 epochs (the linear base alone won the folds): the refit trains nothing
    refit_hp = {**hp, "epochs": refit_epochs, "patience": refit_epochs + 1}
    if progress is True and acc.is_main_process:
        print(f"refit on all {len(every)} LoRAs for {refit_epochs} epochs")
    model, history, _ = _run(store, config, data, refit_hp, acc, progress)
    rows = np.concatenate([b.test_rows for _, b, _ in folds])
    # out-of-fold outputs, each decoded by its fold's scaling and re-encoded by the refit's
    raw = np.concatenate([data.task.raw(d.task.decode(b.test_out)) for d, b, _ in folds])
    tests = [headline(b.test, kind) for _, b, _ in folds]
    test, test_std = mean_std(tests)
    val, val_std = mean_std([headline(b.val, kind) for _, b, _ in folds])
    base_test, base_std = mean_std([base for _, _, base in folds])
    pooled = data.task.metrics(raw, y_all[rows])
    metrics = {
        "task": kind,
        "model": config.model,
        "targets": targets,
        "test": test,
        "test_std": test_std,
        "val": val,
        "val_std": val_std,
        "best_epoch": refit_epochs,
        "epochs_run": epochs_trained(history),
        "test_detail": pooled,
        "val_detail": {},
        "baseline": {"test": base_test, "test_std": base_std},
        "cv": {
            "folds": len(splits),
            "test_per_fold": tests,
            "best_epochs": [b.epoch for _, b, _ in folds],
            "test_pooled": headline(pooled, kind),
            "refit": f"all {len(every)} LoRAs, {refit_epochs} epochs (median best epoch)",
        },
        "n": {"train": len(every), "val": 0, "test": len(rows)},
        **_run_facts(store, config, hp, model, history, acc, t0, data.split["train"]),
    }
    return model, history, data, metrics, (rows, raw)


def _probe_summary(probe: dict[str, Any], kind: str) -> dict[str, Any]:
    """A probe's test metrics: the mean over folds (the one split), their std, or why skipped."""
    if "skipped" in probe:
        return {"skipped": probe["skipped"]}
    mean, std = mean_std([headline(m, kind) for m in probe["folds"]])
    return {"test": mean, "test_std": std}


# ---------------------------------------------------------------------------------- steps


def _data(
    store: LoRAStore,
    targets: list[str],
    y_all: np.ndarray,
    split: dict[str, np.ndarray],
    kind: str,
) -> RunData:
    """The labels of one split, with the task's scaling fitted on the train rows only and its
    clipping range on the train and val rows (the final linear base learns from both)."""
    seen = y_all[np.concatenate([split["train"], split["val"]])]
    task = Task.fit(targets, y_all[split["train"]], kind=kind, y_seen=seen)
    y_enc = encode_targets(store, task, y_all, np.concatenate(list(split.values())))
    return RunData(targets, y_all, split, task, y_enc)


def _model(store: LoRAStore, config: TrainConfig, data: RunData) -> torch.nn.Module:
    """The model, built for the widest ranks among the training LoRAs.

    Every batch is padded to them (wider LoRAs at evaluation: invariant models take any rank,
    mlp truncates); data-chosen parts (templates, widths) come from up to 256 training LoRAs.
    """
    rows = data.split["train"]
    widths = store.ranks[rows].max(axis=0)
    like = store.batch(rows[: min(len(rows), 256)], pad_ranks=widths)
    basis = None
    if config.basis == "auto":  # unsupervised: the validation LoRAs' directions count too
        basis = fit_basis(store, np.union1d(rows, data.split["val"]), config.seed)
    kind, _ = linear_base_kind(store, config.linear_base, rows, basis)
    hparams = {"linear_base": kind, **config.hparams}
    flat = None if basis is None else UpdateBasis.flat(basis.sizes)
    check_fits(config.model, like.spec, data.task.out_dim, {**hparams, "basis": flat})
    torch.manual_seed(config.seed)
    return build_model(config.model, like=like, out_dim=data.task.out_dim, basis=basis, **hparams)


def _loaders(
    store: LoRAStore | ProjectedRows, data: RunData, pad: list[int], batch_size: int, seed: int
) -> dict[str, torch.utils.data.DataLoader]:
    """Shuffled (seeded) training batches; validation and test in order, batches of >= 64."""
    eval_size = max(batch_size, 64)
    return {
        split: make_loader(
            store,
            data.y_enc,
            data.split[split],
            batch_size if split == "train" else eval_size,
            pad,
            shuffle=split == "train",
            seed=seed if split == "train" else 0,
        )
        for split in SPLITS
    }


def _summary(
    store: LoRAStore,
    config: TrainConfig,
    data: RunData,
    history: list[dict[str, Any]],
    best: Best,
    model: torch.nn.Module,
    hp: dict[str, Any],
    acc: Any,
    t0: float,
) -> dict[str, Any]:
    """The metrics dict of a run: test/val at the best epoch beside the no-weights baseline."""
    kind, y_all, split = data.task.kind, data.y_all, data.split
    y_tr = y_all[split["train"]]
    return {
        "task": kind,
        "model": config.model,
        "targets": data.targets,
        "test": headline(best.test, kind),
        "val": headline(best.val, kind),
        "best_epoch": best.epoch,
        "epochs_run": epochs_trained(history),
        "test_detail": best.test,
        "val_detail": best.val,
        "baseline": {
            "test": headline(baseline_metrics(data.task, y_tr, y_all[split["test"]]), kind),
            "val": headline(baseline_metrics(data.task, y_tr, y_all[split["val"]]), kind),
        },
        "n": {k: len(v) for k, v in split.items()},
        **_run_facts(store, config, hp, model, history, acc, t0, data.split["train"]),
    }


def epochs_trained(history: list[dict[str, Any]]) -> int:
    """Epochs the network trained (epoch 0, the linear base alone, is not one)."""
    return sum(h["epoch"] > 0 for h in history)


def _median_speed(history: list[dict[str, Any]]) -> float | None:
    """Median LoRAs per second over the trained epochs (None: no epoch trained)."""
    speeds = [h["loras_per_s"] for h in history if h["epoch"] > 0]
    return float(np.median(speeds)) if speeds else None


def _no_accelerator() -> bool:
    """True on CPU-only machines: then accelerate runs multi-process CPU (gloo) under a launcher
    (it only looks for WORLD_SIZE when told the run is on CPU)."""
    mps = getattr(torch.backends, "mps", None)
    return not (torch.cuda.is_available() or (mps is not None and mps.is_available()))


def _run_facts(
    store: LoRAStore,
    config: TrainConfig,
    hp: dict[str, Any],
    model: torch.nn.Module,
    history: list[dict[str, Any]],
    acc: Any,
    t0: float,
    train_rows: np.ndarray,
) -> dict[str, Any]:
    """What every run's metrics record besides its scores: seed, settings, which linear base
    and why, size, speed, store."""
    kind, why = linear_base_kind(store, config.linear_base, train_rows, model.basis)
    return {
        "seed": config.seed,
        "hyperparameters": hp,
        "model_hparams": dict(model.hparams),
        "linear_base": {"kind": kind, "why": why},
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "seconds": time.time() - t0,
        "train_loras_per_s": _median_speed(history),
        "num_processes": acc.num_processes,
        "store": str(store.path),
    }


__all__ = ["TrainConfig", "run_splits", "train"]
