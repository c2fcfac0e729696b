"""Measuring on this machine: timed calls, peak memory, bytes and FLOPs of a call, the machine
itself, and its floors (memory bandwidth and matmul rate) measured now."""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from loralens import fused
from loralens.lora import LoRABatch
from loralens.models.registry import custom_flops


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
    with FlopCounterMode(display=False, custom_mapping=custom_flops()) as counter:
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
    info["fused_kernel"] = fused.available()
    return info


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
