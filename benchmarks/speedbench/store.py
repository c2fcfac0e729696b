"""Reading adapters: PEFT folders against the packed store, cold and warm page cache."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import loralens as ll
from loralens.store import LoRAStore, pack
from speedbench.measure import tensor_bytes

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
