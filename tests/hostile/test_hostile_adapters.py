"""Every hostile adapter in the corpus through every entry point that reads adapters: a clear
error naming the file (exit code 1), no code run, no hang, nothing written outside the output."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import corpus
import loralens as ll
from loralens.cli import app
from loralens.store import LoRAStore

runner = CliRunner()
CASES = sorted(set(corpus.ADAPTERS) - corpus.VALID)
VALID = sorted(corpus.VALID)


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def hostile(request, tmp_path, monkeypatch):
    """(root, path of the hostile adapter): the working directory is the root, so a stray
    write would show up in the tree check."""
    monkeypatch.chdir(tmp_path)
    path = corpus.ADAPTERS[request.param](tmp_path)
    return tmp_path, path


def _check(res, root: Path, path: Path, before: set[str], allowed: str | None = None) -> None:
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    assert path.name.removesuffix(".safetensors") in res.output, res.output
    assert not (root / corpus.MARKER).exists(), "a payload ran"
    new = {p for p in _tree(root) - before if not (allowed and p.startswith(allowed))}
    assert not new, f"files written outside the output: {sorted(new)}"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("hostile", CASES, indirect=True)
def test_load_lora_refuses_with_the_file_named(hostile):
    root, path = hostile
    with pytest.raises(ll.LoRAFormatError) as info:
        ll.load_lora(path)
    assert path.name in str(info.value)
    assert not (root / corpus.MARKER).exists()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("hostile", CASES, indirect=True)
def test_inspect_refuses_with_the_file_named(hostile):
    root, path = hostile
    before = _tree(root)
    _check(runner.invoke(app, ["inspect", str(path)]), root, path, before)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("hostile", CASES, indirect=True)
def test_pack_refuses_it_and_skip_bad_packs_the_rest(hostile):
    root, path = hostile
    folder = root / "in"
    folder.mkdir()
    os.rename(path, folder / path.name)
    path = folder / path.name
    corpus.good_peft(folder / "good")
    stem = path.name.removesuffix(".safetensors")
    (root / "labels.csv").write_text(f"adapter,y\ngood,1\n{stem},2\n")
    before = _tree(root)
    args = ["pack", str(folder), "--labels", str(root / "labels.csv"), "--out", str(root / "s")]
    res = runner.invoke(app, args)
    _check(res, root, path, before)
    res = runner.invoke(app, [*args, "--skip-bad"])
    assert res.exit_code == 0, res.output
    assert stem in res.output and not (root / corpus.MARKER).exists()
    assert len(LoRAStore(root / "s")) == 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("hostile", CASES, indirect=True)
def test_predict_refuses_it_and_writes_nothing(hostile, run_dir):
    root, path = hostile
    before = _tree(root)
    _check(runner.invoke(app, ["predict", str(run_dir), str(path), "--json"]), root, path, before)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("hostile", VALID, indirect=True)
def test_hostile_but_valid_adapters_read_correctly(hostile, run_dir):
    _root, path = hostile
    lora, good = ll.load_lora(path), corpus.good_lora()
    for name, delta in good.delta_weights().items():
        torch.testing.assert_close(lora.delta_weights()[name], delta, rtol=1e-5, atol=1e-6)
    for args in (["inspect", str(path)], ["predict", str(run_dir), str(path), "--json"]):
        res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output
