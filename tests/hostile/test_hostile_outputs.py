"""Outputs an attacker prepared, and folders to screen that hold traps: links planted where
loralens writes (under the temp names it once used, at the output itself, dangling), named pipes
and folders in an output's place, files that are not loralens's to replace, read-only folders,
options out of range, pipes and links leading out of a screened folder. Each case is a command
run in a bounded child (:mod:`bounded`): an exit code and one line naming the path (or a correct
result), nothing created or changed outside the output, nothing left running."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import corpus
from bounded import Result, changed, run_batch, snapshot
from loralens.search.embed import save_embeddings
from loralens.serve.report import html_report
from loralens.store import write_store

pytestmark = pytest.mark.skipif(
    not (hasattr(os, "mkfifo") and Path("/proc/self/stat").exists()), reason="needs FIFOs, /proc"
)

FIFOS = 200  # named pipes in a screened folder: one worker each would take 200 time limits


@dataclass
class Case:
    """A command and what it must do: exit ``code`` with ``says`` in its output; change
    nothing under its folder but ``may_change``; pass ``check`` (folder, result) if given."""

    args: list[str]
    code: int
    says: str = ""
    may_change: tuple[str, ...] = ()
    check: Callable[[Path, Result], None] | None = None


@dataclass
class Inputs:
    kohya: Path
    peft: Path
    store: Path
    run: Path
    mirror: Path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, run_dir) -> Inputs:
    root = tmp_path_factory.mktemp("inputs")
    stem = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    g = torch.Generator().manual_seed(0)
    kohya = root / "kohya.safetensors"
    save_file(
        {
            f"{stem}.lora_down.weight": torch.randn(2, 8, generator=g),
            f"{stem}.lora_up.weight": torch.randn(8, 2, generator=g),
            f"{stem}.alpha": torch.tensor(2.0),
        },
        kohya,
    )
    items = [(f"a{k}", corpus.good_lora(k), {"y": float(k)}) for k in range(6)]
    write_store(root / "store", items)
    corpus.good_peft(root / "mirror" / "good")
    return Inputs(kohya, corpus.good_peft(root / "peft"), root / "store", run_dir, root / "mirror")


def _victim(root: Path) -> Path:
    """A file elsewhere that a command must never write: its change shows in the snapshot."""
    victim = root / "elsewhere" / "victim"
    victim.parent.mkdir(parents=True, exist_ok=True)
    victim.write_text("not loralens's")
    return victim


def _readonly(root: Path) -> Path:
    """A folder no file can be made in: one without write permission, or for root (whom
    permissions do not stop) /sys/fs, where sysfs refuses new files to everyone."""
    if os.geteuid() == 0:
        return Path("/sys/fs")
    ro = root / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    return ro


def _screen(i: Inputs, root: Path, *more: str, folder: Path | None = None) -> list[str]:
    out = str(root / "r.jsonl")
    return ["screen", str(folder or i.mirror), "--runs", str(i.run), "--out", out, *more]


def _lines(root: Path) -> dict[str, dict]:
    return {r["path"]: r for r in map(json.loads, (root / "r.jsonl").read_text().splitlines())}


# ---------------------------------------------------------------------------------------------
# convert and resize


def convert_through_planted_temp_links(root: Path, i: Inputs) -> Case:
    shared, victim = root / "shared", _victim(root)
    shared.mkdir()
    for pid in range(os.getpid(), os.getpid() + 2000):  # the temp names loralens once used
        (shared / f".x.safetensors.tmp-{pid}").symlink_to(victim)

    def check(root: Path, res: Result) -> None:
        out = root / "shared" / "x.safetensors"
        assert out.is_file() and not out.is_symlink()

    out = shared / "x.safetensors"
    return Case(
        ["convert", str(i.kohya), str(out), "--to", "kohya"],
        0,
        "wrote",
        ("shared/x.safetensors",),
        check,
    )


def convert_to_a_dangling_link(root: Path, i: Inputs) -> Case:
    out = root / "out.safetensors"
    out.symlink_to(root / "elsewhere" / "made.safetensors")
    return Case(
        ["convert", str(i.kohya), str(out), "--to", "kohya"], 3, f"{out} is a symbolic link"
    )


def convert_to_an_existing_folder(root: Path, i: Inputs) -> Case:
    out = root / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    return Case(["convert", str(i.peft), str(out), "--to", "peft"], 3, f"{out}: already exists")


def resize_to_a_link_to_a_file(root: Path, i: Inputs) -> Case:
    out = root / "out.safetensors"
    out.symlink_to(_victim(root))
    return Case(["resize", str(i.kohya), str(out), "--rank", "1"], 3, f"{out} is a symbolic link")


def convert_into_a_read_only_folder(root: Path, i: Inputs) -> Case:
    out = _readonly(root) / "out.safetensors"
    return Case(
        ["convert", str(i.kohya), str(out), "--to", "kohya"], 4, f"{out}: cannot be written"
    )


def resize_into_a_read_only_folder(root: Path, i: Inputs) -> Case:
    out = _readonly(root) / "small"
    return Case(["resize", str(i.peft), str(out), "--rank", "1"], 4, f"{out}: cannot be written")


def convert_a_file_whose_scale_overflows(root: Path, i: Inputs) -> Case:
    src = corpus.kohya_alpha_overflow(root)
    return Case(
        ["convert", str(src), str(root / "o.safetensors"), "--to", "kohya"], 1, f"{src}: module"
    )


def resize_a_file_whose_scale_overflows(root: Path, i: Inputs) -> Case:
    src = corpus.kohya_alpha_overflow(root)
    return Case(
        ["resize", str(src), str(root / "o.safetensors"), "--rank", "1"], 1, f"{src}: module"
    )


# ---------------------------------------------------------------------------------------------
# embed and index


def embed_through_a_dangling_link(root: Path, i: Inputs) -> Case:
    out = root / "e.npy"
    out.symlink_to(root / "elsewhere" / "made.npy")
    return Case(
        ["embed", "--unsupervised", str(i.peft), "--out", str(out)], 3, f"{out} is a symbolic link"
    )


def embed_overwrite_beside_an_unrelated_json(root: Path, i: Inputs) -> Case:
    out = root / "e.npy"
    np.save(out, np.zeros((1, 2), np.float32))
    (root / "e.json").write_text('{"mine": true}')
    args = ["embed", "--unsupervised", str(i.peft), "--out", str(out), "--overwrite"]
    return Case(args, 3, f"{root / 'e.json'} exists and is not an embedding's rows")


def embed_overwrite_a_fifo(root: Path, i: Inputs) -> Case:
    out = root / "e.npy"
    os.mkfifo(out)
    args = ["embed", "--unsupervised", str(i.peft), "--out", str(out), "--overwrite"]
    return Case(args, 3, f"{out} is a named pipe")


def embed_overwrite_its_own_output(root: Path, i: Inputs) -> Case:
    out = root / "e.npy"
    save_embeddings(out, ["old"], np.zeros((1, 3), np.float32), {"kind": "unsupervised", "k": 1})

    def check(root: Path, res: Result) -> None:
        assert json.loads((root / "e.json").read_text())["rows"] == [str(i.peft)]

    args = ["embed", "--unsupervised", str(i.peft), "--out", str(out), "--overwrite"]
    return Case(args, 0, "wrote", ("e.npy", "e.json"), check)


def embed_into_a_read_only_folder(root: Path, i: Inputs) -> Case:
    out = _readonly(root) / "e.npy"
    return Case(
        ["embed", "--unsupervised", str(i.peft), "--out", str(out)], 4, f"{out}: cannot be written"
    )


def embed_a_file_whose_scale_overflows(root: Path, i: Inputs) -> Case:
    src = corpus.kohya_alpha_overflow(root)
    args = ["embed", "--unsupervised", str(src), "--out", str(root / "e.npy")]
    return Case(args, 1, f"{src}: module")


def index_overwrite_a_folder_that_is_not_an_index(root: Path, i: Inputs) -> Case:
    out = root / "idx"
    out.mkdir()
    (out / "index.json").write_text('{"format": "loralens-index"}')
    (out / "notes.txt").write_text("mine")
    args = ["index", "--unsupervised", "--data", str(i.store), "--out", str(out), "--overwrite"]
    return Case(args, 3, f"{out} exists and is not a loralens index")


def index_to_a_link(root: Path, i: Inputs) -> Case:
    out = root / "idx"
    out.symlink_to(_victim(root).parent, target_is_directory=True)
    args = ["index", "--unsupervised", "--data", str(i.store), "--out", str(out), "--overwrite"]
    return Case(args, 3, f"{out} is a symbolic link")


def index_into_a_read_only_folder(root: Path, i: Inputs) -> Case:
    out = _readonly(root) / "idx"
    args = ["index", "--unsupervised", "--data", str(i.store), "--out", str(out)]
    return Case(args, 4, f"{out}: cannot be written")


def search_with_k_0(root: Path, i: Inputs) -> Case:
    return Case(["search", str(root / "idx"), str(i.peft), "-k", "0"], 2, "-k")


# ---------------------------------------------------------------------------------------------
# screen: its report, its page, its options and the folder it screens


def screen_html_over_an_unrelated_file(root: Path, i: Inputs) -> Case:
    (root / "page.html").write_text("<html>mine</html>")
    return Case(
        _screen(i, root, "--html", str(root / "page.html")),
        3,
        f"{root / 'page.html'} already exists",
    )


def screen_html_overwrite_an_unrelated_file(root: Path, i: Inputs) -> Case:
    (root / "page.html").write_text("<html>mine</html>")
    args = _screen(i, root, "--html", str(root / "page.html"), "--overwrite")
    return Case(args, 3, "is not a loralens report")


def screen_html_overwrite_its_own_page(root: Path, i: Inputs) -> Case:
    (root / "page.html").write_text(html_report([]))

    def check(root: Path, res: Result) -> None:
        assert '"path": "good"' in (root / "page.html").read_text()

    args = _screen(i, root, "--html", str(root / "page.html"), "--overwrite")
    return Case(args, 0, "1 screened", ("r.jsonl", "page.html"), check)


def screen_out_a_link(root: Path, i: Inputs) -> Case:
    (root / "r.jsonl").symlink_to(_victim(root))
    return Case(_screen(i, root), 3, f"{root / 'r.jsonl'} is a symbolic link")


def screen_out_a_fifo(root: Path, i: Inputs) -> Case:
    os.mkfifo(root / "r.jsonl")
    return Case(_screen(i, root), 3, f"{root / 'r.jsonl'} is a named pipe")


def screen_out_a_folder(root: Path, i: Inputs) -> Case:
    (root / "r.jsonl").mkdir()
    return Case(_screen(i, root), 3, f"{root / 'r.jsonl'} is a folder")


def screen_out_a_file_that_is_not_a_report(root: Path, i: Inputs) -> Case:
    (root / "r.jsonl").write_text("my notes\n")
    return Case(_screen(i, root), 3, f"{root / 'r.jsonl'}: line 1 is not a line of a screen report")


def screen_out_in_a_read_only_folder(root: Path, i: Inputs) -> Case:
    out = _readonly(root) / "r.jsonl"
    args = ["screen", str(i.mirror), "--runs", str(i.run), "--out", str(out)]
    return Case(args, 4, f"{out}: cannot be written")


def screen_1000_workers(root: Path, i: Inputs) -> Case:
    return Case(_screen(i, root, "--workers", "1000"), 2, "--workers")


def screen_time_limit_0(root: Path, i: Inputs) -> Case:
    return Case(_screen(i, root, "--time-limit", "0"), 2, "--time-limit")


def screen_time_limit_nan(root: Path, i: Inputs) -> Case:
    return Case(_screen(i, root, "--time-limit", "nan"), 2, "--time-limit")


def screen_time_limit_inf(root: Path, i: Inputs) -> Case:
    return Case(_screen(i, root, "--time-limit", "inf"), 2, "--time-limit")


def screen_a_folder_of_fifos(root: Path, i: Inputs) -> Case:
    folder = root / "mirror"
    corpus.good_peft(folder / "good")
    for k in range(FIFOS):
        os.mkfifo(folder / f"p{k:03d}.safetensors")

    def check(root: Path, res: Result) -> None:
        lines = _lines(root)
        assert len(lines) == FIFOS + 1 and "predictions" in lines["good"]
        assert lines["p000.safetensors"]["error"] == (
            "p000.safetensors: a named pipe, not a regular file; not screened"
        )
        assert res.seconds < 60  # a worker per pipe would have waited 200 x 30 s

    args = _screen(i, root, "--time-limit", "30", folder=folder)
    return Case(args, 0, f"{FIFOS + 1} screened ({FIFOS} could not be)", ("r.jsonl",), check)


def screen_links_leading_out_of_the_folder(root: Path, i: Inputs) -> Case:
    folder, outside = root / "mirror", root / "elsewhere"
    corpus.good_peft(folder / "good")
    secret = corpus.good_peft(outside / "secret")
    (folder / "file.safetensors").symlink_to(secret / "adapter_model.safetensors")
    member = corpus.good_peft(folder / "member")
    (member / "adapter_model.safetensors").unlink()
    (member / "adapter_model.safetensors").symlink_to(secret / "adapter_model.safetensors")
    (folder / "zero.safetensors").symlink_to("/dev/zero")
    (folder / ".hidden").mkdir()
    os.mkfifo(folder / ".hidden" / "pipe")
    (folder / "pipe.safetensors").symlink_to(folder / ".hidden" / "pipe")

    def check(root: Path, res: Result) -> None:
        lines = _lines(root)
        assert sorted(lines) == [
            "file.safetensors",
            "good",
            "member",
            "pipe.safetensors",
            "zero.safetensors",
        ]
        out = "a link to something outside the screened folder; not screened"
        assert lines["file.safetensors"]["error"] == f"file.safetensors: {out}"
        assert lines["member"]["error"] == f"member/adapter_model.safetensors: {out}"
        assert lines["zero.safetensors"]["error"] == f"zero.safetensors: {out}"
        assert "a named pipe" in lines["pipe.safetensors"]["error"]
        assert "secret" not in (root / "r.jsonl").read_text()

    return Case(
        _screen(i, root, folder=folder), 0, "5 screened (4 could not be)", ("r.jsonl",), check
    )


CASES = {
    f.__name__: f
    for f in (
        convert_through_planted_temp_links,
        convert_to_a_dangling_link,
        convert_to_an_existing_folder,
        resize_to_a_link_to_a_file,
        convert_into_a_read_only_folder,
        resize_into_a_read_only_folder,
        convert_a_file_whose_scale_overflows,
        resize_a_file_whose_scale_overflows,
        embed_through_a_dangling_link,
        embed_overwrite_beside_an_unrelated_json,
        embed_overwrite_a_fifo,
        embed_overwrite_its_own_output,
        embed_into_a_read_only_folder,
        embed_a_file_whose_scale_overflows,
        index_overwrite_a_folder_that_is_not_an_index,
        index_to_a_link,
        index_into_a_read_only_folder,
        search_with_k_0,
        screen_html_over_an_unrelated_file,
        screen_html_overwrite_an_unrelated_file,
        screen_html_overwrite_its_own_page,
        screen_out_a_link,
        screen_out_a_fifo,
        screen_out_a_folder,
        screen_out_a_file_that_is_not_a_report,
        screen_out_in_a_read_only_folder,
        screen_1000_workers,
        screen_time_limit_0,
        screen_time_limit_nan,
        screen_time_limit_inf,
        screen_a_folder_of_fifos,
        screen_links_leading_out_of_the_folder,
    )
}


@pytest.fixture(scope="module")
def ran(inputs, tmp_path_factory) -> dict[str, tuple[Path, Case, Result, set[str]]]:
    """Every case built in a folder of its own, run in one bounded batch: (its folder, the
    case, its result, what changed under its folder)."""
    built, before = {}, {}
    for name, make in CASES.items():
        root = tmp_path_factory.mktemp(name[:40])
        built[name] = (root, make(root, inputs))
        before[name] = snapshot(root)
    shared = snapshot(inputs.store.parent), snapshot(inputs.run)
    batch = [
        {"name": n, "cwd": str(root), "args": case.args, "timeout": 120}
        for n, (root, case) in built.items()
    ]
    results = run_batch(batch, timeout=1800)
    assert (snapshot(inputs.store.parent), snapshot(inputs.run)) == shared
    return {
        n: (root, case, results[n], changed(before[n], snapshot(root)))
        for n, (root, case) in built.items()
    }


@pytest.mark.parametrize("name", list(CASES))
def test_each_hostile_output_gets_a_clear_answer_and_nothing_else_changes(name, ran):
    root, case, res, touched = ran[name]
    assert res.code == case.code, res.output
    assert case.says in res.output, res.output
    assert "Traceback" not in res.output, res.output
    assert not res.left_running, res.left_running
    assert touched <= set(case.may_change), f"changed outside the output: {sorted(touched)}"
    if case.check:
        case.check(root, res)
