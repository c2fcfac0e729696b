"""Speed benchmarks: featurizers and models at GPT-3 shapes against the machine's own floor,
the factor route (Gram or QR) vs the dense route for singular values, packed-store throughput vs PEFT folders, and
training throughput.

Everything here is measurement, never an assertion: ``benchmarks/speed.py`` (or
``loralens benchmark --speed``) calls :func:`run` and writes a markdown report + JSON.

What the numbers mean
---------------------
- Times are per LoRA: the time of one call on a batch of ``B`` LoRAs divided by ``B``. Each cell
  is warmed up once, then repeated until ``min_repeats`` calls and ``budget_s`` seconds have
  passed; the table shows the best call (the machine is shared, so the best call is the one
  least disturbed), the JSON also has the median.
- Floor: ``max(bytes / read bandwidth, flops / matmul rate)`` (a roofline), with the bandwidth
  (sum over a 256 MiB tensor) and matmul rate (a large GEMM) measured at the start of the same
  run. ``bytes`` counts what the call must read or write at least once: its input tensors, the
  model's parameters (for a forward) and its output features (for a featurizer). ``flops``
  counts matmuls with ``torch.utils.flop_counter.FlopCounterMode`` plus QR and SVD at the
  textbook estimates ``ll.model_cost`` uses (2 m n^2 and 14 m n^2).
- Peak memory (CPU): the rise of the process's peak resident set (``VmHWM``, reset through
  ``/proc/self/clear_refs``) over the resident set just before the model is built, while the
  model is built and one featurize + forward runs: parameters + features + activations, not
  the input batch (given separately). Each shape runs in its own process started with
  ``MALLOC_MMAP_THRESHOLD_`` fixed, so freed blocks go back to the OS and cannot hide a later
  peak. CUDA: ``torch.cuda.max_memory_allocated`` over the same window.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from loralens.lora import LoRABatch

# (label, layers, width): the GPT-3 family as timed in the paper (Brown et al. 2020, table 2.1;
# 5140 is the paper's width for 13B).
GPT3_SHAPES: tuple[tuple[str, int, int], ...] = (
    ("125M", 12, 768),
    ("350M", 24, 1024),
    ("760M", 24, 1536),
    ("1.3B", 24, 2048),
    ("2.7B", 32, 2560),
    ("6.7B", 32, 4096),
    ("13B", 40, 5140),
    ("175B", 96, 12288),
)
QUICK_SHAPES: tuple[tuple[str, int, int], ...] = (("tiny-a", 2, 48), ("tiny-b", 3, 64))
MODELS: tuple[str, ...] = ("mlp", "mlp-oalign", "mlp-svd", "mlp-dense", "glnet")
# the featurizer each model runs before its MLP (GL-net reads U and V as they are)
FEATURIZER_OF: dict[str, str | None] = {
    "mlp": "flatten",
    "mlp-oalign": "oalign",
    "mlp-svd": "svals",
    "mlp-dense": "dense",
    "glnet": None,
}
PARTS: tuple[str, ...] = ("floors", "models", "svals", "store", "train")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# --------------------------------------------------------------------------- helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    best_s: float  # wall
    median_s: float  # wall
    calls: int
    cpu_s: float | None = None  # CPU time of the process in the fastest-CPU call (None on CUDA)

    def per(self, n: int) -> Timing:
        cpu = None if self.cpu_s is None else self.cpu_s / n
        return Timing(self.best_s / n, self.median_s / n, self.calls, cpu)


def time_call(
    fn: Callable[[], Any],
    device: torch.device,
    *,
    min_repeats: int = 3,
    max_repeats: int = 100,
    budget_s: float = 1.0,
    warmup: int = 1,
) -> Timing:
    """Best and median wall time of ``fn()`` after ``warmup`` calls (device synchronised), and
    the least CPU time (``time.process_time``, all threads) a call took: on a CPU shared with
    other work, CPU time is what the call costs, wall time includes waiting for a core."""
    for _ in range(warmup):
        fn()
        sync(device)
    times: list[float] = []
    cpu: list[float] = []
    start = time.perf_counter()
    while len(times) < max_repeats and (
        len(times) < min_repeats or time.perf_counter() - start < budget_s
    ):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    cpu_s = min(cpu) if device.type == "cpu" else None
    return Timing(min(times), statistics.median(times), len(times), cpu_s)


def _proc_status_mib(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory (MiB) used above the level at entry, on CPU (resident set) or CUDA (allocator).

    CPU: resets the kernel's peak-RSS mark (``echo 5 > /proc/self/clear_refs``) and reads
    ``VmHWM`` at exit. Where that is not possible (not Linux) it falls back to ``ru_maxrss``,
    which only rises, and says so in ``method``.
    """

    def __init__(self, device: torch.device, *, collect: bool = True):
        self.device, self.collect = device, collect
        self.peak_mib: float = float("nan")
        self.method = ""

    def __enter__(self) -> PeakMemory:
        if self.collect:
            gc.collect()
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device) / 2**20
            self.method = "cuda max_memory_allocated"
            return self
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._base = _proc_status_mib("VmRSS")
            self.method = "VmHWM - VmRSS (clear_refs reset)"
        except OSError:
            self._base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
            self.method = "ru_maxrss delta (monotonic: under-reports after a larger peak)"
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            sync(self.device)
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self.method.startswith("VmHWM"):
            peak = _proc_status_mib("VmHWM") or float("nan")
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        self.peak_mib = max(0.0, peak - (self._base or 0.0))


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in a (nested) tensor / list / tuple / dict / LoRABatch."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, LoRABatch):
        return tensor_bytes(obj.U) + tensor_bytes(obj.V)
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn``: torch's FlopCounterMode (matmuls), plus QR and SVD at the
    textbook estimates that ``ll.model_cost`` uses (FlopCounterMode alone does not see them)."""
    from torch.utils.flop_counter import FlopCounterMode

    from loralens.models.registry import _custom_flops

    with FlopCounterMode(display=False, custom_mapping=_custom_flops()) as counter:
        fn()
    return int(counter.get_total_flops())


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cores": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["ram_gib"] = round(int(line.split()[1]) / 2**20, 1)
    with contextlib.suppress(OSError):
        info["loadavg_at_start"] = Path("/proc/loadavg").read_text().split()[:3]
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    from loralens import fused

    info["fused_kernel"] = fused.available()
    return info


# --------------------------------------------------------------------------- inputs


def parse_shape(text: str) -> tuple[str, int, int]:
    """A GPT-3 label ("175B") or "LAYERSxWIDTH" ("12x768") -> (label, layers, width)."""
    for shape in GPT3_SHAPES + QUICK_SHAPES:
        if shape[0].lower() == text.lower():
            return shape
    try:
        layers, width = (int(x) for x in text.lower().split("x"))
    except ValueError:
        labels = ", ".join(s[0] for s in GPT3_SHAPES)
        raise ValueError(f"shape {text!r}: use one of {labels} or LAYERSxWIDTH") from None
    return (text, layers, width)


def synthetic_batch(
    layers: int,
    width: int,
    *,
    batch_size: int,
    rank: int = 4,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> LoRABatch:
    """``batch_size`` random rank-``rank`` LoRAs, one (width x width) attention matrix per layer.

    Scales as PEFT leaves them after training: U ~ 1e-2 N(0, 1), V ~ N(0, 1 / width).
    """
    g = torch.Generator().manual_seed(seed)
    U, V = [], []
    for _ in range(layers):
        # rank-major, as collate() and the store lay factors out
        u = torch.randn(batch_size, rank, width, generator=g).mul_(1e-2).mT
        v = torch.randn(batch_size, rank, width, generator=g).mul_(width**-0.5).mT
        U.append(u.to(device=device, dtype=dtype))
        V.append(v.to(device=device, dtype=dtype))
    names = [f"h.{i}.attn.q_proj" for i in range(layers)]
    ranks = torch.full((batch_size, layers), rank, dtype=torch.long, device=device)
    return LoRABatch(names=names, U=U, V=V, ranks=ranks)


# --------------------------------------------------------------------------- floors


@dataclass
class Floors:
    read_gbps: float  # GB/s (1e9 bytes) reading a large tensor (sum)
    copy_gbps: float  # GB/s counting read + write bytes of a large copy
    matmul_gflops: float  # GFLOP/s of a large GEMM in the run's dtype
    bytes_used: int
    gemm_n: int
    read_gbps_cpu: float | None = None  # the same per CPU-second (None on CUDA)
    matmul_gflops_cpu: float | None = None

    def floor_s(self, nbytes: float, flops: float, *, cpu: bool = False) -> float | None:
        bw, mm = (
            (self.read_gbps_cpu, self.matmul_gflops_cpu)
            if cpu
            else (
                self.read_gbps,
                self.matmul_gflops,
            )
        )
        if not bw or not mm:
            return None
        return max(nbytes / (bw * 1e9), flops / (mm * 1e9))


def measure_floors(
    device: torch.device, dtype: torch.dtype, *, nbytes: int = 256 * 2**20, gemm_n: int = 2048
) -> Floors:
    """This machine's memory bandwidth and matmul rate, measured now (best of several calls)."""
    n = nbytes // torch.empty((), dtype=dtype).element_size()
    x = torch.ones(n, dtype=dtype, device=device)
    y = torch.empty_like(x)
    t_read = time_call(lambda: x.sum(), device, min_repeats=5, budget_s=1.0)
    t_copy = time_call(lambda: y.copy_(x), device, min_repeats=5, budget_s=1.0)
    a = torch.randn(gemm_n, gemm_n, device=device).to(dtype)
    b = torch.randn(gemm_n, gemm_n, device=device).to(dtype)
    t_mm = time_call(lambda: a @ b, device, min_repeats=3, budget_s=1.5)
    return Floors(
        read_gbps=nbytes / t_read.best_s / 1e9,
        copy_gbps=2 * nbytes / t_copy.best_s / 1e9,
        matmul_gflops=2 * gemm_n**3 / t_mm.best_s / 1e9,
        bytes_used=nbytes,
        gemm_n=gemm_n,
        read_gbps_cpu=nbytes / t_read.cpu_s / 1e9 if t_read.cpu_s else None,
        matmul_gflops_cpu=2 * gemm_n**3 / t_mm.cpu_s / 1e9 if t_mm.cpu_s else None,
    )


# --------------------------------------------------------------------------- models


def _features_module():
    from loralens import features

    return features


def featurize_fn(name: str, batch: LoRABatch, model: torch.nn.Module | None = None):
    """A zero-argument callable running featurizer ``name`` on ``batch`` the way the model does."""
    feats = _features_module()
    if name == "oalign":
        template = getattr(model, "template", None)
        if template is None:  # the first LoRA of the batch, as a training set would give
            template = batch.select([0])
        return lambda: feats.oalign(batch, template)
    return lambda: getattr(feats, name)(batch)


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
    import loralens as ll

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


# --------------------------------------------------------------------------- svals: factor route vs dense


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


def _svd_dtype(dtype: torch.dtype) -> torch.dtype:
    """torch's SVD needs float32 or float64 (as the featurizers, linear algebra in >= float32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dense_svals_estimate_s(width: int, device: torch.device, dtype: torch.dtype) -> float:
    """Estimated svdvals time of one dense width x width matrix: a 512 x 512 one timed now,
    scaled by (width / 512)^3."""
    a = torch.randn(512, 512, device=device).to(_svd_dtype(dtype))
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
    feats = _features_module()
    batch = synthetic_batch(layers, width, batch_size=1, dtype=dtype, device=device)
    with torch.inference_mode():
        t = time_call(lambda: feats.svals(batch), device, budget_s=budget_s)
        nbytes = tensor_bytes(batch)
        flops = count_flops(lambda: feats.svals(batch))
        qr = _svals_per_layer(feats.svals(batch), layers)
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
            w = _svd_dtype(dtype)
            return [torch.linalg.svdvals((batch.U[i][0] @ batch.V[i][0].T).to(w)) for i in range(k)]

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


# --------------------------------------------------------------------------- store


TINY_BASE = {  # a tiny random-init Llama: 6 layers, width 384; LoRA rank 8 on q_proj, v_proj
    "hidden_size": 384,
    "intermediate_size": 768,
    "num_hidden_layers": 6,
    "num_attention_heads": 6,
    "num_key_value_heads": 6,
    "vocab_size": 128,
    "max_position_embeddings": 64,
}


def make_peft_adapters(
    out: str | os.PathLike,
    num: int,
    *,
    rank: int = 8,
    base: dict[str, int] | None = None,
    seed: int = 0,
    writer: str = "peft",
) -> Path:
    """``num`` random PEFT LoRA adapters of one tiny random-init Llama (rank ``rank`` on q_proj
    and v_proj) in ``out/a00000 ...``, plus ``out/labels.csv`` (columns adapter; norm, the sum
    over layers of |delta W|_F, a label the weights determine; noise, one they do not).

    ``writer="peft"`` saves each with PEFT's ``save_pretrained`` on a real transformers model
    (what users bring); ``"loralens"`` writes the same folders with ``ll.save_lora`` without
    importing transformers (the smoke test). Reuses a finished folder with the same settings.
    """
    import numpy as np

    import loralens as ll

    out = Path(out)
    base = dict(base or TINY_BASE)
    settings = {"num": num, "rank": rank, "base": base, "seed": seed, "writer": writer}
    done = out / "made.json"
    if done.is_file() and json.loads(done.read_text()) == settings:
        return out
    out.mkdir(parents=True, exist_ok=True)
    width, layers = base["hidden_size"], base["num_hidden_layers"]
    names = [f"model.layers.{i}.self_attn.{m}" for i in range(layers) for m in ("q_proj", "v_proj")]
    save = None
    if writer == "peft":
        from peft import LoraConfig, get_peft_model
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=["q_proj", "v_proj"])
        peft_model = get_peft_model(LlamaForCausalLM(LlamaConfig(**base)), config)
        params = dict(peft_model.named_parameters())

        def save(lora: ll.LoRA, folder: Path) -> None:  # lora_alpha = r: scale 1, U = lora_B
            with torch.no_grad():
                for la in lora.layers:
                    key = f"base_model.model.{la.name}"
                    params[f"{key}.lora_A.default.weight"].copy_(la.V.T)
                    params[f"{key}.lora_B.default.weight"].copy_(la.U)
            peft_model.save_pretrained(folder)

    elif writer == "loralens":

        def save(lora: ll.LoRA, folder: Path) -> None:
            ll.save_lora(lora, folder)

    else:
        raise ValueError(f"writer must be 'peft' or 'loralens', got {writer!r}")
    rng = np.random.default_rng(seed)
    rows = ["adapter,norm,noise"]
    for i in range(num):
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        scale = float(np.exp(rng.uniform(np.log(1e-3), np.log(1e-1))))
        lora = ll.LoRA(
            layers=[
                ll.LoRALayer(
                    n,
                    torch.randn(width, rank, generator=g) * scale,
                    torch.randn(width, rank, generator=g) * width**-0.5,
                )
                for n in names
            ]
        )
        save(lora, out / f"a{i:05d}")
        norm = sum(float(d.norm()) for d in lora.delta_weights().values())
        rows.append(f"a{i:05d},{norm:.6g},{rng.normal():.6g}")
    (out / "labels.csv").write_text("\n".join(rows) + "\n")
    done.write_text(json.dumps(settings))
    return out


def drop_page_cache(paths: Iterable[Path]) -> int:
    """Evict these files from the page cache (posix_fadvise DONTNEED; no root needed, touches
    nothing else on the machine). Returns the bytes advised."""
    total = 0
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            total += os.fstat(fd).st_size
        finally:
            os.close(fd)
    return total


def _files_under(path: Path, pattern: str = "*") -> list[Path]:
    return [p for p in sorted(path.rglob(pattern)) if p.is_file()]


@dataclass
class StoreRow:
    source: str  # "PEFT folders (ll.load_lora + collate)" | "packed store (iter_batches)"
    cache: str  # cold | warm
    loras: int
    seconds: float
    loras_per_s: float
    gb_per_s: float  # GB (1e9 bytes) of float32 U and V delivered per second
    file_bytes: int
    speedup: float | None = None  # store / PEFT at the same cache state
    cpu_s: float | None = None  # CPU time of the process in that pass
    speedup_cpu: float | None = None


def bench_store(
    adapters: Path,
    store_path: Path,
    *,
    batch_size: int = 32,
    repeats: int = 2,
) -> tuple[list[StoreRow], dict[str, Any]]:
    """Read every adapter as batches, from PEFT folders and from the packed store, cold and
    warm page cache; the store is (re)packed from the folders first with ``store.pack`` (what
    ``loralens pack`` runs), and the pack timed."""
    import loralens as ll
    from loralens.store import LoRAStore, pack

    folders = sorted(p for p in adapters.iterdir() if p.is_dir())
    t0 = time.perf_counter()  # what `loralens pack` runs
    pack(adapters, store_path, labels=adapters / "labels.csv", overwrite=True)
    pack_s = time.perf_counter() - t0
    store = LoRAStore(store_path)
    n = len(store)
    payload = tensor_bytes(store.batch([0])) * n  # float32 U and V of every LoRA

    def read_peft() -> int:
        count = 0
        for start in range(0, len(folders), batch_size):
            batch = ll.collate([ll.load_lora(f) for f in folders[start : start + batch_size]])
            count += len(batch)
        return count

    def read_store() -> int:
        s = LoRAStore(store_path)  # opened anew: cold really is cold (no maps kept)
        return sum(len(b) for _, b in s.iter_batches(batch_size))

    sources = {
        "PEFT folders (ll.load_lora + collate)": (read_peft, _files_under(adapters)),
        "packed store (iter_batches)": (read_store, _files_under(store_path)),
    }
    rows: list[StoreRow] = []
    for cache in ("cold", "warm"):
        for source, (fn, files) in sources.items():
            best, best_cpu = float("inf"), float("inf")
            for _ in range(repeats):
                if cache == "cold":
                    drop_page_cache(files)
                else:
                    fn()  # bring it into the page cache
                c0, t0 = time.process_time(), time.perf_counter()
                got = fn()
                best = min(best, time.perf_counter() - t0)
                best_cpu = min(best_cpu, time.process_time() - c0)
            assert got == n, (got, n)
            rows.append(
                StoreRow(
                    source=source,
                    cache=cache,
                    loras=n,
                    seconds=best,
                    loras_per_s=n / best,
                    gb_per_s=payload / best / 1e9,
                    file_bytes=sum(f.stat().st_size for f in files),
                    cpu_s=best_cpu,
                )
            )
        peft, packed = rows[-2], rows[-1]
        packed.speedup = peft.seconds / packed.seconds
        packed.speedup_cpu = peft.cpu_s / max(packed.cpu_s, 1e-9)
    info = {
        "pack_s": pack_s,
        "loras": n,
        "payload_bytes": payload,
        "layers": len(store.names),
        "shapes": store.shapes[:2],
        "batch_size": batch_size,
    }
    return rows, info


# --------------------------------------------------------------------------- training


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
    """LoRAs/s per epoch of ``loralens.train.train`` for each model, and the share of each epoch
    spent in its DataLoader (the same loader timed alone over the same training rows)."""
    import numpy as np

    from loralens.learn import loop as T
    from loralens.learn.data import make_loader
    from loralens.store import LoRAStore

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


# --------------------------------------------------------------------------- orchestration


@dataclass
class Config:
    parts: tuple[str, ...] = PARTS
    shapes: tuple[tuple[str, int, int], ...] = GPT3_SHAPES
    models: tuple[str, ...] = MODELS
    batch_sizes: tuple[int, ...] = (1, 32)
    device: str = "cpu"
    dtype: str = "float32"
    budget_s: float = 1.0
    dense_budget_s: float = 60.0
    # the benchmark's memory cap for mlp-dense (the model's own default is MemAvailable): this
    # machine is shared, and a 15 GiB model would push others' work out of memory
    dense_max_gib: float = 6.0
    store_size: int = 2000
    store_base: dict[str, int] = field(default_factory=lambda: dict(TINY_BASE))
    store_writer: str = "peft"  # how the adapters are saved: PEFT save_pretrained or ll.save_lora
    train_epochs: int = 2
    train_models: tuple[str, ...] = MODELS
    work_dir: str = ".cache/bench-speed"
    isolate: bool = True  # one process per shape (honest peak memory)
    threads: int | None = None  # torch intra-op threads (default: torch's, = cores)
    floor_bytes: int = 256 * 2**20  # tensor summed / copied to measure the bandwidth
    gemm_n: int = 2048  # GEMM timed for the matmul rate
    hparams: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def quick(cls, **kw: Any) -> Config:
        """Tiny shapes and a 40-LoRA store: the CI smoke test of the whole harness (seconds)."""
        base = dict(
            shapes=QUICK_SHAPES,
            batch_sizes=(1, 4),
            budget_s=0.02,
            dense_budget_s=0.5,
            store_size=40,
            store_writer="loralens",
            store_base={
                **TINY_BASE,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "num_key_value_heads": 2,
            },
            train_epochs=1,
            isolate=False,
            threads=1,  # tiny ops: no thread hand-offs, stable on a busy CI machine
            floor_bytes=16 * 2**20,
            gemm_n=256,
            hparams={"glnet": {"hidden": 8}},
        )
        base.update(kw)
        return cls(**base)


def _model_hparams(cfg: Config) -> dict[str, dict[str, Any]]:
    hp = {k: dict(v) for k, v in cfg.hparams.items()}
    hp.setdefault("mlp-dense", {}).setdefault("max_gib", cfg.dense_max_gib)
    return hp


def _run_models_shape(cfg: Config, shape: tuple[str, int, int], floors: Floors) -> list[ModelRow]:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return bench_models_for_shape(
        shape,
        models=cfg.models,
        batch_sizes=cfg.batch_sizes,
        floors=floors,
        device=torch.device(cfg.device),
        dtype=DTYPES[cfg.dtype],
        budget_s=cfg.budget_s,
        hparams=_model_hparams(cfg),
        collect=cfg.isolate,
    )


def _isolated(cfg: Config, shape: tuple[str, int, int], floors: Floors) -> list[ModelRow]:
    """Run one shape's rows in a fresh interpreter, so peak memory is that shape's alone."""
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))  # freed big blocks go back to the OS
    job = json.dumps({"config": asdict(cfg), "shape": list(shape), "floors": asdict(floors)})
    proc = subprocess.run(
        [sys.executable, "-c", "from loralens.bench.speed import _worker; _worker()"],
        input=job,
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        tail = (proc.stderr or "").strip().splitlines()[-3:]
        label, layers, width = shape
        return [
            ModelRow(label, layers, width, B, m, status="failed", note=" | ".join(tail)[:300])
            for B in cfg.batch_sizes
            for m in cfg.models
        ]
    return [ModelRow(**r) for r in json.loads(proc.stdout.strip().splitlines()[-1])]


def _worker() -> None:
    job = json.loads(sys.stdin.read())
    raw = job["config"]
    raw = {k: tuple(map(tuple, v)) if k == "shapes" else v for k, v in raw.items()}
    cfg = Config(**raw)
    rows = _run_models_shape(cfg, tuple(job["shape"]), Floors(**job["floors"]))
    print(json.dumps([asdict(r) for r in rows]))


def run(cfg: Config, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the selected parts; returns a JSON-able dict (see :func:`to_markdown`)."""
    threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, log)
    finally:
        torch.set_num_threads(threads)


def _run(cfg: Config, log: Callable[[str], None]) -> dict[str, Any]:
    device, dtype = torch.device(cfg.device), DTYPES[cfg.dtype]
    work = Path(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {
        "config": asdict(cfg),
        "machine": machine_info(device),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
    }
    t_start = time.perf_counter()
    floors = measure_floors(device, dtype, nbytes=cfg.floor_bytes, gemm_n=cfg.gemm_n)
    out["floors"] = asdict(floors)
    log(
        f"floors: read {floors.read_gbps:.1f} GB/s, copy {floors.copy_gbps:.1f} GB/s, "
        f"matmul {floors.matmul_gflops:.0f} GFLOP/s ({cfg.dtype}, {cfg.device})"
    )
    if "models" in cfg.parts:
        rows: list[ModelRow] = []
        for shape in cfg.shapes:
            t0 = time.perf_counter()
            got = (
                _isolated(cfg, shape, floors)
                if cfg.isolate
                else _run_models_shape(cfg, shape, floors)
            )
            rows += got
            log(f"models {shape[0]} ({shape[1]} x {shape[2]}): {time.perf_counter() - t0:.0f} s")
        out["models"] = [
            {
                **asdict(r),
                "forward_x_floor": r.forward_x_floor,
                "featurize_x_floor": r.featurize_x_floor,
                "forward_cpu_x_floor": r.forward_cpu_x_floor,
                "featurize_cpu_x_floor": r.featurize_cpu_x_floor,
            }
            for r in rows
        ]
    if "svals" in cfg.parts:
        out["svals"] = []
        for shape in cfg.shapes:
            r = bench_svals(
                shape,
                floors,
                device=device,
                dtype=dtype,
                budget_s=cfg.budget_s,
                dense_budget_s=cfg.dense_budget_s,
            )
            out["svals"].append(asdict(r))
            log(f"svals {shape[0]}: qr {r.qr_s * 1e3:.2f} ms, dense/qr {r.ratio}")
    if "store" in cfg.parts or "train" in cfg.parts:
        tag = f"{cfg.store_size}-{cfg.store_base['num_hidden_layers']}x{cfg.store_base['hidden_size']}"
        adapters = make_peft_adapters(
            work / f"peft-{tag}", cfg.store_size, base=cfg.store_base, writer=cfg.store_writer
        )
        store_path = work / f"store-{tag}"
        if "store" in cfg.parts or not (store_path / "store.json").is_file():
            srows, info = bench_store(
                adapters, store_path, repeats=1 if cfg.store_size < 100 else 2
            )
            out["store"] = {"rows": [asdict(r) for r in srows], "info": info}
            log(
                "store: "
                + ", ".join(f"{r.cache} {r.source[:6]} {r.loras_per_s:.0f}/s" for r in srows)
            )
        if "train" in cfg.parts:
            trows = bench_train(
                store_path,
                models=cfg.train_models,
                epochs=cfg.train_epochs,
                hparams=_model_hparams(cfg),
            )
            out["train"] = [asdict(r) for r in trows]
            log("train: " + ", ".join(f"{r.model} {r.loras_per_s:.0f}/s" for r in trows))
    out["floors_at_end"] = asdict(
        measure_floors(device, dtype, nbytes=cfg.floor_bytes, gemm_n=cfg.gemm_n)
    )
    out["seconds"] = time.perf_counter() - t_start
    return out


# --------------------------------------------------------------------------- report


def _t(s: float | None) -> str:
    if s is None:
        return "-"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.0f} µs"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}x"


def _mib(v: float | None) -> str:
    return "-" if v is None else (f"{v / 1024:.2f} GiB" if v >= 1024 else f"{v:.0f} MiB")


def to_markdown(res: dict[str, Any]) -> str:
    """The report of :func:`run` as markdown tables."""
    cfg, m, f = res["config"], res["machine"], res["floors"]
    lines = [
        f"Machine: {m.get('cpu')}, {m.get('cores')} cores, {m.get('threads')} torch threads, "
        f"{m.get('ram_gib')} GiB RAM{', ' + m['gpu'] if 'gpu' in m else ''}; Python "
        f"{m.get('python')}, torch {m.get('torch')}; fused C kernel "
        f"{'on' if m.get('fused_kernel') else 'off (BLAS)'}; device {cfg['device']}, {cfg['dtype']}; "
        f"load average at start {' '.join(m.get('loadavg_at_start', []))}; started "
        f"{res.get('started')}, took {res.get('seconds', 0):.0f} s.",
        "",
        f"Floors measured in this run: read bandwidth {f['read_gbps']:.1f} GB/s (sum of "
        f"{f['bytes_used'] >> 20} MiB), copy {f['copy_gbps']:.1f} GB/s (read + write), matmul "
        f"{f['matmul_gflops']:.0f} GFLOP/s ({f['gemm_n']}^3 GEMM)"
        + (
            f"; per CPU-second: read {f['read_gbps_cpu']:.1f} GB/s, matmul "
            f"{f['matmul_gflops_cpu']:.0f} GFLOP/s."
            if f.get("read_gbps_cpu")
            else "."
        )
        + (
            f" Again at the end: {res['floors_at_end']['read_gbps']:.1f} GB/s, "
            f"{res['floors_at_end']['matmul_gflops']:.0f} GFLOP/s."
            if "floors_at_end" in res
            else ""
        ),
        "",
    ]
    if "models" in res:
        lines += [
            "Per LoRA (time of one call on a batch / batch size; best call), as wall / CPU time "
            "(CPU time: what the call cost the process, free of waiting for a shared core). "
            "x floor = time / max(bytes / bandwidth, FLOPs / matmul rate), wall over the wall "
            "floors / CPU over the CPU-time floors. Forward is the model's whole forward, "
            "featurization included. Peak = resident memory the model build + one featurize + "
            "forward added (parameters, features, activations; not the input).",
            "",
        ]
        for B in cfg["batch_sizes"]:
            lines += [
                f"Batch size {B}:",
                "",
                "| shape (L x width) | input/LoRA | model | featurize wall / CPU | x floor "
                "| forward wall / CPU | x floor | params | peak | note |",
                "|---|---|---|---|---|---|---|---|---|---|",
            ]
            for r in (r for r in res["models"] if r["batch_size"] == B):
                shape = f"{r['shape']} ({r['layers']} x {r['width']})"
                feat = (
                    f"{r['featurizer']}: {_t(r['featurize_s'])} / {_t(r['featurize_cpu_s'])}"
                    if r["featurizer"]
                    else "-"
                )
                if r["status"] != "ok":
                    lines.append(
                        f"| {shape} | {_mib(r['input_mib'])} | {r['model']} | - | - | - | - | - "
                        f"| - | **{r['status']}**: {r['note']} |"
                    )
                    continue
                lines.append(
                    f"| {shape} | {_mib(r['input_mib'])} | {r['model']} | {feat} "
                    f"| {_x(r['featurize_x_floor'])} / {_x(r['featurize_cpu_x_floor'])} "
                    f"| {_t(r['forward_s'])} / {_t(r['forward_cpu_s'])} "
                    f"| {_x(r['forward_x_floor'])} / {_x(r['forward_cpu_x_floor'])} "
                    f"| {_mib(r['param_mib'])} "
                    f"| {_mib(r['peak_mib'])} | {r['note']} |"
                )
            lines.append("")
    if "svals" in res:
        lines += [
            "Singular values of every delta W of one LoRA: the featurizer's factor route (Grams, QR where ill-conditioned) vs "
            "torch.linalg.svdvals of the dense U V^T.",
            "",
            "| shape | factor route wall / CPU | x floor wall / CPU | dense svdvals wall / CPU "
            "| dense / factor route wall / CPU | max rel. diff | note |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in res["svals"]:
            err = "-" if r["max_rel_err"] is None else f"{r['max_rel_err']:.1e}"
            ratio = "-" if r["ratio"] is None else f"{r['ratio']:,.0f}x"
            ratio_cpu = "-" if r.get("ratio_cpu") is None else f"{r['ratio_cpu']:,.0f}x"
            lines.append(
                f"| {r['shape']} ({r['layers']} x {r['width']}) "
                f"| {_t(r['qr_s'])} / {_t(r.get('qr_cpu_s'))} "
                f"| {_x(r['qr_x_floor'])} / {_x(r.get('qr_cpu_x_floor'))} "
                f"| {_t(r['dense_s'])} / {_t(r.get('dense_cpu_s'))} | {ratio} / {ratio_cpu} "
                f"| {err} | {r['note']} |"
            )
        lines.append("")
    if "store" in res:
        info = res["store"]["info"]
        lines += [
            f"Reading {info['loras']} PEFT LoRAs ({info['layers']} layers, "
            f"{info['payload_bytes'] / info['loras'] / 1024:.0f} KiB of float32 U, V each) as "
            f"batches of {info['batch_size']}; cold = files evicted from the page cache with "
            f"posix_fadvise(DONTNEED) first. Packing them took {info['pack_s']:.1f} s.",
            "",
            "| source | page cache | LoRAs/s | GB/s | CPU s | files | store / PEFT (wall) "
            "| (CPU) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in res["store"]["rows"]:
            sp = "-" if r["speedup"] is None else f"**{r['speedup']:.0f}x**"
            spc = "-" if r.get("speedup_cpu") is None else f"{r['speedup_cpu']:.0f}x"
            lines.append(
                f"| {r['source']} | {r['cache']} | {r['loras_per_s']:,.0f} | "
                f"{r['gb_per_s']:.2f} | {_t(r.get('cpu_s'))} | {_mib(r['file_bytes'] / 2**20)} "
                f"| {sp} | {spc} |"
            )
        lines.append("")
    if "train" in res:
        lines += [
            "Training (loralens.train.train, AdamW, its default batch size per model): LoRAs/s "
            "per epoch (median over epochs), and the same DataLoader timed alone over the same "
            "rows.",
            "",
            "| model | LoRAs/epoch | epoch | LoRAs/s | loader alone | loader share | step "
            "(rest) | note |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in res["train"]:
            if r["status"] != "ok":
                lines.append(f"| {r['model']} | - | - | - | - | - | - | {r['note']} |")
                continue
            lines.append(
                f"| {r['model']} | {r['loras']} | {_t(r['epoch_s'])} | {r['loras_per_s']:,.0f} "
                f"| {_t(r['loader_s'])} | {100 * r['loader_share']:.0f}% | {_t(r['step_s'])} "
                f"| {r['note']} |"
            )
        lines.append("")
    return "\n".join(lines)
