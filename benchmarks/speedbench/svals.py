"""Singular values of every delta W: the featurizer's factor route against the dense SVD."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from loralens import features
from loralens.fused import linalg_dtype
from loralens.lora import delta_weight
from speedbench.measure import Floors, count_flops, sync, tensor_bytes, time_call
from speedbench.shapes import synthetic_batch


@dataclass
class SvalsRow:
    shape: str
    layers: int
    width: int
    qr_s: float  # per LoRA (batch size 1), all layers
    qr_x_floor: float
    qr_cpu_s: float | None = None
    qr_cpu_x_floor: float | None = None
    dense_s: float | None = None  # per LoRA, all layers (measured on `dense_layers` of them)
    dense_layers: int = 0
    ratio: float | None = None  # dense / qr
    dense_cpu_s: float | None = None
    ratio_cpu: float | None = None
    max_rel_err: float | None = None  # |svals_qr - svals_dense| / max sval, measured layers
    note: str = ""


def dense_svals_estimate_s(width: int, device: torch.device, dtype: torch.dtype) -> float:
    """Estimated svdvals time of one dense width x width matrix: a 512 x 512 one timed now,
    scaled by (width / 512)^3."""
    a = torch.randn(512, 512, device=device).to(linalg_dtype(dtype))
    t = time_call(lambda: torch.linalg.svdvals(a), device, min_repeats=3, budget_s=0.3)
    return t.best_s * (width / 512) ** 3


def bench_svals(
    shape: tuple[str, int, int],
    floors: Floors,
    *,
    device: torch.device,
    dtype: torch.dtype,
    budget_s: float = 1.0,
    dense_budget_s: float = 60.0,
    max_dense_bytes: int = 2 * 2**30,
) -> SvalsRow:
    """svals by the factor route (the featurizer: Grams, QR where ill-conditioned) vs ``torch.linalg.svdvals`` of the dense U V^T.

    One LoRA (batch size 1). The dense route is timed on as many layers as fit in
    ``dense_budget_s`` (all layers have the same shape) and scaled to all layers; it is skipped
    where one dense layer exceeds ``max_dense_bytes`` or its estimated time the budget.
    """
    label, layers, width = shape
    batch = synthetic_batch(layers, width, batch_size=1, dtype=dtype, device=device)
    with torch.inference_mode():
        t = time_call(lambda: features.svals(batch), device, budget_s=budget_s)
        nbytes = tensor_bytes(batch)
        flops = count_flops(lambda: features.svals(batch))
        qr = _svals_per_layer(features.svals(batch), layers)
        row = SvalsRow(label, layers, width, t.best_s, t.best_s / floors.floor_s(nbytes, flops))
        cpu_floor = floors.floor_s(nbytes, flops, cpu=True)
        if t.cpu_s and cpu_floor:
            row.qr_cpu_s, row.qr_cpu_x_floor = t.cpu_s, t.cpu_s / cpu_floor
        est_layer = dense_svals_estimate_s(width, device, dtype)
        layer_bytes = width * width * torch.empty((), dtype=dtype).element_size()
        if layer_bytes > max_dense_bytes or est_layer > dense_budget_s:
            row.note = (
                f"dense not run: one {width}x{width} layer is {layer_bytes / 2**20:.0f} MiB and "
                f"would take ~{est_layer:.0f} s (x{layers} layers ~{est_layer * layers / 60:.0f} "
                "min; n^3 scaling of a 512x512 svdvals timed in this run)"
            )
            return row

        def dense(k: int) -> list[torch.Tensor]:  # the product in the run's dtype, SVD in >= fp32
            w = linalg_dtype(dtype)
            return [
                torch.linalg.svdvals(delta_weight(batch.U[i][0], batch.V[i][0]).to(w))
                for i in range(k)
            ]

        t0 = time.perf_counter()
        dense_vals = dense(1)
        sync(device)
        t1 = time.perf_counter() - t0
        k = max(1, min(layers, int(dense_budget_s / max(t1, 1e-9))))
        td = time_call(
            lambda: dense(k), device, min_repeats=1, max_repeats=3, budget_s=0.0, warmup=0
        )
        row.dense_s, row.dense_layers = td.best_s * layers / k, k
        row.ratio = row.dense_s / row.qr_s
        if td.cpu_s and row.qr_cpu_s:
            row.dense_cpu_s = td.cpu_s * layers / k
            row.ratio_cpu = row.dense_cpu_s / row.qr_cpu_s
        if qr is not None:
            q, d = qr[0].float().flatten(), dense_vals[0].float()
            row.max_rel_err = float((q - d[: q.numel()]).abs().max() / d.max().clamp_min(1e-30))
        if k < layers:
            row.note = (
                f"dense timed on {k} of {layers} layers (same shape), scaled x{layers / k:.1f}"
            )
    return row


def _svals_per_layer(out: Any, layers: int) -> list[torch.Tensor] | None:
    """The featurizer's singular values per layer for LoRA 0, whatever container it returns."""
    if isinstance(out, (list, tuple)) and len(out) == layers:
        return [torch.as_tensor(o)[0] for o in out]
    if isinstance(out, torch.Tensor) and out.ndim == 3 and out.shape[1] == layers:
        return list(out[0])
    if isinstance(out, torch.Tensor) and out.ndim == 2 and out.shape[1] % layers == 0:
        return list(out[0].reshape(layers, -1))
    return None
