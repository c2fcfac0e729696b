"""The presets' cache entries through `loralens zoo build`: `--quiet` prints nothing (third-party
progress bars included), a clean entry is reused, and a planted pickle, a changed file or an old
pickled entry fails the build (exit 1, the file named) and is never read."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import tiny_skills
from loralens.cache import CacheError
from loralens.zoo.builder import build_zoo
from loralens.zoo.preset import cache_path, get_preset
from loralens.zoo.progress import ProgressBar

pytestmark = pytest.mark.slow

SKILLS = tiny_skills(2)
DIGITS = {"size": "tiny", "group": 2, "sample_steps": 4}


def cli_build(preset: str, out: Path, cache: Path, options: dict, num: int = 2):
    """``loralens zoo build --quiet`` in a fresh process (what a user sees on a terminal)."""
    args = [sys.executable, "-m", "loralens", "zoo", "build", "--preset", preset]
    args += ["--num", str(num), "--out", str(out), "--cache-dir", str(cache), "--ranks", "2"]
    args += [a for k, v in options.items() for a in ("-o", f"{k}={v}")]
    return subprocess.run([*args, "--quiet"], capture_output=True, text=True, timeout=600)


def _flip_byte(f: Path) -> None:
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 1
    f.write_bytes(bytes(data))


def test_skills_lm_quiet_build_prints_nothing_and_refuses_a_changed_base(tmp_path):
    cache = tmp_path / "cache"  # empty: the base is pretrained (its log lines silenced too)
    res = cli_build("skills-lm", tmp_path / "zoo", cache, SKILLS)
    assert res.returncode == 0, res.stderr
    assert (res.stdout, res.stderr) == ("", "")
    (entry,) = cache.iterdir()
    _flip_byte(entry / "model.safetensors")
    res = cli_build("skills-lm", tmp_path / "zoo2", cache, SKILLS)
    assert res.returncode == 1
    assert f"{entry / 'model.safetensors'} has changed since it was written" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "zoo2" / "base").exists()


@pytest.fixture(scope="module")
def digits_entry(loralens_cache) -> Path:
    """The tiny digits base entry in the session cache (built once, shared with other tests)."""
    preset = get_preset("digits-subsets")
    preset.prepare(loralens_cache, 0, preset.options(DIGITS))
    (entry,) = loralens_cache.glob("digits-base-s0-*")
    return entry


def test_digits_cache_entry_is_reused_and_planted_pickles_never_run(
    digits_entry, tmp_path, file_snapshot, plant_pickle
):
    cache = tmp_path / "cache"
    entry = cache_path(cache, "digits-base", 0, {"size": "tiny", "base_steps": 80, "version": 1})
    assert entry.name == digits_entry.name  # the path of the entry is the one of old loralens
    # an entry of an older loralens (a pickled data.pt, no manifest): refused, never read
    entry.mkdir(parents=True)
    plant_pickle(entry / "data.pt", tmp_path / "ran")
    (entry / "info.json").write_text("{}")
    res = cli_build("digits-subsets", tmp_path / "zoo", cache, DIGITS)
    assert res.returncode == 1 and not (tmp_path / "ran").exists()
    assert f"{entry / 'loralens-cache.json'} is missing" in res.stderr
    assert f"Delete the folder {entry} to rebuild it" in res.stderr

    shutil.rmtree(entry)
    shutil.copytree(digits_entry, entry)
    assert not [p for p in entry.rglob("*") if p.suffix in {".pt", ".bin", ".pkl", ".pth"}]
    before = file_snapshot(entry)
    res = cli_build("digits-subsets", tmp_path / "zoo", cache, DIGITS)
    assert res.returncode == 0, res.stderr
    assert (res.stdout, res.stderr) == ("", "")  # no "Loading weights" bars, no log lines
    assert file_snapshot(entry) == before  # reused, not rebuilt or rewritten
    assert [p.name for p in cache.iterdir()] == [entry.name]

    plant_pickle(entry / "data.pt", tmp_path / "ran")
    res = cli_build("digits-subsets", tmp_path / "zoo", cache, DIGITS, num=3)
    assert res.returncode == 1
    assert f"{entry / 'data.pt'} is not a .safetensors or .json file" in res.stderr
    assert not (tmp_path / "ran").exists()
    assert len(list((tmp_path / "zoo" / "adapters").iterdir())) == 2  # nothing built

    (entry / "data.pt").unlink()
    _flip_byte(entry / "data.safetensors")
    with pytest.raises(CacheError, match=r"data\.safetensors has changed since it was written"):
        build_zoo(
            "digits-subsets",
            3,
            tmp_path / "zoo",
            cache_dir=cache,
            options=DIGITS,
            ranks=(2,),
            quiet=True,
        )


def test_progress_bar_shows_eta_only_after_the_first_group():
    import io

    stream = io.StringIO()
    bar = ProgressBar(10, stream=stream, every_s=0, eta_after=4)
    for _ in range(4):
        bar.update()
    lines = stream.getvalue().splitlines()
    assert all("ETA after the first 4 LoRAs" in line for line in lines[:3])
    assert "LoRAs/min" not in "".join(lines[:3])
    assert "LoRAs/min" in lines[3] and "ETA 0:" in lines[3]
    assert "ETA after the first 2" in ProgressBar(2, eta_after=32).line()


def test_pickled_base_model_and_adapter_are_never_loaded(tmp_path, plant_pickle):
    from transformers import LlamaConfig

    from loralens.zoo.digits.model import load_adapter

    base = tmp_path / "base"  # a causal-lm base that ships only a pickled pytorch_model.bin
    base.mkdir()
    LlamaConfig(
        vocab_size=40,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    ).save_pretrained(base)
    plant_pickle(base / "pytorch_model.bin", tmp_path / "ran")
    text = tmp_path / "corpus.txt"
    text.write_text("hello world " * 500)
    opts = {"base_model": str(base), "text_file": str(text)}
    with pytest.raises(ValueError, match=r"--base-model .*model\.safetensors"):
        build_zoo("causal-lm", 2, tmp_path / "zoo", options=opts, quiet=True)
    adapter = tmp_path / "adapter"  # the same for a zoo adapter drawn by `zoo samples`
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    plant_pickle(adapter / "adapter_model.bin", tmp_path / "ran")
    with pytest.raises(FileNotFoundError, match=r"adapter_model\.safetensors"):
        load_adapter(torch.nn.Linear(2, 2), adapter)
    assert not (tmp_path / "ran").exists()
