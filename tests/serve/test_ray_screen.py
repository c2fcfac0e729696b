"""`loralens screen DIR --ray`: on a local Ray (2 CPUs, loopback, started and stopped here) the
same report as the local screen; a worker killed mid-task is retried and its adapter screened
once; a task that always fails becomes its adapter's line (one-line reason, exit 1) and a rerun
screens it again; without Ray, --ray says how to install it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import ray
from ray_faults import killed_marker
from serve_support import peft, safetensors_file, zipped
from typer.testing import CliRunner

from helpers import start_local_ray
from loralens.cli import app
from loralens.serve.batch import LOST, screen_folder
from loralens.serve.ray_screen import screen_folder_ray

pytestmark = pytest.mark.slow
runner = CliRunner()
HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def cluster():
    """A Ray of 2 CPUs on loopback whose workers plant :mod:`ray_faults`."""
    start_local_ray(HERE, setup_hook="ray_faults.plant")
    yield
    ray.shutdown()


def _mirror(root: Path) -> Path:
    """A PEFT folder, a single file, a zip of a PEFT folder and a file that cannot be read."""
    peft(root / "org" / "peft-a", seed=1)
    safetensors_file(root / "single.safetensors", seed=2)
    (root / "single-folder").rename(root.parent / f"{root.name}-leftover")
    (root / "zipped.zip").write_bytes(zipped(peft(root.parent / f"{root.name}-z", seed=3)))
    (root / "bad.safetensors").write_bytes(b"\x10" + b"\0" * 7 + b"{broken")
    return root


def _files(mirror: Path, *names: str) -> Path:
    """``mirror`` holding single-file adapters of these names (and nothing else)."""
    mirror.mkdir()
    for seed, name in enumerate(names):
        made = safetensors_file(mirror.parent / "made" / name, seed=seed)
        made.rename(mirror / name)
    return mirror


def _records(path: Path) -> dict[str, dict]:
    """The report as path -> record without its timing; each path once."""
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    by_path = {r["path"]: r for r in lines}
    assert len(by_path) == len(lines), "a path has two lines"
    for r in by_path.values():
        r.pop("seconds", None)
    return by_path


def test_ray_screen_gives_the_local_report(cluster, runs, tmp_path):
    mirror = _mirror(tmp_path / "mirror")
    run_dirs = [str(runs["reg"]), str(runs["cls"])]
    local, remote = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    screen_folder(mirror, run_dirs, local)
    args = ["screen", str(mirror), "--runs", *run_dirs, "--out", str(remote), "--ray", "local"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "4 screened (1 could not be)" in res.output
    assert _records(remote) == _records(local)
    assert sorted(_records(remote)) == [
        "bad.safetensors",
        "org/peft-a",
        "single.safetensors",
        "zipped.zip",
    ]

    res = runner.invoke(app, args)  # resumes: nothing left to screen
    assert res.exit_code == 0 and "0 screened" in res.output
    assert len(remote.read_text().splitlines()) == 4


def test_worker_killed_mid_task_is_retried(cluster, runs, tmp_path):
    mirror = _files(tmp_path / "mirror", "dies-once.safetensors", "ok.safetensors")
    out = tmp_path / "r.jsonl"
    summary = screen_folder_ray(mirror, [runs["reg"]], out)
    assert killed_marker(mirror / "dies-once.safetensors").exists()  # the first attempt died
    records = _records(out)
    assert sorted(records) == ["dies-once.safetensors", "ok.safetensors"]
    assert summary.screened == 2 and summary.errors == 0 and summary.lost == 0
    for r in records.values():
        assert [p["run"] for p in r["predictions"]] == ["reg"] and "prediction" in r["predictions"][
            0
        ]


def test_a_task_that_always_fails_is_its_line_and_a_rerun_retries_it(cluster, runs, tmp_path):
    mirror = _files(tmp_path / "mirror", "always-fails.safetensors", "ok.safetensors")
    out = tmp_path / "r.jsonl"
    args = ["screen", str(mirror), "--runs", str(runs["reg"]), "--out", str(out), "--ray", "local"]
    for _ in range(2):  # the rerun screens the lost adapter again, and loses it again
        res = runner.invoke(app, args)
        assert res.exit_code == 1, res.output
        records = _records(out)
        assert sorted(records) == ["always-fails.safetensors", "ok.safetensors"]
        lost = records["always-fails.safetensors"]
        assert lost["status"] == LOST
        assert lost["error"] == (
            "always-fails.safetensors: not screened, its Ray task failed: "
            "RuntimeError: planted failure"
        )
        assert lost["error"] in res.output and "second line" not in res.output
        assert "1 adapter(s) not screened" in res.output
        assert "predictions" in records["ok.safetensors"]
    assert "1 screened (1 could not be), 1 already in" in res.output


def test_ray_flag_without_ray_says_how_to_install(runs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    mirror = _files(tmp_path / "mirror", "a.safetensors")
    out = tmp_path / "r.jsonl"
    args = ["screen", str(mirror), "--runs", str(runs["reg"]), "--out", str(out), "--ray", "auto"]
    res = runner.invoke(app, args)
    assert res.exit_code == 1
    assert "pip install 'loralens[ray]'" in res.output
    assert not out.exists()
