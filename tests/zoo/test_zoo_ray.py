"""Zoo builds on a local Ray (2 CPUs, loopback, started and stopped here): the same zoo, byte for
byte, as a plain build with the same seed; a worker killed mid-task is retried and nothing is lost
or duplicated; a task that fails is one line and the zoo keeps the rest; a killed driver resumes;
a GPU request the cluster cannot meet is refused before anything runs; without Ray, --ray says
how to install it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
from ray_presets import MARKER, ExitOnceSkillsLM, FailingSkillsLM
from typer.testing import CliRunner

from helpers import start_local_ray, tiny_skills, zoo_rows
from loralens.cli import app
from loralens.raycluster import TasksFailed
from loralens.zoo.ray_build import build_zoo_ray

pytestmark = pytest.mark.slow

# one LoRA at a time (slots=1), 4 per task: 2 tasks for 6 LoRAs, running at once on 2 CPUs
TINY = tiny_skills(1)
NUM = 6
ALL = [f"{i:06d}" for i in range(NUM)]
RECIPE = f"options={TINY!r}, ranks=(2, 4), progress=False, threads=1"
HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def cluster():
    """A Ray of 2 CPUs on loopback whose workers import tests/zoo (for :mod:`ray_presets`)."""
    yield start_local_ray(HERE)
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """A plain build (no Ray), in a process with the workers' PYTHONHASHSEED."""
    out = tmp_path_factory.mktemp("ray") / "reference"
    code = (
        f"from loralens.zoo import build_zoo; build_zoo('skills-lm', {NUM}, {str(out)!r}, {RECIPE})"
    )
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, stderr=subprocess.DEVNULL)
    return out


def _entries(zoo: Path) -> list[str]:
    return sorted(p.name for p in (zoo / "adapters").iterdir())


def _assert_same_zoo(zoo: Path, reference: Path) -> None:
    """Every LoRA exactly once, no leftovers, the same bytes and the same labels.csv."""
    assert _entries(zoo) == _entries(reference) == ALL
    for aid in ALL:
        got = {p.name: p.read_bytes() for p in sorted((zoo / "adapters" / aid).iterdir())}
        want = {p.name: p.read_bytes() for p in sorted((reference / "adapters" / aid).iterdir())}
        assert got == want, aid
    assert _rows(zoo) == _rows(reference)


def _rows(zoo: Path) -> dict[str, dict[str, str]]:
    """labels.csv as id -> row (exact strings); each adapter's row once (the plain build
    appends rows in the order LoRAs finish, the Ray build rewrites them sorted)."""
    rows = zoo_rows(zoo)
    assert sorted(r["adapter"] for r in rows) == ALL
    return {r["adapter"]: r for r in rows}


def test_cli_ray_build_equals_plain_build(cluster, reference, tmp_path):
    out = tmp_path / "zoo"
    args = ["zoo", "build", "--out", str(out), "--num", str(NUM), "--ranks", "2,4", "--quiet"]
    args += [a for k, v in TINY.items() for a in ("-o", f"{k}={v}")]
    res = CliRunner().invoke(app, [*args, "--ray", "local"])
    assert res.exit_code == 0, res.output
    assert res.output == ""  # --quiet
    _assert_same_zoo(out, reference)


def test_worker_killed_mid_task_is_retried(cluster, reference, tmp_path):
    out = tmp_path / "zoo"
    build_zoo_ray(ExitOnceSkillsLM(), NUM, out, options=TINY, ranks=(2, 4), quiet=True)
    assert (out / MARKER).exists()  # the first attempt died after committing 000001
    (out / MARKER).unlink()
    _assert_same_zoo(out, reference)


def test_a_failing_task_is_one_line_and_the_zoo_keeps_the_rest(cluster, reference, tmp_path):
    out = tmp_path / "zoo"
    with pytest.raises(TasksFailed) as err:
        build_zoo_ray(FailingSkillsLM(), NUM, out, options=TINY, ranks=(2, 4), quiet=True)
    head, *lines = str(err.value).splitlines()
    assert (
        head
        == f"ray: 1 of 2 tasks failed; {out} keeps its 4 finished LoRAs and the same command resumes it"
    )
    assert lines == ["LoRAs 000004, 000005: RuntimeError: planted failure of LoRA 000005"]
    assert _entries(out) == ALL[:4]
    assert len((out / "labels.csv").read_text().splitlines()) == 1 + 4

    build_zoo_ray("skills-lm", NUM, out, options=TINY, ranks=(2, 4), quiet=True)  # resumes
    _assert_same_zoo(out, reference)


def test_a_gpu_request_the_cluster_cannot_meet_is_refused_first(cluster, tmp_path):
    out = tmp_path / "z"
    args = ["zoo", "build", "--out", str(out), "--ray", "local", "--ray-gpus", "1"]
    res = CliRunner().invoke(app, [*args, "--preset", "skills-lm"])
    assert res.exit_code == 2 and "skills-lm trains on the CPU only" in res.output
    res = CliRunner().invoke(app, [*args, "--preset", "causal-lm"])
    assert res.exit_code == 1
    assert "--ray-gpus: each task asks for 1 GPU but the cluster has no GPU" in res.output
    res = CliRunner().invoke(app, [*args[:4], "--ray-gpus", "0.5", "--preset", "causal-lm"])
    assert res.exit_code == 2 and "give --ray too" in res.output
    res = CliRunner().invoke(app, [*args[:4], "--ray", "local", "--threads", "3"])
    assert res.exit_code == 1
    assert "--threads: each task asks for 3 CPU and 0 GPU, more than any node" in res.output
    assert not out.exists()


def test_killed_driver_resumes(cluster, reference, tmp_path):
    out = tmp_path / "zoo"
    code = (
        "from loralens.zoo.ray_build import build_zoo_ray; "
        f"build_zoo_ray('skills-lm', {NUM}, {str(out)!r}, address={cluster!r}, quiet=True, "
        f"options={TINY!r}, ranks=(2, 4))"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            adir = out / "adapters"
            if adir.is_dir() and len([p for p in adir.iterdir() if p.name[0] != "."]) >= 2:
                break
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert 2 <= len([p for p in (out / "adapters").iterdir() if p.name[0] != "."]) < NUM

    manifest = build_zoo_ray("skills-lm", NUM, out, options=TINY, ranks=(2, 4), quiet=True)
    assert manifest["summary"]
    _assert_same_zoo(out, reference)


def test_ray_flag_without_ray_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    res = CliRunner().invoke(app, ["zoo", "build", "--out", str(tmp_path / "z"), "--ray", "local"])
    assert res.exit_code != 0
    assert "pip install 'loralens[ray]'" in res.output
    assert not (tmp_path / "z").exists()
