"""The safe-file rules every output and reader share: temp files made exclusively under fresh
names, published without replacing what appeared meanwhile, never written through a link or
into a special file, and OS errors on an output as one error naming it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from loralens import atomic
from loralens.errors import OutputError, OutputExistsError

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs (POSIX)")


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "elsewhere" / "victim"
    victim.parent.mkdir()
    victim.write_text("untouched")
    return victim


def test_a_link_planted_under_an_old_temp_name_is_never_followed(tmp_path):
    shared, victim = tmp_path / "shared", _victim(tmp_path)
    shared.mkdir()
    for pid in range(os.getpid() - 5, os.getpid() + 5):  # the names loralens once used
        (shared / f".x.safetensors.tmp-{pid}").symlink_to(victim)
    atomic.write_file_atomic(shared / "x.safetensors", b"adapter bytes")
    assert victim.read_text() == "untouched"
    assert (shared / "x.safetensors").read_bytes() == b"adapter bytes"
    assert not (shared / "x.safetensors").is_symlink()
    assert len(list(shared.iterdir())) == 11  # the planted links and the output, no temp file


def test_an_output_that_appears_while_it_is_written_is_not_replaced(tmp_path):
    out = tmp_path / "out.bin"
    appeared = pytest.raises(OutputExistsError, match="appeared while it was being written")
    with appeared, atomic.new_file(out) as f:
        f.write(b"mine")
        out.write_bytes(b"theirs")
    assert out.read_bytes() == b"theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_replace_replaces_a_link_by_name_and_never_writes_through_it(tmp_path):
    victim, out = _victim(tmp_path), tmp_path / "out.json"
    out.symlink_to(victim)
    atomic.write_file_atomic(out, "new", replace=True)
    assert victim.read_text() == "untouched"
    assert out.read_text() == "new" and not out.is_symlink()


def test_a_new_folder_is_published_whole_and_never_over_something_there(tmp_path):
    out = tmp_path / "folder"
    with atomic.new_dir(out) as tmp:
        (tmp / "a").write_text("a")
        assert not out.exists()
    assert (out / "a").read_text() == "a"
    with pytest.raises(OutputExistsError), atomic.new_dir(out) as tmp:
        (tmp / "b").write_text("b")
    assert sorted(p.name for p in out.iterdir()) == ["a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]


@pytest.mark.parametrize("kind", ["link", "dangling link", "fifo", "folder"])
def test_nothing_is_appended_through_a_link_or_into_a_special_file(kind, tmp_path):
    victim, out = _victim(tmp_path), tmp_path / "report.jsonl"
    if kind == "link":
        out.symlink_to(victim)
    elif kind == "dangling link":
        out.symlink_to(tmp_path / "elsewhere" / "new")
    elif kind == "fifo":
        os.mkfifo(out)
    else:
        out.mkdir()
    with pytest.raises(OutputExistsError, match=f"{out} is a "):
        atomic.open_append(out)
    assert victim.read_text() == "untouched"
    assert not (tmp_path / "elsewhere" / "new").exists()


def test_replaceable_says_what_may_be_replaced(tmp_path):
    out = tmp_path / "o"
    assert atomic.replaceable(out, overwrite=False, ours=bool, what="x") is False
    out.write_text("")
    with pytest.raises(OutputExistsError, match=r"already exists \(use --overwrite"):
        atomic.replaceable(out, overwrite=False, ours=lambda p: True, what="x")
    with pytest.raises(OutputExistsError, match="is not an index: --overwrite replaces only"):
        atomic.replaceable(out, overwrite=True, ours=lambda p: False, what="an index")
    assert atomic.replaceable(out, overwrite=True, ours=lambda p: True, what="x") is True


def test_an_unwritable_output_is_one_error_naming_it(tmp_path):
    parent = tmp_path / "file"
    parent.write_text("")  # a file where the output's folder should be
    with pytest.raises(OutputError, match=f"{parent / 'out'}: cannot be written"):
        atomic.write_file_atomic(parent / "out", b"x")


def test_open_regular_without_following_refuses_a_link(tmp_path):
    victim = _victim(tmp_path)
    link = tmp_path / "link"
    link.symlink_to(victim)
    assert atomic.open_regular(link).read() == b"untouched"
    with pytest.raises(atomic.SpecialFileError, match="is a symbolic link"):
        atomic.open_regular(link, follow=False)
