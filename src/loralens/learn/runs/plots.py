"""The plots of a run directory: learning curves and predictions against the truth (test set)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from loralens.learn.fitting.tasks import CLASSIFICATION, Task
from loralens.learn.runs.report import kept


def plot_run(
    out: Path,
    task: Task,
    history: Sequence[Mapping[str, Any]],
    y_true: np.ndarray,
    pred: np.ndarray,
    metrics: Mapping[str, Any],
) -> None:
    """learning_curves.png and pred_vs_true.png (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    trained = [h for h in history if h["train_loss"] is not None]  # epoch 0 is not trained
    ax.plot([h["epoch"] for h in trained], [h["train_loss"] for h in trained], label="train")
    ax.plot(
        [h["epoch"] for h in history], [h["val_loss"] for h in history], "-o", ms=2, label="val"
    )
    best = f"best: {kept(metrics)}" if metrics["best_epoch"] == 0 else "best"
    ax.axvline(metrics["best_epoch"], color="gray", ls="--", lw=1, label=best)
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


__all__ = ["plot_run"]
