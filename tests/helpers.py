"""Helpers shared by several test files (tests/ is on sys.path through tests/conftest.py)."""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

import loralens as ll
from loralens.store import LoRAStore, write_store

#: Delta-W shapes (out, in) of the small three-layer LoRAs the store tests use.
STORE_SHAPES = ((6, 5), (4, 7), (6, 5))


def random_lora(
    ranks, shapes, seed=0, dtype=torch.float64, scale=1e-2, v_scale=None, prefix="l"
) -> ll.LoRA:
    """A random LoRA with layers <prefix>0, <prefix>1, ...: U ~ scale N(0, 1), V ~ v_scale N(0, 1)
    (default: scale), drawn from ``seed`` layer by layer (U, then V)."""
    g = torch.Generator().manual_seed(seed)
    v_scale = scale if v_scale is None else v_scale
    return ll.LoRA(
        layers=[
            ll.LoRALayer(
                f"{prefix}{i}",
                torch.randn(o, r, generator=g, dtype=dtype) * scale,
                torch.randn(n, r, generator=g, dtype=dtype) * v_scale,
            )
            for i, ((o, n), r) in enumerate(zip(shapes, ranks))
        ]
    )


def store_lora(
    ranks: Sequence[int], seed: int, shapes: Sequence[tuple[int, int]] = STORE_SHAPES
) -> ll.LoRA:
    """A float32 LoRA with layers ``blk.<i>`` of these shapes, unit-scale factors from ``seed``."""
    return random_lora(ranks, shapes, seed, dtype=torch.float32, scale=1.0, prefix="blk.")


def store_items(
    n: int, ranks: Callable[[int], Sequence[int]] = lambda k: [2, 3, 1] if k % 3 else [4, 1, 2]
) -> list[tuple[str, ll.LoRA, dict]]:
    """``n`` (id, LoRA, labels) items for ``write_store``: ids a<k>, labels y = k/2, flag = k%2.

    tests/data/store-v1 holds the first five of these: keep the draws as they are."""
    return [(f"a{k}", store_lora(ranks(k), k), {"y": k * 0.5, "flag": k % 2}) for k in range(n)]


#: Delta-W shapes of :func:`linear_zoo`'s LoRAs.
LINEAR_SHAPES = ((8, 6), (5, 6))


def linear_zoo(
    path: Path,
    n: int,
    seed: int,
    noise: float = 0.3,
    extra: Callable[[int, float], dict] | None = None,
) -> LoRAStore:
    """A store of ``n`` rank-2 LoRAs whose label ``y`` is a fixed linear function of ΔW (signal
    std about 1, the same for every ``seed``) plus N(0, noise²), and ``c`` = 1 where ``y`` > 0;
    ``extra(k, y)`` adds label columns to the k-th LoRA (a split column)."""
    g = torch.Generator().manual_seed(seed)
    a = [torch.randn(o, i, generator=torch.Generator().manual_seed(7)) for o, i in LINEAR_SHAPES]
    items = []
    for k in range(n):
        layers = [
            ll.LoRALayer(
                f"h.{j}.attn", torch.randn(o, 2, generator=g), torch.randn(i, 2, generator=g)
            )
            for j, (o, i) in enumerate(LINEAR_SHAPES)
        ]
        signal = sum(float((w * x.delta_weight()).sum()) for w, x in zip(a, layers)) / 24.0
        y = signal + noise * float(torch.randn(1, generator=g))
        labels = {"y": y, "c": int(y > 0), **(extra(k, y) if extra else {})}
        items.append((f"s{seed}-{k:03d}", ll.LoRA(layers), labels))
    return write_store(path, items)


def seeded_randn(*shape, seed=0, dtype=torch.float32) -> torch.Tensor:
    """N(0, 1) entries drawn in float32 from ``seed``, then cast to ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def assert_close_f32(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal to float32 round-off (rtol 1e-5, atol 1e-6)."""
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


#: Module paths of the small PEFT adapters :func:`write_peft_adapter` writes (in x out 8 x 6).
PEFT_MODULES = ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj")


def peft_tensors(
    rank: int = 2, modules: Sequence[str] = PEFT_MODULES, dtype=torch.float32, seed: int = 0
) -> dict[str, torch.Tensor]:
    """lora_A (rank x 8) and lora_B (6 x rank) tensors of ``modules``, PEFT-keyed, N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in modules:
        out[f"base_model.model.{m}.lora_A.weight"] = torch.randn(rank, 8, generator=g).to(dtype)
        out[f"base_model.model.{m}.lora_B.weight"] = torch.randn(6, rank, generator=g).to(dtype)
    return out


def write_peft_adapter(folder, tensors=None, config=None, *, config_text: str | None = None):
    """A PEFT adapter folder: ``tensors`` (default :func:`peft_tensors`) in
    adapter_model.safetensors, and adapter_config.json holding ``config_text`` as is, or
    ``config`` over {peft_type LORA, r 2, lora_alpha 4} (json.dumps writes NaN as NaN)."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(peft_tensors() if tensors is None else tensors, folder / "adapter_model.safetensors")
    if config_text is None:
        config_text = json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, **(config or {})})
    (folder / "adapter_config.json").write_text(config_text)
    return folder


def tiny_skills(slots: int) -> dict:
    """skills-lm options for tests: a tiny base, few examples, ``slots`` LoRAs trained at once
    (slots=1: a LoRA's bytes then depend on nothing but its own recipe)."""
    return {
        "size": "tiny",
        "ft_per_source": 8,
        "eval_per_source": 3,
        "challenge_per_source": 3,
        "slots": slots,
    }


def tiny_unet(layers_per_block: int = 2):
    """A seeded diffusers UNet2DConditionModel of SD's layout, small enough for a test."""
    import diffusers

    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        block_out_channels=(8, 16),
        layers_per_block=layers_per_block,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        norm_num_groups=4,
        attention_head_dim=2,
    )


def start_local_ray(importable: Path, setup_hook: str | None = None) -> str:
    """Start a Ray of 2 CPUs on loopback for a test module whose workers can import the modules
    in ``importable`` (and run ``setup_hook`` first when given); returns its GCS address."""
    import os

    import ray

    env = {
        "env_vars": {
            "PYTHONPATH": os.pathsep.join([str(importable), os.environ.get("PYTHONPATH", "")])
        }
    }
    if setup_hook:
        env["worker_process_setup_hook"] = setup_hook
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
        logging_level="error",
        runtime_env=env,
    )
    return ray.get_runtime_context().gcs_address


def tiny_llama(layers: int = 2):
    """A seeded Llama of width 16 with ``layers`` layers (q/k/v/o and MLP modules), for PEFT."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=48,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(cfg)


def zoo_rows(zoo: Path) -> list[dict[str, str]]:
    """A zoo's labels.csv as rows of exact strings, in file order."""
    with open(Path(zoo) / "labels.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def older_calibration(run_dir: Path, out: Path, version: int) -> Path:
    """A copy of the run at ``run_dir`` in ``out`` whose calibration files are as an older
    loralens wrote them: without what came after ``version`` (2: the scale score's keys and
    arrays; 3: the span score's; 4: the check's problems)."""
    import json
    import shutil

    from safetensors.numpy import load_file, save_file

    shutil.copytree(run_dir, out)
    keys, arrays = {"span", "span_threshold", "problems"}, ("span",)
    if version < 2:
        keys, arrays = keys | {"size_bias", "size_threshold"}, (*arrays, "size")
    path = out / "calibration.json"
    cal = {k: v for k, v in json.loads(path.read_text()).items() if k not in keys}
    path.write_text(json.dumps({**cal, "version": version}))
    tensors = out / "calibration.safetensors"
    kept = {k: v for k, v in load_file(str(tensors)).items() if not k.startswith(arrays)}
    save_file(kept, str(tensors))
    return out


def wide_peft_adapter(folder, layers: int, width: int, rank: int, *, seed: int = 0) -> Path:
    """A PEFT adapter of ``layers`` ``width`` x ``width`` float16 layers of rank ``rank``
    (N(0, 1) factors, lora_alpha = rank: scale 1)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(layers):
        key = f"base_model.model.model.layers.{i}.self_attn.q_proj"
        tensors[f"{key}.lora_A.weight"] = torch.randn(rank, width, generator=g).half()
        tensors[f"{key}.lora_B.weight"] = torch.randn(width, rank, generator=g).half()
    return write_peft_adapter(folder, tensors, {"r": rank, "lora_alpha": rank})


#: Runs ``setup`` (which defines ``warm()`` and ``run()``, reading ``sys.argv``), then prints
#: how far resident memory rose above its level after ``warm()`` while ``run()`` ran.
_PEAK_PROBE = r"""
import json, sys
{setup}


def _status(field):  # bytes; VmHWM is this process's peak since the last reset
    line = next(ln for ln in open("/proc/self/status") if ln.startswith(field + ":"))
    return int(line.split()[1]) * 1024


warm()
with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the resident size now
    f.write("5")
base = _status("VmRSS")
result = run()
print(json.dumps({{"peak": _status("VmHWM") - base, "result": result}}))
"""

#: glibc tunables: a fixed mmap threshold (a set one no longer slides up after frees), heap
#: tops trimmed at the same size, one arena for every thread. Every block of 64 KiB or more is
#: then mapped on its own and unmapped when freed, so resident size is the memory the code
#: holds, not heap holes glibc keeps for reuse (seen in CI: +48 MiB with the sliding threshold).
EXACT_MALLOC = {
    "MALLOC_MMAP_THRESHOLD_": "65536",
    "MALLOC_TRIM_THRESHOLD_": "65536",
    "MALLOC_ARENA_MAX": "1",
}


def peak_memory(setup: str, *args: object, timeout: float = 120) -> dict:
    """``{"peak": bytes, "result": what run() returned}``: the child's VmHWM over its resident
    size after ``warm()``, reset there (``ru_maxrss`` would not do: Linux keeps the parent's
    peak in it across fork and exec), so imports, thread pools and first-use buffers that the
    warm-up pays for do not count."""
    import json
    import os
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", _PEAK_PROBE.format(setup=setup), *map(str, args)],
        env={**os.environ, **EXACT_MALLOC},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def can_measure_peak_memory() -> bool:
    """Whether this system lets a process reset and read its peak memory (Linux /proc)."""
    import os

    return os.access("/proc/self/clear_refs", os.W_OK)
