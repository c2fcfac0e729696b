"""Featurize and forward time, floors and peak memory of each model on synthetic batches."""

from __future__ import annotations

import gc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

import loralens as ll
from loralens import features
from loralens.canonical_form import canonical_form
from loralens.lora import LoRABatch
from speedbench.measure import Floors, PeakMemory, count_flops, tensor_bytes, time_call
from speedbench.shapes import synthetic_batch

MODELS: tuple[str, ...] = ("mlp", "mlp-oalign", "mlp-svd", "mlp-dense", "glnet", "w2t")
# the featurizer each model runs before its MLP or transformer (GL-net reads U and V as they are;
# w2t's is the canonical form, loralens.canonical_form)
FEATURIZER_OF: dict[str, str | None] = {
    "mlp": "flatten",
    "mlp-oalign": "oalign",
    "mlp-svd": "svals",
    "mlp-dense": "dense",
    "glnet": None,
    "w2t": "canonical",
}


def featurize_fn(name: str, batch: LoRABatch, model: torch.nn.Module | None = None):
    """A zero-argument callable running featurizer ``name`` on ``batch`` the way the model does."""
    if name == "oalign":
        template = getattr(model, "template", None)
        if template is None:  # the first LoRA of the batch, as a training set would give
            template = batch.select([0])
        return lambda: features.oalign(batch, template)
    if name == "canonical":
        return lambda: canonical_form(batch)
    return lambda: getattr(features, name)(batch)


@dataclass
class ModelRow:
    shape: str
    layers: int
    width: int
    batch_size: int
    model: str
    status: str = "ok"  # ok | refused | failed | skipped
    note: str = ""
    input_mib: float = 0.0
    param_mib: float = 0.0
    featurizer: str | None = None
    featurize_s: float | None = None  # per LoRA, best call
    featurize_median_s: float | None = None
    featurize_floor_s: float | None = None
    featurize_cpu_s: float | None = None  # per LoRA, CPU time of the least-CPU call
    featurize_cpu_floor_s: float | None = None  # floor from the CPU-time bandwidth / rate
    forward_s: float | None = None  # per LoRA, best call (the model's whole forward)
    forward_median_s: float | None = None
    forward_floor_s: float | None = None
    forward_cpu_s: float | None = None
    forward_cpu_floor_s: float | None = None
    forward_flops: float | None = None  # per LoRA
    forward_bytes: float | None = None  # per LoRA
    featurize_flops: float | None = None
    featurize_bytes: float | None = None
    peak_mib: float | None = None
    peak_method: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def forward_x_floor(self) -> float | None:
        return _times_floor(self.forward_s, self.forward_floor_s)

    @property
    def featurize_x_floor(self) -> float | None:
        return _times_floor(self.featurize_s, self.featurize_floor_s)

    @property
    def forward_cpu_x_floor(self) -> float | None:
        return _times_floor(self.forward_cpu_s, self.forward_cpu_floor_s)

    @property
    def featurize_cpu_x_floor(self) -> float | None:
        return _times_floor(self.featurize_cpu_s, self.featurize_cpu_floor_s)


def _times_floor(seconds: float | None, floor_s: float | None) -> float | None:
    """seconds / floor, or None where either is missing."""
    return None if seconds is None or not floor_s else seconds / floor_s


def _build(name: str, batch: LoRABatch, hparams: dict[str, Any]) -> torch.nn.Module:
    return ll.build_model(name, like=batch, out_dim=1, **hparams)


def bench_model(
    name: str,
    batch: LoRABatch,
    floors: Floors,
    *,
    shape: tuple[str, int, int],
    budget_s: float = 1.0,
    hparams: dict[str, Any] | None = None,
    collect: bool = True,
) -> ModelRow:
    """Featurize + forward time, floors and peak memory of model ``name`` on ``batch``."""
    label, layers, width = shape
    device, B = batch.device, len(batch)
    row = ModelRow(
        shape=label,
        layers=layers,
        width=width,
        batch_size=B,
        model=name,
        featurizer=FEATURIZER_OF.get(name),
        input_mib=tensor_bytes(batch) / B / 2**20,
    )
    mem = PeakMemory(device, collect=collect)
    try:
        with torch.inference_mode(), mem:
            model = _build(name, batch, hparams or {}).to(device=device, dtype=batch.dtype)
            model.eval()
            feats = None
            if row.featurizer:
                feats = featurize_fn(row.featurizer, batch, model)()
            out = model(batch)
            del out
    except MemoryError as e:  # the up-front refusal (build_model) or a real allocation failure
        row.status, row.note = "refused", str(e).splitlines()[0][:300]
        return row
    except RuntimeError as e:
        msg = str(e).splitlines()[0][:300]
        row.status = "refused" if "memory" in msg.lower() else "failed"
        row.note = msg
        return row
    row.peak_mib, row.peak_method = mem.peak_mib, mem.method
    row.param_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    param_bytes = row.param_mib * 2**20
    one = batch.select([0])  # FLOPs grow linearly with the batch: count them on one LoRA
    with torch.inference_mode():  # the call under PeakMemory above was the warm-up
        if row.featurizer:
            fn = featurize_fn(row.featurizer, batch, model)
            t = time_call(fn, device, budget_s=budget_s, warmup=0).per(B)
            row.featurize_s, row.featurize_median_s = t.best_s, t.median_s
            row.featurize_cpu_s = t.cpu_s
            flops = count_flops(featurize_fn(row.featurizer, one, model))
            nbytes = (tensor_bytes(batch) + tensor_bytes(feats)) / B
            row.featurize_flops, row.featurize_bytes = flops, nbytes
            row.featurize_floor_s = floors.floor_s(nbytes, flops)
            row.featurize_cpu_floor_s = floors.floor_s(nbytes, flops, cpu=True)
        del feats
        t = time_call(lambda: model(batch), device, budget_s=budget_s, warmup=0).per(B)
        row.forward_s, row.forward_median_s = t.best_s, t.median_s
        row.forward_cpu_s = t.cpu_s
        flops = count_flops(lambda: model(one))
        # the forward must read its input and its parameters once (weights amortise over B)
        nbytes = tensor_bytes(batch) / B + param_bytes / B
        row.forward_flops, row.forward_bytes = flops, nbytes
        row.forward_floor_s = floors.floor_s(nbytes, flops)
        row.forward_cpu_floor_s = floors.floor_s(nbytes, flops, cpu=True)
    return row


def bench_models_for_shape(
    shape: tuple[str, int, int],
    *,
    models: Sequence[str],
    batch_sizes: Sequence[int],
    floors: Floors,
    device: torch.device,
    dtype: torch.dtype,
    budget_s: float = 1.0,
    hparams: dict[str, dict[str, Any]] | None = None,
    collect: bool = True,
) -> list[ModelRow]:
    rows = []
    _, layers, width = shape
    for B in batch_sizes:
        batch = synthetic_batch(layers, width, batch_size=B, dtype=dtype, device=device)
        for name in models:
            rows.append(
                bench_model(
                    name,
                    batch,
                    floors,
                    shape=shape,
                    budget_s=budget_s,
                    hparams=(hparams or {}).get(name),
                    collect=collect,
                )
            )
        del batch
        if collect:
            gc.collect()
    return rows
