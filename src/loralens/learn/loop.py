"""The training loop: ``train(store, TrainConfig(model="glnet", targets=["eval_loss"]), out_dir)``.

It splits the store deterministically, trains with early stopping on the validation loss, takes
test metrics at the best epoch, restores that epoch's state and writes a run directory (see
:mod:`loralens.learn.runs`) holding everything ``predict`` needs. Beside the model it fits the
linear probes of :mod:`loralens.learn.probes` on the same split, so every run says whether the
model beats them.

Small stores (below ``data.CV_BELOW`` labelled LoRAs) are cross-validated instead: every fold
trains with early stopping on its own validation rows and is tested on its own test fold; the
metrics are the mean ± std over folds, and the saved model is refit on every LoRA for the
median best epoch of the folds.

It runs unchanged in one process or under ``accelerate launch`` (DDP, mixed precision): data
loading is sharded by accelerate, evaluation outputs are gathered with ``gather_for_metrics``,
and only the main process writes.
"""

from __future__ import annotations

import copy
import math
import numbers
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from loralens.jsonio import json_safe
from loralens.learn.base_fit import base_features, fit_linear_base, linear_base_kind
from loralens.learn.calibrate import calibrate_run, check_trust_settings, hold_out_calibration
from loralens.learn.data import (
    SPLITS,
    check_finite_labels,
    encode_targets,
    make_loader,
    make_splits,
    select_rows,
)
from loralens.learn.probes import probe_folds
from loralens.learn.rowfilter import compile_filter
from loralens.learn.runs import NonFiniteOutputError, check_run_dir, headline, save_run
from loralens.learn.seen import trained_on
from loralens.learn.tasks import (
    CLASSIFICATION,
    REGRESSION,
    Task,
    baseline_metrics,
    infer_task,
    mean_std,
)
from loralens.models.linear_base import KINDS as LINEAR_BASES
from loralens.models.registry import (
    TRAINING_SCHEMA,
    build_model,
    check_fits,
    check_hparams,
    check_training,
    training_defaults,
)
from loralens.store import LoRAStore

Progress = bool | Callable[[dict[str, Any]], None]


@dataclass
class TrainConfig:
    """What to train. ``None`` means the model's default (``models.registry.training_defaults``)."""

    model: str
    targets: list[str]
    seed: int = 0
    epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    weight_decay: float | None = None
    patience: int | None = None
    grad_clip: float | None = None
    hparams: dict[str, Any] = field(default_factory=dict)
    #: filter selecting the rows used at all, e.g. "rank == 4" (see learn.rowfilter)
    where: str | None = None
    #: split fractions when the store has no ``split`` column
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    #: name of a column with train/val/test values; "auto" uses ``split`` when present
    split_column: str | None = "auto"
    #: force a task kind ("regression"/"classification"); default: inferred from labels
    task: str | None = None
    plots: bool = True
    #: torch CPU threads (None: torch's default). 1 is fastest for small models on a busy CPU.
    threads: int | None = None
    #: cross-validation folds: None chooses (data.CV_FOLDS below data.CV_BELOW labelled LoRAs,
    #: else one split); 1 always one train/val/test split; k >= 2 always k folds
    folds: int | None = None
    #: also fit the linear probes (learn.probes) on the same split(s)
    probes: bool = True
    #: the model's linear base (models.linear_base), fitted on the training rows before the
    #: network learns what it misses: "auto" = "dense" where the training LoRAs' ΔW fit in
    #: probes.DENSE_MAX_BYTES, else "spectral"; "none" = the network alone
    linear_base: str = "auto"
    #: calibration (learn.trust): share of the labelled LoRAs held out of the one split's
    #: training rows to calibrate on (cross-validated runs: out of fold); 0: no calibration
    calibration: float = 0.1
    #: coverage of intervals / prediction sets; "normalized" or "plain" intervals
    coverage: float = 0.9
    interval: str = "normalized"
    #: share of in-distribution calibration LoRAs the fit check flags
    ood_share: float = 0.05

    def __post_init__(self) -> None:
        """Refuse a setting of the wrong type or out of range now, before any store is read:
        an unknown model or hyperparameter, a width of 1e7, a filter outside the language."""
        check_hparams(self.model, self.hparams)
        check_training({k: getattr(self, k) for k in TRAINING_SCHEMA})
        targets = self.targets
        if isinstance(targets, str) or not targets or not all(isinstance(t, str) for t in targets):
            raise ValueError(f"targets must be a non-empty list of column names, got {targets!r}")
        if self.task not in (None, REGRESSION, CLASSIFICATION):
            raise ValueError(
                f"task must be {REGRESSION!r} or {CLASSIFICATION!r}, got {self.task!r}"
            )
        f = self.fractions
        if not (
            len(f) == 3
            and all(isinstance(x, (int, float)) and 0 <= x <= 1 for x in f)
            and sum(f) <= 1 + 1e-9
        ):
            raise ValueError(
                f"fractions must be three numbers in [0, 1] summing to at most 1, got {f!r}"
            )
        if self.folds is not None and (
            not isinstance(self.folds, numbers.Integral)
            or isinstance(self.folds, bool)
            or not 1 <= self.folds <= 100
        ):
            raise ValueError(f"folds must be an integer in [1, 100], got {self.folds!r}")
        for key in ("seed", "threads"):
            v = getattr(self, key)
            if v is not None and (
                not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < (key == "threads")
            ):
                raise ValueError(f"{key} must be a non-negative integer (threads: >= 1), got {v!r}")
        if self.where:
            compile_filter(self.where)
        if self.linear_base not in ("auto", *LINEAR_BASES):
            raise ValueError(
                f"linear_base must be one of {['auto', *LINEAR_BASES]}, got {self.linear_base!r}"
            )
        check_trust_settings(self)

    def resolved(self) -> dict[str, Any]:
        """The training settings used: the model's defaults, overridden where set here."""
        d = training_defaults(self.model)
        for k in d:
            v = getattr(self, k)
            if v is not None:
                d[k] = v
        return d


@dataclass
class _Data:
    """The labels of one run and the rows of its splits."""

    targets: list[str]
    y_all: np.ndarray  # (N, T) original-scale labels of every store row (NaN where missing)
    split: dict[str, np.ndarray]  # store rows of train/val/test
    task: Task
    y_enc: np.ndarray  # (N, T) float32 targets as the model is trained on them


@dataclass
class _Best:
    """The epoch with the lowest validation loss so far, and what was measured there."""

    epoch: int = 0
    val_loss: float = math.inf
    val: dict[str, Any] = field(default_factory=dict)
    test: dict[str, Any] = field(default_factory=dict)
    test_rows: np.ndarray | None = None
    test_out: np.ndarray | None = None
    state: dict[str, torch.Tensor] | None = None


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
    rows = select_rows(store, config.where)
    check_finite_labels(store, targets, y_all, rows)
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
    probes = {}
    if config.probes:
        fit_test = [(np.concatenate([s["train"], s["val"]]), s["test"]) for s in splits]
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
            config=config,
            metrics=metrics,
            history=history,
            test=(*test, store, data.y_all),
            trained_on=trained_on(store, np.sort(used)),
            calibration=calibration,
        )
    acc.wait_for_everyone()
    return json_safe(metrics)


def _run(
    store: LoRAStore,
    config: TrainConfig,
    data: _Data,
    hp: dict[str, Any],
    acc: Any,
    progress: Progress,
) -> tuple[torch.nn.Module, list[dict[str, Any]], _Best]:
    """Build, train with early stopping and restore the best epoch: (model, history, best)."""
    from accelerate.utils import set_seed

    set_seed(config.seed)
    model = _model(store, config, data)
    pad = [int(r) for r in model.spec.ranks]  # every batch padded to the model's widths
    if model.hparams["linear_base"] != "none":
        # features of train + val once: the base is fitted on train now, on both once the
        # epoch is chosen
        fit_rows = np.union1d(data.split["train"], data.split["val"])
        x_fit = base_features(store, model, fit_rows)
        train_rows = data.split["train"]
        fit_linear_base(
            model, data.task, data.y_enc[train_rows], x_fit[np.searchsorted(fit_rows, train_rows)]
        )
    loaders = _loaders(store, data, pad, int(hp["batch_size"]), config.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=float(hp["lr"]), weight_decay=float(hp["weight_decay"]))
    model, opt, *prepared = acc.prepare(model, opt, *(loaders[s] for s in SPLITS))
    loaders = dict(zip(SPLITS, prepared))
    base = acc.unwrap_model(model)
    with base.caching():  # what the model derives from each LoRA, kept for the run (w2t)
        history, best = _fit(model, opt, params, loaders, data, acc, hp, progress)
        base.load_state_dict(best.state)  # the run's model is the best epoch's, not the last
        if base.hparams["linear_base"] != "none":
            # the epoch is chosen; the linear base may now learn from the validation rows too
            fit_linear_base(base, data.task, data.y_enc[fit_rows], x_fit)
            trows, tout = _outputs(model, loaders["test"], acc)
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
) -> tuple[torch.nn.Module, list[dict[str, Any]], _Data, dict[str, Any], tuple]:
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
        "epochs_run": len(history),
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
        **_run_facts(store, config, hp, model, history, acc, t0),
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
) -> _Data:
    """The labels of one split, with the task (its scaling) fitted on the train rows only."""
    task = Task.fit(targets, y_all[split["train"]], kind=kind)
    y_enc = encode_targets(store, task, y_all, np.concatenate(list(split.values())))
    return _Data(targets, y_all, split, task, y_enc)


def _model(store: LoRAStore, config: TrainConfig, data: _Data) -> torch.nn.Module:
    """The model, built for the widest ranks among the training LoRAs.

    Every batch is padded to them (wider LoRAs at evaluation: invariant models take any rank,
    mlp truncates); data-chosen parts (templates, widths) come from up to 256 training LoRAs.
    """
    rows = data.split["train"]
    widths = store.ranks[rows].max(axis=0)
    like = store.batch(rows[: min(len(rows), 256)], pad_ranks=widths)
    hparams = {"linear_base": linear_base_kind(store, config.linear_base, rows), **config.hparams}
    check_fits(config.model, like.spec, data.task.out_dim, hparams)
    torch.manual_seed(config.seed)
    return build_model(config.model, like=like, out_dim=data.task.out_dim, **hparams)


def _loaders(
    store: LoRAStore, data: _Data, pad: list[int], batch_size: int, seed: int
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


def _fit(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    loaders: dict[str, Any],
    data: _Data,
    acc: Any,
    hp: dict[str, Any],
    progress: Progress,
) -> tuple[list[dict[str, Any]], _Best]:
    """Epochs until ``hp["epochs"]`` or ``hp["patience"]`` epochs without a better validation
    loss; test metrics and a copy of the state are taken at every new best epoch."""
    history: list[dict[str, Any]] = []
    best = _Best()
    if acc.unwrap_model(model).hparams["linear_base"] != "none":
        # epoch 0 is the linear base alone (the gate shut): a candidate like any epoch
        gate = acc.unwrap_model(model).gate
        opened = float(gate)
        with torch.no_grad():
            gate.fill_(0.0)
        best, _ = _measure(model, loaders, data, acc, best, 0)
        with torch.no_grad():
            gate.fill_(opened)
    for epoch in range(1, int(hp["epochs"]) + 1):
        te = time.time()
        loss_sum, count = _train_epoch(model, opt, params, loaders["train"], data.task, acc, hp)
        train_time = time.time() - te
        best, val_loss = _measure(model, loaders, data, acc, best, epoch)
        improved = best.epoch == epoch
        rec = {
            "epoch": epoch,
            "train_loss": loss_sum / max(count, 1),
            "val_loss": val_loss,
            "seconds": train_time,
            "loras_per_s": count * acc.num_processes / max(train_time, 1e-9),
            "best": improved,
        }
        history.append(rec)
        _report(progress, rec, acc)
        if epoch - best.epoch >= int(hp["patience"]):
            break
    _check_finite(best, len(history))
    return history, best


def _measure(
    model: torch.nn.Module, loaders: dict[str, Any], data: _Data, acc: Any, best: _Best, epoch: int
) -> tuple[_Best, float]:
    """Validate the model after ``epoch``: (the best epoch so far, this epoch's validation loss);
    test metrics and a copy of the state are taken when this epoch is the new best."""
    vrows, vout = _outputs(model, loaders["val"], acc)
    val = data.task.metrics(vout, data.y_all[vrows])
    if not (val["loss"] < best.val_loss - 1e-6 or best.state is None):
        return best, val["loss"]
    trows, tout = _outputs(model, loaders["test"], acc)
    return _Best(
        epoch=epoch,
        val_loss=val["loss"] if math.isfinite(val["loss"]) else math.inf,
        val=val,
        test=data.task.metrics(tout, data.y_all[trows]),
        test_rows=trows,
        test_out=tout,
        state=copy.deepcopy(acc.unwrap_model(model).state_dict()),
    ), val["loss"]


def _check_finite(best: _Best, epochs: int) -> None:
    """Refuse a model that diverged: no finite validation loss in any epoch, or non-finite
    outputs on test LoRAs at the best one (its metrics would be NaN, its predictions too)."""
    if not math.isfinite(best.val_loss):
        raise NonFiniteOutputError(
            f"training diverged: the validation loss was not finite (NaN/inf) in any of {epochs} "
            "epoch(s), so there is no model to save; lower --lr or check the labels' scale"
        )
    bad = int((~np.isfinite(best.test_out)).any(axis=1).sum())
    if bad:
        raise NonFiniteOutputError(
            f"the model of the best epoch ({best.epoch}) gives non-finite outputs for {bad} of "
            f"{len(best.test_out)} test LoRAs; their metrics would be NaN"
        )


def _train_epoch(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    loader: Any,
    task: Task,
    acc: Any,
    hp: dict[str, Any],
) -> tuple[float, int]:
    """One pass over the training batches: (sum of per-LoRA losses, LoRAs seen)."""
    model.train()
    total, count = 0.0, 0
    for _, batch, y in loader:
        loss = task.loss(model(batch), y)
        opt.zero_grad(set_to_none=True)
        acc.backward(loss)
        if hp["grad_clip"]:
            clip = params if acc.num_processes == 1 else model.parameters()
            acc.clip_grad_norm_(clip, float(hp["grad_clip"]))
        opt.step()
        total += float(loss.detach()) * len(y)
        count += len(y)
    return total, count


@torch.no_grad()
def _outputs(model: torch.nn.Module, loader: Any, acc: Any) -> tuple[np.ndarray, np.ndarray]:
    """(store rows, raw outputs) over a loader, gathered over processes under accelerate."""
    model.eval()
    rows, outs = [], []
    for idx, batch, _ in loader:
        out = model(batch).float()
        idx, out = acc.gather_for_metrics((idx.to(out.device), out))
        rows.append(idx.cpu().numpy())
        outs.append(out.cpu().numpy())
    return np.concatenate(rows), np.concatenate(outs)


def _report(progress: Progress, rec: dict[str, Any], acc: Any) -> None:
    if callable(progress):
        progress(rec)
    elif progress and acc.is_main_process:
        print(
            f"epoch {rec['epoch']:3d}  train {rec['train_loss']:.4f}  val {rec['val_loss']:.4f}"
            + ("  *" if rec["best"] else "")
        )


def _summary(
    store: LoRAStore,
    config: TrainConfig,
    data: _Data,
    history: list[dict[str, Any]],
    best: _Best,
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
        "epochs_run": len(history),
        "test_detail": best.test,
        "val_detail": best.val,
        "baseline": {
            "test": headline(baseline_metrics(data.task, y_tr, y_all[split["test"]]), kind),
            "val": headline(baseline_metrics(data.task, y_tr, y_all[split["val"]]), kind),
        },
        "n": {k: len(v) for k, v in split.items()},
        **_run_facts(store, config, hp, model, history, acc, t0),
    }


def _no_accelerator() -> bool:
    """True on CPU-only machines: then accelerate runs multi-process CPU (gloo) under a launcher
    (it only looks for WORLD_SIZE when told the run is on CPU)."""
    mps = getattr(torch.backends, "mps", None)
    return not (torch.cuda.is_available() or (mps is not None and mps.is_available()))


__all__ = ["TrainConfig", "train"]


def _run_facts(
    store: LoRAStore,
    config: TrainConfig,
    hp: dict[str, Any],
    model: torch.nn.Module,
    history: list[dict[str, Any]],
    acc: Any,
    t0: float,
) -> dict[str, Any]:
    """What every run's metrics record besides its scores: seed, settings, size, speed, store."""
    return {
        "seed": config.seed,
        "hyperparameters": hp,
        "model_hparams": dict(model.hparams),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "seconds": time.time() - t0,
        "train_loras_per_s": float(np.median([h["loras_per_s"] for h in history])),
        "num_processes": acc.num_processes,
        "store": str(store.path),
    }
