"""The speed benchmark's configuration and run: the selected parts, each model shape in a process
of its own (so its peak memory is its own), one JSON-able result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from speedbench.measure import Floors, machine_info, measure_floors
from speedbench.models import MODELS, ModelRow, bench_models_for_shape
from speedbench.shapes import GPT3_SHAPES, QUICK_SHAPES
from speedbench.store import TINY_BASE, bench_store, make_peft_adapters
from speedbench.svals import bench_svals
from speedbench.train import bench_train

PARTS: tuple[str, ...] = ("floors", "models", "svals", "store", "train")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


# the worker process imports this package from benchmarks/, wherever it is started
_WORKER = (
    f"import sys; sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r}); "
    "from speedbench.harness import _worker; _worker()"
)


def _isolated(cfg: Config, shape: tuple[str, int, int], floors: Floors) -> list[ModelRow]:
    """Run one shape's rows in a fresh interpreter, so peak memory is that shape's alone."""
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))  # freed big blocks go back to the OS
    job = json.dumps({"config": asdict(cfg), "shape": list(shape), "floors": asdict(floors)})
    proc = subprocess.run(
        [sys.executable, "-c", _WORKER],
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
