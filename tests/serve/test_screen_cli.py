"""`loralens screen DIR --runs ... --out report.jsonl --html report.html`: every adapter of a
folder screened like an upload, one bad file never stopping the batch, resumable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from serve_support import lora, peft, safetensors_file, zipped
from typer.testing import CliRunner

import loralens as ll
from loralens.cli import app
from loralens.errors import OutputExistsError
from loralens.serve.batch import already_screened, find_adapters

runner = CliRunner()


@pytest.fixture
def mirror(tmp_path) -> Path:
    root = tmp_path / "mirror"
    peft(root / "org" / "peft-a", seed=1)
    (root / "org" / "peft-a" / "nested.safetensors").write_bytes(b"not an adapter of its own")
    safetensors_file(root / "single.safetensors", seed=2)
    (root / "single-folder").rename(tmp_path / "elsewhere")  # the helper's leftover folder
    (root / "zipped.zip").write_bytes(zipped(peft(tmp_path / "z", seed=3)))
    (root / "bad.safetensors").write_bytes(b"\x10" + b"\0" * 7 + b"{broken")
    (root / ".cache").mkdir()
    safetensors_file(root / ".cache" / "hidden.safetensors")
    (root / "notes.txt").write_text("not an adapter")
    return root


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_find_adapters(mirror):
    found = [p.relative_to(mirror).as_posix() for p in find_adapters(mirror)]
    assert found == ["bad.safetensors", "org/peft-a", "single.safetensors", "zipped.zip"]


def test_screen_a_folder_then_resume(mirror, runs, tmp_path):
    out, html = tmp_path / "report.jsonl", tmp_path / "report.html"
    args = ["screen", str(mirror), "--runs", str(runs["reg"]), str(runs["cls"]), "--out", str(out)]
    res = runner.invoke(app, [*args, "--html", str(html)])
    assert res.exit_code == 0, res.output
    assert "4 adapter(s)" in res.output and "4 screened (1 could not be)" in res.output
    by_path = {r["path"]: r for r in _lines(out)}
    assert sorted(by_path) == ["bad.safetensors", "org/peft-a", "single.safetensors", "zipped.zip"]
    assert by_path["bad.safetensors"]["status"] == 422
    assert by_path["bad.safetensors"]["error"].startswith("bad.safetensors:")
    for name in ("org/peft-a", "single.safetensors", "zipped.zip"):
        assert [p["run"] for p in by_path[name]["predictions"]] == ["reg", "cls"], name
        assert all("prediction" in p for p in by_path[name]["predictions"])
    assert str(mirror) not in out.read_text()
    page = html.read_text()
    assert 'id="loralens-report"' in page and "/static/" not in page

    peft(mirror / "org" / "peft-b", seed=4)
    with open(out, "a") as f:
        f.write('{"path": "org/peft-b", "form')  # a line cut short by a kill
    res = runner.invoke(app, [*args])
    assert res.exit_code == 0, res.output
    assert "1 screened (0 could not be), 4 already in" in res.output
    paths = [r["path"] for r in _lines(out)]
    assert len(paths) == 5 and paths[-1] == "org/peft-b"
    res = runner.invoke(app, [*args])
    assert "0 screened" in res.output and len(_lines(out)) == 5


def test_already_screened_drops_a_cut_line(tmp_path):
    out = tmp_path / "r.jsonl"
    out.write_text('{"path": "a"}\n{"path": "b"}\n{"path": "c", "fo')
    assert already_screened(out) == {"a", "b"}
    assert out.read_text() == '{"path": "a"}\n{"path": "b"}\n'
    assert already_screened(tmp_path / "missing.jsonl") == set()


def test_a_file_that_is_not_a_report_is_never_appended_to(tmp_path):
    out = tmp_path / "notes.txt"
    out.write_text('{"path": "a"}\nnot json\n')
    with pytest.raises(OutputExistsError, match=r"notes.txt: line 2 is not a line of a screen"):
        already_screened(out)
    assert out.read_text() == '{"path": "a"}\nnot json\n'


def test_already_screened_drops_the_lines_of_lost_tasks(tmp_path):
    out = tmp_path / "r.jsonl"
    lost = '{"path": "b", "error": "b: not screened, its Ray task failed: X", "status": 503}'
    out.write_text(f'{{"path": "a"}}\n{lost}\n{{"path": "c", "status": 422}}\n{{"path": "d", "fo')
    assert already_screened(out) == {"a", "c"}  # b and the cut d are screened again
    assert out.read_text() == '{"path": "a"}\n{"path": "c", "status": 422}\n'


def test_a_run_that_cannot_load_or_a_missing_folder_is_exit_1(mirror, tmp_path):
    out = str(tmp_path / "r.jsonl")
    res = runner.invoke(app, ["screen", str(mirror), "--runs", str(tmp_path), "--out", out])
    assert res.exit_code == 1 and "not a loralens run" in res.output
    res = runner.invoke(app, ["screen", str(tmp_path / "nope"), "--runs", "x", "--out", out])
    assert res.exit_code == 1 and "not a folder" in res.output


def test_the_summary_marks_flagged_and_misfit_adapters_and_says_what_each_run_is_worth(
    runs, tmp_path
):
    big = lora(seed=3)
    ll.save_lora(
        ll.LoRA([ll.LoRALayer(x.name, x.U * 10, x.V) for x in big.layers]), tmp_path / "m" / "big"
    )
    ll.save_lora(lora(seed=4, width=6), tmp_path / "m" / "narrow")
    args = [
        "screen",
        str(tmp_path / "m"),
        "--runs",
        str(runs["reg"]),
        "--out",
        str(tmp_path / "r.jsonl"),
    ]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "! big: flagged by reg: its update is" in res.output
    assert "! narrow: does not fit reg" in res.output
    assert "1 flagged by a run's fit check, 1 not fitting a run" in res.output
    assert "reg: test R² " in res.output and "intervals covered" in res.output
