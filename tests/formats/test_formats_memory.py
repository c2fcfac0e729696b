"""Reading a LoRA peaks near its float32 result, whatever the file's dtype: tensors are read a
chunk at a time into their float32 destination, never memory-mapped or held narrow whole.

Peak memory is the child's VmHWM, reset after warm-up (``ru_maxrss`` would not do: Linux keeps
the parent's peak in it across fork and exec). The child's allocator maps every block of 64 KiB
or more on its own and unmaps it when freed, so its resident size is the memory the reader holds,
not heap holes glibc keeps for reuse (seen in CI: +48 MiB with glibc's sliding mmap threshold)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import write_peft_adapter

pytestmark = pytest.mark.skipif(
    not os.access("/proc/self/clear_refs", os.W_OK), reason="reads peak memory from Linux /proc"
)

MiB = 2**20

_PROBE = r"""
import json, sys
import torch
import loralens as ll
from loralens.features import describe_layers


def status(field):  # bytes; VmHWM is this process's peak since the last reset
    line = next(ln for ln in open("/proc/self/status") if ln.startswith(field + ":"))
    return int(line.split()[1]) * 1024

# warm-up on one layer like the big file's: lazy imports, torch's thread pool and their memory
describe_layers(ll.load_lora(sys.argv[2]))
with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the resident size now
    f.write("5")
base = status("VmRSS")
lora = ll.load_lora(sys.argv[1])
load = status("VmHWM") - base
describe_layers(lora)
print(json.dumps({
    "load": load, "inspect": status("VmHWM") - base,
    "final": sum(la.U.nbytes + la.V.nbytes for la in lora.layers),
}))
"""


# glibc tunables: a fixed mmap threshold (a set one no longer slides up after frees), heap tops
# trimmed at the same size, one arena for every thread
_EXACT_MALLOC = {
    "MALLOC_MMAP_THRESHOLD_": "65536",
    "MALLOC_TRIM_THRESHOLD_": "65536",
    "MALLOC_ARENA_MAX": "1",
}


def _adapter(folder: Path, layers: int) -> Path:
    """A PEFT adapter of ``layers`` rank-32 8192 x 8192 float16 layers (1 MiB each)."""
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(layers):
        key = f"base_model.model.model.layers.{i}.self_attn.q_proj"
        tensors[f"{key}.lora_A.weight"] = torch.randn(32, 8192, generator=g).half()
        tensors[f"{key}.lora_B.weight"] = torch.randn(8192, 32, generator=g).half()
    return write_peft_adapter(folder, tensors, {"r": 32, "lora_alpha": 16})


def test_inspecting_a_float16_file_peaks_near_its_float32_result(tmp_path):
    """load_lora + describe_layers (what `inspect` runs) on a 64 MiB float16 adapter: resident
    memory grows by at most the 128 MiB float32 LoRA plus 32 MiB (a layer is 2 MiB); reading
    everything first and widening it after would add 64-190 MiB more."""
    big, small = _adapter(tmp_path / "big", 64), _adapter(tmp_path / "small", 1)
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, str(big), str(small)],
        env={**os.environ, **_EXACT_MALLOC},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(proc.stdout.splitlines()[-1])
    assert m["final"] == 128 * MiB
    shown = {k: f"{v / MiB:.1f} MiB" for k, v in m.items()}
    assert m["load"] < m["final"] + 16 * MiB, shown
    assert m["inspect"] < m["final"] + 32 * MiB, shown
