"""Train and evaluate LoL models on a packed store; checkpoints hold everything predict needs.

``train(store, TrainConfig(model="glnet", targets=["eval_loss"]), out_dir)`` splits the store
deterministically, trains with early stopping on the validation loss, takes test metrics at the
best epoch, and writes to ``out_dir``:

    model.safetensors   the model's state (weights and every buffer chosen from data)
    config.json         model name/hparams/spec, task (targets, scaling), training config
    metrics.json        {"task", "test", "val", "best_epoch", "baseline", ...}
    history.json        per-epoch losses
    predictions.csv     test-set predictions vs truth
    pred_vs_true.png, learning_curves.png

It runs unchanged in one process or under ``accelerate launch`` (DDP, mixed precision): data
loading is sharded by accelerate, evaluation outputs are gathered with ``gather_for_metrics``,
and only the main process writes.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loralens.lora import LayerSpec, LoRA, LoRABatch, collate, factor_zeros, spec_of
from loralens.store import LoRAStore, StoreError
from loralens.tasks import CLASSIFICATION, Task, baseline_metrics, split_rows

CHECKPOINT = "model.safetensors"
CONFIG = "config.json"
METRICS = "metrics.json"

#: Per-model training defaults (a user needs no flags). Anything not here comes from GENERIC.
GENERIC: dict[str, Any] = {
    "epochs": 60,
    "lr": 1e-3,
    "batch_size": 32,
    "weight_decay": 1e-4,
    "patience": 12,
    "grad_clip": 1.0,
}
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "mlp": {"lr": 1e-3, "weight_decay": 1e-3},
    "mlp-oalign": {"lr": 1e-3, "weight_decay": 1e-3},
    "mlp-svd": {"lr": 3e-3},
    "mlp-dense": {"lr": 1e-3, "weight_decay": 1e-3},
    "glnet": {"lr": 1e-3},
}


@dataclass
class TrainConfig:
    """What to train. ``None`` means the per-model default (see MODEL_DEFAULTS)."""

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
    #: pandas query selecting the rows used at all, e.g. "rank == 4"
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

    def resolved(self) -> dict[str, Any]:
        d = {**GENERIC, **MODEL_DEFAULTS.get(self.model, {})}
        for k in GENERIC:
            v = getattr(self, k)
            if v is not None:
                d[k] = v
        return d


# ---------------------------------------------------------------------------------- data


class _Collate:
    """Turns a list of store rows into (rows, LoRABatch, encoded targets)."""

    def __init__(self, store: LoRAStore, y: np.ndarray, pad_ranks: Sequence[int]):
        self.store, self.y, self.pad_ranks = store, y, list(pad_ranks)

    def __call__(self, rows: list[int]) -> tuple[torch.Tensor, LoRABatch, torch.Tensor]:
        idx = np.asarray(rows, dtype=np.int64)
        batch = self.store.batch(idx, pad_ranks=self.pad_ranks)
        return torch.from_numpy(idx), batch, torch.from_numpy(self.y[idx]).float()


def _loader(store, y, rows, batch_size, pad_ranks, *, shuffle: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        [int(r) for r in rows],
        batch_size=batch_size,
        shuffle=shuffle,
        generator=g if shuffle else None,
        collate_fn=_Collate(store, y, pad_ranks),
    )


def select_rows(store: LoRAStore, where: str | None) -> np.ndarray:
    """Row indices of ``store`` matching a pandas query (all rows when ``where`` is empty)."""
    if not where:
        return np.arange(len(store))
    try:
        sel = store.index.query(where)
    except Exception as e:
        raise StoreError(
            f"--where {where!r} is not a valid query on {store.label_columns}: {e}"
        ) from e
    return sel.index.to_numpy(np.int64)


def make_split(
    store: LoRAStore,
    rows: np.ndarray,
    y_all: np.ndarray,
    seed: int,
    *,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    split_column: str | None = "auto",
) -> dict[str, np.ndarray]:
    """Store rows of the train/val/test splits among ``rows`` that have any target label."""
    rows = rows[~np.isnan(y_all[rows]).all(axis=1)]
    if len(rows) < 3:
        raise StoreError(f"only {len(rows)} LoRAs have these labels: too few to train")
    if split_column == "auto":
        split_column = "split" if "split" in store.index.columns else None
    if split_column:
        parts = split_rows(0, split_column=store.index[split_column].to_numpy()[rows])
    else:
        parts = split_rows(len(rows), seed=seed, fractions=fractions)
    split = {k: rows[v] for k, v in parts.items()}
    for k, v in split.items():
        if len(v) == 0:
            raise StoreError(f"the {k} split is empty ({len(rows)} labelled LoRAs)")
    return split


# ---------------------------------------------------------------------------------- model


def _no_accelerator() -> bool:
    """True on CPU-only machines: then accelerate runs multi-process CPU (gloo) under a launcher
    (it only looks for WORLD_SIZE when told the run is on CPU)."""
    mps = getattr(torch.backends, "mps", None)
    return not (torch.cuda.is_available() or (mps is not None and mps.is_available()))


def _build(name: str, like: Any, out_dim: int, hparams: Mapping[str, Any]):
    from loralens.models import build_model

    return build_model(name, like=like, out_dim=out_dim, **dict(hparams))


@torch.no_grad()
def _outputs(model, loader, accelerator=None) -> tuple[np.ndarray, np.ndarray]:
    """(rows, raw outputs) over a loader; gathered over processes when under accelerate."""
    model.eval()
    rows, outs = [], []
    for idx, batch, _ in loader:
        out = model(batch).float()
        if accelerator is not None:
            idx, out = accelerator.gather_for_metrics((idx.to(out.device), out))
        rows.append(idx.cpu().numpy())
        outs.append(out.cpu().numpy())
    return np.concatenate(rows), np.concatenate(outs)


# ---------------------------------------------------------------------------------- train


def train(
    store: LoRAStore | str | os.PathLike,
    config: TrainConfig,
    out_dir: str | os.PathLike | None = None,
    *,
    progress: bool | Callable[[dict[str, Any]], None] = False,
    accelerator=None,
) -> dict[str, Any]:
    """Train ``config.model`` on ``store``; returns the metrics dict (also written to out_dir)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    t0 = time.time()
    store = store if isinstance(store, LoRAStore) else LoRAStore(store)
    acc = accelerator or Accelerator(cpu=_no_accelerator())
    hp = config.resolved()
    if config.threads:
        torch.set_num_threads(int(config.threads))
    set_seed(config.seed)

    targets = list(config.targets)
    y_all = store.labels(targets)
    split = make_split(
        store,
        select_rows(store, config.where),
        y_all,
        config.seed,
        fractions=config.fractions,
        split_column=config.split_column,
    )
    task = Task.fit(targets, y_all[split["train"]], kind=config.task)
    y_enc = task.encode(y_all).astype(np.float32)

    # the model is built for the widest ranks among the training LoRAs; every batch is padded
    # to them (wider LoRAs at evaluation: invariant models take any rank, mlp truncates)
    widths = store.ranks[split["train"]].max(axis=0)
    like = store.batch(split["train"][: min(len(split["train"]), 256)], pad_ranks=widths)
    torch.manual_seed(config.seed)
    model = _build(config.model, like, task.out_dim, config.hparams)
    pad = [int(r) for r in model.spec.ranks]  # every batch padded to the model's widths

    bs = int(hp["batch_size"])
    train_dl = _loader(store, y_enc, split["train"], bs, pad, shuffle=True, seed=config.seed)
    val_dl = _loader(store, y_enc, split["val"], max(bs, 64), pad, shuffle=False, seed=0)
    test_dl = _loader(store, y_enc, split["test"], max(bs, 64), pad, shuffle=False, seed=0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=float(hp["lr"]), weight_decay=float(hp["weight_decay"]))
    model, opt, train_dl, val_dl, test_dl = acc.prepare(model, opt, train_dl, val_dl, test_dl)

    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"val_loss": math.inf}
    best_state = None
    epochs, patience = int(hp["epochs"]), int(hp["patience"])
    for epoch in range(1, epochs + 1):
        model.train()
        te = time.time()
        tot, cnt = 0.0, 0
        for _, batch, y in train_dl:
            out = model(batch)
            loss = task.loss(out, y)
            opt.zero_grad(set_to_none=True)
            acc.backward(loss)
            if hp["grad_clip"]:
                acc.clip_grad_norm_(
                    params if acc.num_processes == 1 else model.parameters(), float(hp["grad_clip"])
                )
            opt.step()
            tot += float(loss.detach()) * len(y)
            cnt += len(y)
        train_time = time.time() - te
        vrows, vout = _outputs(model, val_dl, acc)
        val = task.metrics(vout, y_all[vrows])
        rec = {
            "epoch": epoch,
            "train_loss": tot / max(cnt, 1),
            "val_loss": val["loss"],
            "seconds": train_time,
            "loras_per_s": cnt * acc.num_processes / max(train_time, 1e-9),
        }
        improved = val["loss"] < best["val_loss"] - 1e-6 or best_state is None
        if improved:
            trows, tout = _outputs(model, test_dl, acc)
            best = {
                "val_loss": val["loss"],
                "epoch": epoch,
                "val": val,
                "test": task.metrics(tout, y_all[trows]),
                "test_rows": trows,
                "test_out": tout,
            }
            best_state = copy.deepcopy(acc.unwrap_model(model).state_dict())
        rec["best"] = improved
        history.append(rec)
        if callable(progress):
            progress(rec)
        elif progress and acc.is_main_process:
            print(
                f"epoch {epoch:3d}  train {rec['train_loss']:.4f}  val {rec['val_loss']:.4f}"
                + ("  *" if improved else "")
            )
        if epoch - best["epoch"] >= patience:
            break

    base = acc.unwrap_model(model)
    base.load_state_dict(best_state)
    y_tr = y_all[split["train"]]
    metrics = {
        "task": task.kind,
        "model": config.model,
        "targets": targets,
        "test": _headline(best["test"], task.kind),
        "val": _headline(best["val"], task.kind),
        "best_epoch": best["epoch"],
        "epochs_run": len(history),
        "test_detail": best["test"],
        "val_detail": best["val"],
        "baseline": {
            "test": _headline(baseline_metrics(task, y_tr, y_all[split["test"]]), task.kind),
            "val": _headline(baseline_metrics(task, y_tr, y_all[split["val"]]), task.kind),
        },
        "n": {k: len(v) for k, v in split.items()},
        "seed": config.seed,
        "hyperparameters": hp,
        "model_hparams": dict(base.hparams),
        "num_parameters": sum(p.numel() for p in base.parameters()),
        "seconds": time.time() - t0,
        "train_loras_per_s": float(np.median([h["loras_per_s"] for h in history])),
        "num_processes": acc.num_processes,
        "store": str(store.path),
    }
    if out_dir is not None and acc.is_main_process:
        save_run(
            out_dir,
            model=base,
            task=task,
            config=config,
            metrics=metrics,
            history=history,
            test=(best["test_rows"], best["test_out"], store, y_all),
        )
    acc.wait_for_everyone()
    return metrics


def _headline(m: Mapping[str, Any], kind: str) -> dict[str, Any]:
    keys = (
        ("accuracy", "auroc", "loss")
        if kind == CLASSIFICATION
        else ("r2", "kendall_tau", "spearman", "mse", "mse_standardized", "loss")
    )
    return {k: _clean(m[k]) for k in keys if k in m}


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (np.floating, np.integer)):
        return _clean(v.item())
    return v


# ---------------------------------------------------------------------------------- runs


def save_run(out_dir, *, model, task: Task, config: TrainConfig, metrics, history, test) -> None:
    from safetensors.torch import save_file

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
    (out / CONFIG).write_text(json.dumps(_clean(cfg), indent=2) + "\n")
    (out / METRICS).write_text(json.dumps(_clean(metrics), indent=2) + "\n")
    (out / "history.json").write_text(json.dumps(_clean(history), indent=2) + "\n")
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


def plot_run(out: Path, task: Task, history, y_true, pred, metrics) -> None:
    """learning_curves.png and pred_vs_true.png (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ep = [h["epoch"] for h in history]
    ax.plot(ep, [h["train_loss"] for h in history], label="train")
    ax.plot(ep, [h["val_loss"] for h in history], label="val")
    ax.axvline(metrics["best_epoch"], color="gray", ls="--", lw=1, label="best")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (standardized MSE)" if task.kind != CLASSIFICATION else "loss (BCE)")
    ax.set_title(f"{metrics['model']}: {', '.join(task.targets)[:60]}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "learning_curves.png", dpi=110)
    plt.close(fig)

    k = min(len(task.targets), 6)
    fig, axes = plt.subplots(1, k, figsize=(3.6 * k, 3.4), squeeze=False)
    for j in range(k):
        ax = axes[0, j]
        t, p = y_true[:, j], pred[:, j]
        ok = ~np.isnan(t)
        per = metrics["test_detail"]["per_target"].get(task.targets[j], {})
        if task.kind == CLASSIFICATION:
            for cls, color in ((0, "tab:blue"), (1, "tab:orange")):
                ax.hist(
                    p[ok & (t == cls)],
                    bins=20,
                    range=(0, 1),
                    alpha=0.6,
                    color=color,
                    label=f"true {cls}",
                )
            ax.set_xlabel("predicted probability")
            ax.legend()
            sub = f"acc {per.get('accuracy', float('nan')):.3f}  auroc {per.get('auroc', float('nan')):.3f}"
        else:
            ax.scatter(t[ok], p[ok], s=10, alpha=0.7)
            lo, hi = np.nanmin(np.r_[t[ok], p[ok]]), np.nanmax(np.r_[t[ok], p[ok]])
            ax.plot([lo, hi], [lo, hi], color="gray", lw=1, ls="--")
            ax.set_xlabel("true")
            ax.set_ylabel("predicted")
            sub = f"R2 {per.get('r2', float('nan')):.3f}  tau {per.get('kendall_tau', float('nan')):.3f}"
        ax.set_title(f"{task.targets[j]}\n{sub}", fontsize=9)
    fig.suptitle(f"{metrics['model']} (test set)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "pred_vs_true.png", dpi=110)
    plt.close(fig)


@dataclass
class Run:
    """A trained model loaded from a run directory."""

    path: Path
    model: torch.nn.Module
    task: Task
    config: dict[str, Any]

    @property
    def spec(self) -> LayerSpec:
        return self.model.spec

    def check(self, lora_spec: LayerSpec, what: str = "adapter") -> None:
        problem = self.spec.describe_mismatch(lora_spec)
        if problem:
            raise ValueError(
                f"{what} does not fit the model in {self.path} "
                f"({self.config['model']['name']}, {len(self.spec.names)} layers): {problem}"
            )

    @torch.no_grad()
    def raw(self, batch: LoRABatch) -> np.ndarray:
        self.model.eval()
        return self.model(batch).float().cpu().numpy()

    def predict_loras(self, loras: Sequence[LoRA], batch_size: int = 64) -> np.ndarray:
        """Original-scale predictions (probabilities for classification), (N, out_dim)."""
        outs = []
        for k, lora in enumerate(loras):
            self.check(spec_of(lora), str(lora.metadata.get("source", f"adapter #{k}")))
        for s in range(0, len(loras), batch_size):
            chunk = list(loras[s : s + batch_size])
            batch = collate(chunk)
            batch = _pad_batch(batch, self.spec.ranks)
            outs.append(self.raw(batch))
        return self.task.decode(np.concatenate(outs)) if outs else np.zeros((0, self.task.out_dim))


def _pad_batch(batch: LoRABatch, ranks: Sequence[int]) -> LoRABatch:
    """Zero-pad each layer's rank axis up to ``ranks`` (exact; never truncates)."""

    def pad(f: torch.Tensor, r: int) -> torch.Tensor:
        if f.shape[2] >= r:
            return f
        out = factor_zeros(f.shape[0], f.shape[1], r, dtype=f.dtype, device=f.device)
        out[:, :, : f.shape[2]] = f
        return out

    U = [pad(u, int(r)) for u, r in zip(batch.U, ranks)]
    V = [pad(v, int(r)) for v, r in zip(batch.V, ranks)]
    return LoRABatch(names=list(batch.names), U=U, V=V, ranks=batch.ranks)


def load_run(run_dir: str | os.PathLike, *, device: str | torch.device = "cpu") -> Run:
    """Load a run directory written by :func:`train`."""
    from safetensors.torch import load_file

    from loralens.models.registry import rebuild_model

    path = Path(run_dir)
    if not (path / CONFIG).is_file() or not (path / CHECKPOINT).is_file():
        raise FileNotFoundError(f"{path} is not a loralens run (no {CONFIG} / {CHECKPOINT})")
    cfg = json.loads((path / CONFIG).read_text())
    m = cfg["model"]
    spec = LayerSpec.from_dict(m["spec"])
    model = rebuild_model(m["name"], spec, int(m["out_dim"]), m["hparams"])
    state = load_file(path / CHECKPOINT)
    model.load_state_dict(state)
    model.to(device).eval()
    return Run(path=path, model=model, task=Task.from_dict(cfg["task"]), config=cfg)


def evaluate(
    run: Run | str | os.PathLike,
    store: LoRAStore | str | os.PathLike,
    *,
    where: str | None = None,
    batch_size: int = 256,
    out_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Metrics of a trained model on every (selected) LoRA of another store."""
    run = run if isinstance(run, Run) else load_run(run)
    store = store if isinstance(store, LoRAStore) else LoRAStore(store)
    store_spec = LayerSpec(tuple(store.names), tuple(store.shapes), tuple(store.spec.ranks))
    run.check(store_spec, f"store {store.path}")
    rows = select_rows(store, where)
    y_all = store.labels(run.task.targets)
    rows = rows[~np.isnan(y_all[rows]).all(axis=1)]
    if len(rows) == 0:
        raise StoreError(f"no LoRA in {store.path} has labels {run.task.targets}")
    outs = []
    t0 = time.time()
    for _, batch in store.iter_batches(batch_size, rows=rows, pad_ranks=run.spec.ranks):
        outs.append(run.raw(batch))
    out = np.concatenate(outs)
    metrics = run.task.metrics(out, y_all[rows])
    result = {
        "task": run.task.kind,
        "model": run.config["model"]["name"],
        "targets": run.task.targets,
        "store": str(store.path),
        "where": where,
        "n": len(rows),
        "metrics": _headline(metrics, run.task.kind),
        "detail": _clean(metrics),
        "seconds": time.time() - t0,
    }
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "evaluate.json").write_text(json.dumps(_clean(result), indent=2) + "\n")
    return _clean(result)


__all__ = [
    "MODEL_DEFAULTS",
    "Run",
    "TrainConfig",
    "evaluate",
    "load_run",
    "make_split",
    "select_rows",
    "train",
]
