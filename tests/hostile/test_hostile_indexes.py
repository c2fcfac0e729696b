"""Damaged and hostile index folders: special files and links where an index's files belong,
records that lie (duplicate or escaping ids, a store at /etc, unknown versions and keys, bombs
at the size cap), vectors that do not match their record. `search` and `index verify` each run
in a bounded child (:mod:`bounded`) and must answer with exit code 1 and one line naming the
damaged file, within the memory bound, changing nothing, leaving nothing running."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import corpus
from bounded import changed, run_batch, snapshot
from loralens.search.index import build_index
from loralens.search.manifest import MAX_CONTAINERS, MAX_RECORD_BYTES
from loralens.store import write_store

pytestmark = pytest.mark.skipif(
    not (hasattr(os, "mkfifo") and Path("/proc/self/stat").exists()), reason="needs FIFOs, /proc"
)

RECORD, VECTORS = "index.json", "vectors.safetensors"


def _record(idx: Path) -> dict:
    return json.loads((idx / RECORD).read_text())


def _edit(idx: Path, **changes) -> None:
    (idx / RECORD).write_text(json.dumps({**_record(idx), **changes}))


def _vouched(idx: Path, data: bytes) -> None:
    """``data`` as the vectors file, and a record that vouches for it (its size and sha256):
    only the checks of what the file holds can catch it."""
    (idx / VECTORS).write_bytes(data)
    _edit(idx, files={VECTORS: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}})


def _revectors(idx: Path, key: str, change: Callable[[np.ndarray], object]) -> None:
    """The vectors file with ``change`` made to its array ``key`` (a new one if it has none),
    vouched for by the record."""
    arrays = load_file(idx / VECTORS)
    arrays[key] = arrays.get(key, np.zeros(1, np.float32)).copy()
    change(arrays[key])
    save_file(arrays, idx / VECTORS)
    _vouched(idx, (idx / VECTORS).read_bytes())


def _replace(idx: Path, name: str, make: Callable[[Path], object]) -> None:
    """The file ``name`` made anew by ``make``; a copy of it is kept beside the index."""
    shutil.copy(idx / name, idx.parent / "copy")
    (idx / name).unlink()
    make(idx / name)


def _sparse(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def _bomb(unit: bytes) -> bytes:
    """A record at the size cap whose ids are ``unit`` repeated."""
    head, tail = b'{"format":"loralens-index","version":2,"ids":[', b"0]}"
    return head + unit * ((MAX_RECORD_BYTES - len(head) - len(tail)) // len(unit)) + tail


#: case -> (damage done to a copy of a good index, the file named, what the error says)
CASES: dict[str, tuple[Callable[[Path], object], str, str]] = {
    "record_links_to_dev_zero": (
        lambda i: _replace(i, RECORD, lambda p: p.symlink_to("/dev/zero")),
        RECORD,
        "a symbolic link, not a regular file",
    ),
    "record_is_a_fifo": (lambda i: _replace(i, RECORD, os.mkfifo), RECORD, "a named pipe"),
    "record_is_a_folder": (lambda i: _replace(i, RECORD, Path.mkdir), RECORD, "a folder"),
    "record_is_10_gib": (
        lambda i: _sparse(i / RECORD, 10 * 2**30),
        RECORD,
        f"larger than {MAX_RECORD_BYTES // 2**20} MiB",
    ),
    "record_is_a_container_bomb": (
        lambda i: (i / RECORD).write_bytes(_bomb(b"[],")),
        RECORD,
        f"more than {MAX_CONTAINERS} arrays and objects",
    ),
    "record_is_a_string_bomb_at_the_cap": (
        lambda i: (i / RECORD).write_bytes(_bomb(b'"ab",')),
        RECORD,
        "missing key(s)",
    ),
    "record_nests_100000_deep": (
        lambda i: (i / RECORD).write_text('{"x": ' + "[" * 100_000 + "]" * 100_000 + "}"),
        RECORD,
        "not valid JSON",
    ),
    "record_holds_nan": (
        lambda i: (i / RECORD).write_text('{"format": "loralens-index", "n": NaN}'),
        RECORD,
        "not valid JSON",
    ),
    "record_is_not_json": (lambda i: (i / RECORD).write_bytes(b"\xff\xfe\0"), RECORD, "not valid"),
    "version_99": (lambda i: _edit(i, version=99), RECORD, "version 99, but this loralens reads"),
    "version_1_made_before_the_hash": (
        lambda i: (i / RECORD).write_text(
            json.dumps({k: v for k, v in {**_record(i), "version": 1}.items() if k != "files"})
        ),
        RECORD,
        "rebuild it with `loralens index`",
    ),
    "unknown_key": (lambda i: _edit(i, extra=1), RECORD, "unknown key(s) ['extra']"),
    "missing_key": (
        lambda i: (i / RECORD).write_text(
            json.dumps({k: v for k, v in _record(i).items() if k != "files"})
        ),
        RECORD,
        "missing key(s) ['files']",
    ),
    "duplicate_ids": (
        lambda i: _edit(i, ids=["a0", "a0", *_record(i)["ids"][2:]]),
        RECORD,
        "id 'a0' appears more than once",
    ),
    "id_climbing_out": (
        lambda i: _edit(i, ids=["../../etc/passwd", *_record(i)["ids"][1:]]),
        RECORD,
        "id '../../etc/passwd' is not the name of an adapter inside the store",
    ),
    "absolute_id": (
        lambda i: _edit(i, ids=["/etc/passwd", *_record(i)["ids"][1:]]),
        RECORD,
        "id '/etc/passwd' is not the name",
    ),
    "store_at_etc": (
        lambda i: _edit(i, store="/etc"),
        RECORD,
        "store /etc is not a loralens store",
    ),
    "store_relative": (lambda i: _edit(i, store="s/../x"), RECORD, "is not an absolute path"),
    "n_disagrees": (lambda i: _edit(i, n=7), RECORD, "ids is not a list of the 7"),
    "dim_disagrees": (lambda i: _edit(i, dim=16), RECORD, "dim is 16, but"),
    "label_named_distance": (
        lambda i: _edit(i, labels={"distance": [0] * 6}),
        RECORD,
        "label column 'distance'",
    ),
    "inf_vector": (
        lambda i: _revectors(i, "vectors", lambda v: v.__setitem__((2, 1), np.inf)),
        VECTORS,
        "vectors holds NaN/inf values",
    ),
    "zero_std": (
        lambda i: _revectors(i, "std", lambda v: v.fill(0)),
        VECTORS,
        "std is not positive",
    ),
    "extra_tensor": (
        lambda i: _revectors(i, "x", lambda v: None),
        VECTORS,
        "holds ['mean', 'std', 'vectors', 'x']",
    ),
    "vectors_truncated": (
        lambda i: (i / VECTORS).write_bytes((i / VECTORS).read_bytes()[:-8]),
        VECTORS,
        "bytes, but index.json records",
    ),
    "vectors_with_a_byte_flipped": (
        lambda i: (i / VECTORS).write_bytes(
            (d := (i / VECTORS).read_bytes())[:-1] + bytes([d[-1] ^ 1])
        ),
        VECTORS,
        "its sha256 differs from the one index.json records",
    ),
    "vectors_not_safetensors": (
        lambda i: _vouched(i, os.urandom((i / VECTORS).stat().st_size)),
        VECTORS,
        "not a safetensors file",
    ),
    "vectors_link_to_an_identical_copy": (
        lambda i: _replace(i, VECTORS, lambda p: p.symlink_to(i.parent / "copy")),
        VECTORS,
        "a symbolic link",
    ),
    "vectors_link_to_dev_zero": (
        lambda i: _replace(i, VECTORS, lambda p: p.symlink_to("/dev/zero")),
        VECTORS,
        "a symbolic link",
    ),
    "vectors_fifo": (lambda i: _replace(i, VECTORS, os.mkfifo), VECTORS, "a named pipe"),
    "vectors_20_gib": (
        lambda i: _sparse(i / VECTORS, 20 * 2**30),
        VECTORS,
        "21474836480 bytes, but index.json records",
    ),
    "vectors_missing": (lambda i: (i / VECTORS).unlink(), VECTORS, "missing"),
    "index_is_a_fifo": (lambda i: (shutil.rmtree(i), os.mkfifo(i)), "", "not a folder"),
    "index_is_missing": (lambda i: shutil.rmtree(i), "", "no such index folder"),
}


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> tuple[Path, Path]:
    """An index of six LoRAs of the corpus's layout (unsupervised), and a query adapter."""
    root = tmp_path_factory.mktemp("good")
    items = [(f"a{k}", corpus.good_lora(k), {"y": float(k)}) for k in range(6)]
    build_index(write_store(root / "store", items), root / "idx")
    return root / "idx", corpus.good_peft(root / "query")


@pytest.fixture(scope="module")
def ran(good, tmp_path_factory):
    """Every case's damaged copy searched and verified in one bounded batch, then the good
    index: (per case: its index and what changed under its folder; every result)."""
    idx, query = good
    cases, batch = {}, []
    for name, (damage, _, _) in CASES.items():
        root = tmp_path_factory.mktemp(name[:40])
        shutil.copytree(idx, root / "idx")
        damage(root / "idx")
        cases[name] = (root, snapshot(root))
        batch += _commands(name, root / "idx", query)
    results = run_batch([*batch, *_commands("whole", idx, query)], timeout=1200)
    return {n: (r / "idx", changed(was, snapshot(r))) for n, (r, was) in cases.items()}, results


def _commands(name: str, idx: Path, query: Path) -> list[dict]:
    return [
        {"name": f"{name} {cmd[0]}", "cwd": str(idx.parent), "args": cmd, "timeout": 60}
        for cmd in (["search", str(idx), str(query)], ["index", "verify", str(idx)])
    ]


def test_the_whole_index_is_searched_and_verified(ran):
    _, results = ran
    search, verify = results["whole search"], results["whole index"]
    assert search.code == 0 and "a0" in search.output, search.output
    assert verify.code == 0 and "ok (6 LoRAs, 6 dims, exact)" in verify.output, verify.output


@pytest.mark.parametrize("name", list(CASES))
def test_each_damaged_index_is_one_error_naming_its_file(name, ran):
    cases, results = ran
    idx, touched = cases[name]
    _, file, says = CASES[name]
    named = f"{idx / file}:" if file else f"{idx}:"
    for command in ("search", "index"):
        res = results[f"{name} {command}"]
        assert res.code == 1, res.output
        assert named in res.output and says in res.output, res.output
        assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1
        assert not res.left_running
    assert not touched, f"changed: {sorted(touched)}"
