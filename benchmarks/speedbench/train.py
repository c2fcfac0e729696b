"""Training throughput per model, and the share of each epoch its DataLoader takes."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from loralens.learn.fitting.data import make_loader
from loralens.learn.training import loop as T
from loralens.store import LoRAStore


@dataclass
class TrainRow:
    model: str
    loras: int  # training LoRAs per epoch
    epochs: int
    epoch_s: float  # median over epochs (train.py's own timing of its training loop)
    loras_per_s: float  # median over epochs, from train.py's history
    loader_s: float  # one pass of train.py's own DataLoader alone, same rows and batch size
    loader_share: float  # loader_s / epoch_s
    step_s: float  # epoch_s - loader_s: forward + loss + backward + optimizer
    status: str = "ok"
    note: str = ""


def bench_train(
    store_path: Path,
    *,
    models: Sequence[str],
    target: str = "norm",
    epochs: int = 2,
    hparams: dict[str, dict[str, Any]] | None = None,
) -> list[TrainRow]:
    """LoRAs/s per epoch of ``loralens.learn.training.loop.train`` for each model, and the share of each epoch
    spent in its DataLoader (the same loader timed alone over the same training rows)."""
    store = LoRAStore(store_path)
    rows_out = []
    for name in models:
        history: list[dict[str, Any]] = []
        config = T.TrainConfig(
            model=name,
            targets=[target],
            epochs=epochs,
            patience=epochs + 1,
            hparams=dict((hparams or {}).get(name, {})),
            plots=False,
        )
        try:
            metrics = T.train(store, config, None, progress=history.append)
        except MemoryError as e:
            rows_out.append(TrainRow(name, 0, 0, 0, 0, 0, 0, 0, "refused", str(e)[:200]))
            continue
        n_train = int(metrics["n"]["train"])
        bs = int(metrics["hyperparameters"]["batch_size"])
        like = store.batch([0], pad_ranks=store.spec.ranks)
        pad = [int(r) for r in like.spec.ranks]
        y = np.zeros((len(store), 1), dtype=np.float32)
        loader = make_loader(store, y, np.arange(n_train), bs, pad, shuffle=True, seed=0)
        t0 = time.perf_counter()
        for _ in loader:
            pass
        loader_s = time.perf_counter() - t0
        epoch_s = statistics.median(h["seconds"] for h in history)
        rows_out.append(
            TrainRow(
                model=name,
                loras=n_train,
                epochs=len(history),
                epoch_s=epoch_s,
                loras_per_s=statistics.median(h["loras_per_s"] for h in history),
                loader_s=loader_s,
                loader_share=loader_s / epoch_s,
                step_s=epoch_s - loader_s,
                note=f"batch size {bs}",
            )
        )
    return rows_out
