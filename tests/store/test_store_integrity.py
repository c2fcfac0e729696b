"""Stores do not trust their bytes: checksums, tampering, NaN, and every malformed file is a
StoreError naming it. Each hostile store is made at test time from a small good one."""

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helpers import store_items, store_lora
from loralens.store import LoRAStore, StoreError, verify_store, write_store
from loralens.store.format import open_shard
from loralens.store.integrity import file_checksum

DATA = Path(__file__).resolve().parents[1] / "data"
SHARD0 = "weights-00000.safetensors"


def _store(tmp_path, n=6, **kw) -> Path:
    write_store(tmp_path / "s", store_items(n), shard_bytes=kw.pop("shard_bytes", 700), **kw)
    return tmp_path / "s"


def _patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _row_offset(shard: Path, key: str, row: int) -> int:
    """Byte offset of row ``row`` of tensor ``key`` in a shard."""
    h = open_shard(shard)
    dtype, shape, begin = h.tensors[key]
    return h.start + begin + row * shape[1] * dtype.itemsize


def _read_all(path: Path, **kw) -> None:
    store = LoRAStore(path, **kw)
    store.batch(range(len(store)))


def _rewrite_checksum(store: Path, name: str) -> None:
    """What an editor who knows the format does: record the edited file's new checksum."""
    info = json.loads((store / "store.json").read_text())
    info["checksums"][name] = file_checksum(store / name)
    (store / "store.json").write_text(json.dumps(info))


def test_checksums_are_recorded_and_appends_update_them(tmp_path):
    path = _store(tmp_path)
    info = json.loads((path / "store.json").read_text())
    files = sorted(p.name for p in path.iterdir() if p.name != "store.json")
    assert sorted(info["checksums"]) == files and len(files) > 2
    for name in files:
        assert info["checksums"][name] == file_checksum(path / name)
    write_store(path, [("b", store_lora([1, 1, 1], 9), {"y": 1.0})], append=True)
    after = json.loads((path / "store.json").read_text())["checksums"]
    assert len(after) == len(files) + 1
    for name in after:
        assert after[name] == file_checksum(path / name)
        if name.startswith("weights") and name in info["checksums"]:
            assert after[name] == info["checksums"][name]  # old shards kept as they were
    report = verify_store(path)
    assert report.ok and report.num_loras == 7 and not report.notes, str(report)


def test_a_flipped_byte_fails_the_first_read_of_its_shard_naming_it(tmp_path):
    path = _store(tmp_path)
    shard = path / SHARD0
    offset = _row_offset(shard, "g0", 0) + 5
    _patch(shard, offset, bytes([shard.read_bytes()[offset] ^ 0x01]))  # still finite
    store = LoRAStore(path)  # sizes and the index are intact: opening is cheap and passes
    with pytest.raises(StoreError, match=f"{SHARD0}: contents differ from the sha256"):
        store.batch(range(len(store)))
    report = verify_store(path)
    assert not report.ok and SHARD0 in report.problems[0]
    assert sum(SHARD0 in p for p in report.problems) == 1
    _read_all(path, verify=False)  # asked not to compare checksums: reads


def test_train_and_evaluate_refuse_a_flipped_shard(tmp_path):
    """The commands read stores with the default verify: a corrupted shard is an error naming
    it, exit code 1, no traceback."""
    from typer.testing import CliRunner

    from loralens.cli import app

    items = [(f"a{k}", store_lora([2, 2, 2], k), {"y": float(k % 5)}) for k in range(24)]
    write_store(tmp_path / "good", items)
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "good", bad)
    offset = _row_offset(bad / SHARD0, "g0", 3)
    _patch(bad / SHARD0, offset, bytes([(bad / SHARD0).read_bytes()[offset] ^ 0x01]))

    def cli(*args):
        return CliRunner().invoke(app, [str(a) for a in args])

    common = ("--target", "y", "--model", "mlp", "--epochs", "1", "--quiet")
    done = cli("train", "--data", tmp_path / "good", "--out", tmp_path / "run", *common)
    assert done.exit_code == 0, done.output
    for args in (
        ("train", "--data", bad, "--out", tmp_path / "run2", *common),
        ("evaluate", tmp_path / "run", "--data", bad),
    ):
        done = cli(*args)
        assert done.exit_code == 1 and isinstance(done.exception, SystemExit), done.output
        assert f"{bad / SHARD0}: contents differ from the sha256" in done.stderr


@pytest.mark.parametrize("name", ["store-v1", "store-v2"])
def test_stores_without_checksums_open_read_and_verify(name):
    store = LoRAStore(DATA / name)
    store.batch(range(len(store)))
    report = verify_store(DATA / name)
    assert report.ok, str(report)
    assert any("no checksums recorded" in n for n in report.notes)
    assert report.to_dict()["ok"] and "ok" in str(report)


def test_an_append_to_an_old_store_records_checksums_for_what_it_wrote(tmp_path):
    shutil.copytree(DATA / "store-v2", tmp_path / "old")
    write_store(tmp_path / "old", [("n", store_lora([1, 1, 1], 3), {})], append=True)
    info = json.loads((tmp_path / "old" / "store.json").read_text())
    assert sorted(info["checksums"]) == ["index.parquet", "weights-00003.safetensors"]
    report = verify_store(tmp_path / "old")
    assert report.ok and "no checksum recorded for weights-00000" in report.notes[0]


@pytest.mark.parametrize("case", ["old store", "checksum rewritten", "verify=False"])
def test_nan_in_a_shard_is_an_error_naming_the_store_and_row(tmp_path, case):
    if case == "old store":
        path = tmp_path / "s"
        shutil.copytree(DATA / "store-v2", path)
    else:
        path = _store(tmp_path)
    index = pd.read_parquet(path / "index.parquet")
    row = 1  # poison the LoRA at store row 1 (a1) in its shard, tensor and row
    shard = path / f"weights-{index['_shard'][row]:05d}.safetensors"
    offset = _row_offset(shard, index["_key"][row], int(index["_row"][row])) + 4
    _patch(shard, offset, struct.pack("<f", float("nan")))
    if case == "checksum rewritten":
        _rewrite_checksum(path, shard.name)
    store = LoRAStore(path, verify=case != "verify=False")
    other = int(np.flatnonzero(index["_shard"] != index["_shard"][row])[0])
    store.batch([other])  # another shard: reads
    message = f"{path}: LoRA 'a1' \\(row 1\\) holds NaN or inf values \\(in {shard.name}"
    with pytest.raises(StoreError, match=message):
        store.batch([1, other])
    report = verify_store(path)
    assert not report.ok and "LoRA 'a1' (row 1) holds NaN" in report.problems[-1]


def test_the_writer_refuses_nan_factors(tmp_path):
    lora = store_lora([1, 1, 1], 0)
    lora.layers[1].V[0, 0] = float("inf")
    with pytest.raises(StoreError, match="bad: NaN or inf in its factors"):
        write_store(tmp_path / "s", [("ok", store_lora([1, 1, 1], 1), {}), ("bad", lora, {})])
    assert not (tmp_path / "s").exists()


def _edit_index(path: Path, edit) -> None:
    index = pd.read_parquet(path / "index.parquet")
    edit(index)
    index.to_parquet(path / "index.parquet", index=False)


def _swap_ranks(index):  # same row length, other layers: only the checksum can tell
    index.at[0, "_ranks"] = np.asarray(index["_ranks"][0])[[2, 1, 0]]


def _bump_row(index):
    index.loc[0, "_row"] = 7


def _widen_ranks(index):
    index.at[0, "_ranks"] = np.asarray(index["_ranks"][0]) + 1
    index.loc[0, "rank"] += 1


def _set_version(version):
    def edit(path):
        info = json.loads((path / "store.json").read_text())
        info["version"] = version
        (path / "store.json").write_text(json.dumps(info))

    return edit


@pytest.mark.parametrize(
    "source, edit, verify, file",
    [
        ("new", lambda p: _edit_index(p, _swap_ranks), True, "index.parquet"),
        ("new", lambda p: _edit_index(p, _swap_ranks), "quick", "index.parquet"),
        ("new", lambda p: _edit_index(p, _bump_row), False, "index.parquet"),
        ("new", lambda p: _edit_index(p, _widen_ranks), False, "index.parquet"),
        ("new", _set_version(1), True, "store.json"),
        ("new", _set_version(1), False, "store.json"),
        ("new", _set_version(3), True, "store.json"),
        ("store-v1", _set_version(2), True, "store.json"),
        ("store-v2", lambda p: _edit_index(p, _bump_row), True, "index.parquet"),
        ("store-v2", lambda p: _edit_index(p, _widen_ranks), True, "index.parquet"),
    ],
)
def test_a_changed_index_or_version_is_an_error_naming_the_file(
    tmp_path, source, edit, verify, file
):
    """A row pointing elsewhere or a version read in the other layout would give wrong
    factors silently: caught by the checksum, or by the structure where there is none."""
    if source == "new":
        path = _store(tmp_path, shard_bytes=10**6)  # one shard; _ranks of row 0 are [4, 1, 2]
    else:
        path = tmp_path / "s"
        shutil.copytree(DATA / source, path)
    edit(path)
    with pytest.raises(StoreError, match=f"{path / file}: "):
        _read_all(path, verify=verify)
    report = verify_store(path)
    assert not report.ok and any(str(path / file) in p for p in report.problems)


def _shard_bytes(data):
    return lambda p: (p / SHARD0).write_bytes(data)


def _shard_header(header):
    raw = json.dumps(header).encode()
    return _shard_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 64)


def _fifo(name):
    def make(path):
        (path / name).unlink()
        os.mkfifo(path / name)

    return make


MALFORMED = {
    "empty shard": (SHARD0, _shard_bytes(b"")),
    "4-byte shard": (SHARD0, _shard_bytes(b"\1\0\0\0")),
    "header longer than the file": (SHARD0, _shard_bytes(struct.pack("<Q", 10**6) + b"{}")),
    "header not JSON": (SHARD0, _shard_bytes(struct.pack("<Q", 4) + b"{{{{" + b"\0" * 8)),
    "header a JSON list": (SHARD0, _shard_header([1, 2])),
    "tensor of int64": (
        SHARD0,
        _shard_header({"g0": {"dtype": "I64", "shape": [1, 8], "data_offsets": [0, 64]}}),
    ),
    "tensor outside the file": (
        SHARD0,
        _shard_header({"g0": {"dtype": "F32", "shape": [1, 800], "data_offsets": [0, 3200]}}),
    ),
    "negative shape": (
        SHARD0,
        _shard_header({"g0": {"dtype": "F32", "shape": [-1, 16], "data_offsets": [0, 64]}}),
    ),
    "tensor missing": (
        SHARD0,
        _shard_header({"g9": {"dtype": "F32", "shape": [1, 16], "data_offsets": [0, 64]}}),
    ),
    "missing shard": (SHARD0, lambda p: (p / SHARD0).unlink()),
    "shard a named pipe": (SHARD0, _fifo(SHARD0)),
    "empty index": ("index.parquet", lambda p: (p / "index.parquet").write_bytes(b"")),
    "index not parquet": ("index.parquet", lambda p: (p / "index.parquet").write_text("id,x\n")),
    "index without _ranks": (
        "index.parquet",
        lambda p: _edit_index(p, lambda i: i.pop("_ranks")),
    ),
    "index _ranks of text": (
        "index.parquet",
        lambda p: _edit_index(p, lambda i: i.__setitem__("_ranks", "x")),
    ),
    "index _row of floats": (
        "index.parquet",
        lambda p: _edit_index(p, lambda i: i.__setitem__("_row", i["_row"] + 0.5)),
    ),
    "index a named pipe": ("index.parquet", _fifo("index.parquet")),
    "store.json not JSON": ("store.json", lambda p: (p / "store.json").write_text("{nope")),
    "store.json a list": ("store.json", lambda p: (p / "store.json").write_text("[]")),
    "store.json nested 100000 deep": (
        "store.json",
        lambda p: (p / "store.json").write_text("[" * 100_000 + "]" * 100_000),
    ),
    "store.json other format": (
        "store.json",
        lambda p: (p / "store.json").write_text('{"format": "other", "version": 2}'),
    ),
    "store.json layers wrong": (
        "store.json",
        lambda p: (p / "store.json").write_text(
            (p / "store.json").read_text().replace('"out": 6', '"out": "6"')
        ),
    ),
    "store.json bad checksums": (
        "store.json",
        lambda p: (p / "store.json").write_text(
            (p / "store.json").read_text().replace('"sha256": "', '"sha256": "zz')
        ),
    ),
    "store.json a named pipe": ("store.json", _fifo("store.json")),
}


@pytest.mark.parametrize("verify", [True, False], ids=["verify", "no-verify"])
@pytest.mark.parametrize("case", list(MALFORMED))
def test_every_malformed_store_file_is_a_store_error_naming_it(tmp_path, case, verify):
    path = _store(tmp_path, n=3, shard_bytes=10**6)
    name, damage = MALFORMED[case]
    damage(path)
    with pytest.raises(StoreError, match=f"{path / name}"):
        _read_all(path, verify=verify)
    report = verify_store(path)
    assert not report.ok and str(path / name) in report.problems[0]
