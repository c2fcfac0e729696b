"""Inputs that used to hang load_lora (catastrophic patterns, FIFOs): each is read in a child
process with a time limit, so a regression fails here instead of hanging the suite."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from helpers import peft_tensors, write_peft_adapter

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs (POSIX)")

_RUNNER = r"""
import json, sys, time, warnings
warnings.simplefilter("ignore")
import loralens as ll
for path in sys.argv[1:]:
    print(json.dumps({"start": path}), flush=True)
    t = time.perf_counter()
    try:
        lora = ll.load_lora(path)
        out = {"loaded": lora.names, "scales": [la.meta["scale"] for la in lora.layers]}
    except ll.LoRAFormatError as e:
        out = {"error": str(e)}
    print(json.dumps({"path": path, "seconds": time.perf_counter() - t, **out}), flush=True)
"""


def load_bounded(paths, timeout: float = 30) -> dict[str, dict]:
    """load_lora on each path in one child process; fails naming the input that hung."""
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _RUNNER, *map(str, paths)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:
        out = e.stdout or ""
        lines = (out.decode() if isinstance(out, bytes) else out).splitlines()
        started = [json.loads(ln)["start"] for ln in lines if '"start"' in ln]
        pytest.fail(f"load_lora still running after {timeout} s on {started[-1:] or paths[:1]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(ln) for ln in proc.stdout.splitlines() if '"path"' in ln]
    return {r["path"]: r for r in results}


def _module(name: str) -> dict[str, torch.Tensor]:
    return peft_tensors(modules=[name])


def test_catastrophic_patterns_are_refused_in_bounded_time(tmp_path):
    long_name = "model.layers.0.self_attn." + "a" * 200 + ".q_proj"
    # the pattern: Python's re (which PEFT uses) never returns on it, whatever the name;
    # it matches no name, so PEFT's rule gives every module the default r and lora_alpha
    nested = {
        "rank": write_peft_adapter(
            tmp_path / "rank", _module(long_name), {"rank_pattern": {"(.*.*)*X": 4}}
        ),
        "alpha": write_peft_adapter(
            tmp_path / "alpha", _module(long_name), {"alpha_pattern": {"(.*.*)*X": 8}}
        ),
        "after_a_match": write_peft_adapter(
            tmp_path / "after", _module(long_name), {"alpha_pattern": {"q_proj": 6, "(.*.*)*X": 8}}
        ),
    }
    # exponential even for the regex engine: a run of 60 a's, then a mismatch
    alternation = write_peft_adapter(
        tmp_path / "alternation", _module("a" * 60 + "!"), {"alpha_pattern": {"(a|aa)*": 4}}
    )
    results = load_bounded([*nested.values(), alternation])
    for case, path in nested.items():
        r = results[str(path)]
        assert r.get("loaded") == [long_name], r
        assert r["scales"] == [3.0 if case == "after_a_match" else 2.0], r  # alpha / r
    r = results[str(alternation)]
    assert r.get("error", "").startswith(
        f"{alternation / 'adapter_config.json'}: alpha_pattern key '(a|aa)*' took"
    ), r
    assert "catastrophic" in r["error"], r
    assert r["seconds"] < 5, r


def test_fifos_are_never_opened(tmp_path):
    """A FIFO anywhere a file is expected: refused by name, never opened (opening one for
    reading blocks until a writer comes)."""
    kohya = {"lora_unet_a.lora_down.weight": torch.randn(2, 4)}
    kohya["lora_unet_a.lora_up.weight"] = torch.randn(4, 2)
    as_path = tmp_path / "pipe.safetensors"
    os.mkfifo(as_path)
    as_bin = tmp_path / "pipe.bin"
    os.mkfifo(as_bin)
    weights = write_peft_adapter(tmp_path / "weights")
    (weights / "adapter_model.safetensors").unlink()
    os.mkfifo(weights / "adapter_model.safetensors")
    config = write_peft_adapter(tmp_path / "config")
    (config / "adapter_config.json").unlink()
    os.mkfifo(config / "adapter_config.json")
    only_fifo = tmp_path / "only_fifo"
    only_fifo.mkdir()
    os.mkfifo(only_fifo / "lora.safetensors")
    beside = tmp_path / "beside"
    beside.mkdir()
    os.mkfifo(beside / "a.safetensors")
    save_file(kohya, beside / "b.safetensors")
    refused = {
        as_path: as_path,
        as_bin: as_bin,
        weights: weights / "adapter_model.safetensors",
        config: config / "adapter_config.json",
        config / "adapter_config.json": config / "adapter_config.json",
        weights / "adapter_model.safetensors": weights / "adapter_model.safetensors",
    }
    results = load_bounded([*refused, only_fifo, beside])
    for given, named in refused.items():
        r = results[str(given)]
        assert r.get("error", "").startswith(f"{named}: is a named pipe"), r
        assert "regular file" in r["error"], r
    assert "holds no LoRA" in results[str(only_fifo)]["error"]  # the folder scan skips it
    assert results[str(beside)]["loaded"] == ["lora_unet_a"]  # and takes the real file


def test_device_files_are_refused(tmp_path):
    link = tmp_path / "zero.safetensors"
    link.symlink_to("/dev/zero")
    if not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero")
    r = load_bounded([link])[str(link)]
    assert r["error"] == f"{link}: is a character device, not a regular file; " + (
        "loralens opens regular files only"
    )
