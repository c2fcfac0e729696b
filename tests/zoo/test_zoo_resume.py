"""Resuming a zoo build: finished adapters are left as they are, only the missing ones are
trained, the result equals an uninterrupted build, and a resume with another recipe (seed,
options, ranks, preset) is refused without touching the folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from helpers import tiny_skills, zoo_rows
from loralens.cli import app
from loralens.zoo import ZooConflictError, build_zoo
from loralens.zoo.presets.skills_lm import SkillsLM

pytestmark = pytest.mark.slow

# one LoRA at a time (slots=1): a LoRA's bytes then depend on nothing but its own recipe, so a
# resumed zoo can be compared byte for byte with an uninterrupted one
TINY = tiny_skills(1)
KW = {"options": TINY, "ranks": (2, 4), "progress": False, "threads": 1}
NUM = 6
ALL = [f"{i:06d}" for i in range(NUM)]


class Interrupted(Exception):
    """Stands for a crash right after some adapters were committed."""


class RecordingSkillsLM(SkillsLM):
    """skills-lm that records which LoRAs it is asked to train, and crashes (raises
    :class:`Interrupted`) once ``stop_after`` of them are committed."""

    def __init__(self, stop_after: int | None = None) -> None:
        super().__init__()
        self.stop_after = stop_after
        self.trained: list[str] = []
        self.committed = 0

    def train(self, configs, out_dirs, on_done=None):
        self.trained += [Path(d).name.split("-")[1] for d in out_dirs]  # .tmp-<id>-<pid>

        def done(k, labels):
            on_done(k, labels)
            self.committed += 1
            if self.stop_after is not None and self.committed >= self.stop_after:
                raise Interrupted

        return super().train(configs, out_dirs, on_done=done)


def _adapters(zoo: Path) -> list[str]:
    return sorted(p.name for p in (zoo / "adapters").iterdir() if not p.name.startswith("."))


def _rows(zoo: Path) -> dict[str, dict[str, str]]:
    rows = zoo_rows(zoo)
    assert len({r["adapter"] for r in rows}) == len(rows), "duplicate rows in labels.csv"
    return {r["adapter"]: r for r in rows}


def _files(zoo: Path, aid: str) -> dict[str, bytes]:
    adir = zoo / "adapters" / aid
    return {p.name: p.read_bytes() for p in sorted(adir.iterdir())}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The zoo built in one go."""
    out = tmp_path_factory.mktemp("resume") / "reference"
    preset = RecordingSkillsLM()
    build_zoo(preset, NUM, out, **KW)
    assert sorted(preset.trained) == ALL
    return out


def test_resume_keeps_finished_adapters_and_equals_uninterrupted_build(
    reference, tmp_path, file_snapshot
):
    out = tmp_path / "zoo"
    with pytest.raises(Interrupted):
        build_zoo(RecordingSkillsLM(stop_after=2), NUM, out, **KW)
    finished = _adapters(out)
    assert len(finished) == 2
    before = file_snapshot(out, finished)
    assert {f.split("/")[1] for f in before} == set(finished)

    resumed = RecordingSkillsLM()
    build_zoo(resumed, NUM, out, **KW)

    # only the missing LoRAs were trained, and the finished ones were not rewritten
    assert sorted(resumed.trained) == [a for a in ALL if a not in finished]
    assert file_snapshot(out, finished) == before
    # the zoo is the one an uninterrupted build makes: same adapters, same bytes, same labels
    assert _adapters(out) == _adapters(reference) == ALL
    for aid in ALL:
        assert _files(out, aid) == _files(reference, aid), aid
    assert _rows(out) == _rows(reference)


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"seed": 1}, "seed"),
        ({"options": {**TINY, "lr_max": 0.01}}, "options"),
        ({"options": {**TINY, "slots": 2}}, "options"),
        ({"ranks": (4,)}, "ranks"),
        ({"ranks": (2, 4, 8)}, "ranks"),
        ({"preset": "digits-subsets", "options": {"size": "tiny"}}, "preset"),
    ],
)
def test_resume_with_another_recipe_is_refused(reference, tmp_path, file_snapshot, change, key):
    out = tmp_path / "zoo"
    shutil.copytree(reference, out)
    before = file_snapshot(out)
    kwargs = {**KW, **change}
    preset = kwargs.pop("preset", "skills-lm")
    with pytest.raises(ZooConflictError, match=rf"refusing to mix: .*\b{key}: "):
        build_zoo(preset, NUM + 2, out, **kwargs)
    assert file_snapshot(out) == before  # nothing built, nothing rewritten


def test_cli_resume_refuses_another_seed_and_accepts_the_same_recipe(
    reference, tmp_path, file_snapshot
):
    out = tmp_path / "zoo"
    shutil.copytree(reference, out)
    args = ["zoo", "build", "--out", str(out), "--num", str(NUM), "--ranks", "2,4", "--quiet"]
    args += [a for k, v in TINY.items() for a in ("-o", f"{k}={v}")]
    before = file_snapshot(out, ALL)

    res = CliRunner().invoke(app, [*args, "--seed", "1"])
    assert res.exit_code == 3  # made with other settings
    assert "refusing to mix" in res.output and "seed: 0 != 1" in res.output
    # the same recipe, options given as CLI strings: the same zoo, nothing to do
    res = CliRunner().invoke(app, [*args, "--seed", "0"])
    assert res.exit_code == 0, res.output
    assert file_snapshot(out, ALL) == before
