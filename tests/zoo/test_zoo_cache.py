"""Hostile and broken cache entries (issue 14, item 2): a planted pickle never runs, a changed
file is refused with its name, a clean entry is reused; and nothing in loralens unpickles."""

from __future__ import annotations

import ast
import json
import os
import pickle
import threading
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import loralens
from loralens.cache import ENTRY_MANIFEST, CacheError, cache_entry, verify_entry


def test_the_planted_pickle_is_live(tmp_path, plant_pickle):
    """The payload runs when unpickled, so 'the marker is absent' below means 'never loaded'."""
    marker = tmp_path / "ran"
    plant_pickle(tmp_path / "data.pt", marker)
    with zipfile.ZipFile(tmp_path / "data.pt") as z:
        (name,) = [n for n in z.namelist() if n.endswith("/data.pkl")]
        pickle.loads(z.read(name))
    assert marker.exists()


def _builder(calls: list[int]):
    def build(tmp: Path) -> None:
        calls.append(1)
        save_file({"w": torch.arange(6.0)}, str(tmp / "w.safetensors"))
        (tmp / "sub").mkdir()
        (tmp / "sub" / "info.json").write_text(json.dumps({"a": 1}))

    return build


@pytest.fixture
def entry(tmp_path) -> Path:
    return cache_entry(tmp_path / "cache" / "e", _builder([]))


def test_clean_entry_is_built_once_then_reused(tmp_path, file_snapshot):
    calls: list[int] = []
    path = tmp_path / "cache" / "e"
    assert cache_entry(path, _builder(calls)) == path
    before = file_snapshot(path)
    assert set(before) == {"w.safetensors", "sub/info.json", ENTRY_MANIFEST}
    for _ in range(2):
        cache_entry(path, _builder(calls))
    assert calls == [1] and file_snapshot(path) == before
    assert [p.name for p in path.parent.iterdir()] == ["e"]  # no temp folder left


def test_failed_build_leaves_no_entry_and_is_retried(tmp_path):
    path = tmp_path / "cache" / "e"

    def broken(tmp: Path) -> None:
        (tmp / "half.json").write_text("{}")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        cache_entry(path, broken)
    assert list(path.parent.iterdir()) == []
    calls: list[int] = []
    cache_entry(path, _builder(calls))
    assert calls == [1]


def test_planted_pickle_in_an_entry_is_refused_and_never_runs(entry, tmp_path, plant_pickle):
    marker = tmp_path / "ran"
    plant_pickle(entry / "data.pt", marker)
    with pytest.raises(CacheError, match=r"data\.pt is not a \.safetensors or \.json file"):
        cache_entry(entry, _builder([]))
    assert not marker.exists()


def test_old_entry_without_manifest_is_refused(tmp_path, plant_pickle):
    old = tmp_path / "old"
    old.mkdir()
    plant_pickle(old / "data.pt", tmp_path / "ran")
    (old / "info.json").write_text("{}")
    calls: list[int] = []
    with pytest.raises(CacheError, match=rf"{ENTRY_MANIFEST} is missing.*Delete the folder"):
        cache_entry(old, _builder(calls))
    assert calls == [] and not (tmp_path / "ran").exists()


@pytest.mark.parametrize(
    ("name", "change", "why"),
    [
        ("w.safetensors", "flip", "sha256 differs"),
        ("w.safetensors", "truncate", "size differs"),
        ("sub/info.json", "flip", "sha256 differs"),
        ("sub/info.json", "remove", "listed in the entry's manifest but missing"),
        ("sub/extra.json", "add", "not in its manifest"),
        ("sub/extra.safetensors", "add", "not in its manifest"),
    ],
)
def test_changed_entry_is_refused_naming_the_file(entry, name, change, why):
    f = entry / name
    if change == "flip":
        data = bytearray(f.read_bytes())
        data[-2] ^= 1
        f.write_bytes(bytes(data))
    elif change == "truncate":
        f.write_bytes(f.read_bytes()[:-4])
    elif change == "remove":
        f.unlink()
    else:
        f.write_text("{}")
    with pytest.raises(CacheError, match=why) as info:
        verify_entry(entry)
    assert str(f) in str(info.value) and f"Delete the folder {entry}" in str(info.value)


@pytest.mark.parametrize(
    "manifest",
    ["{not json", "[" * 100_000 + "]" * 100_000, json.dumps({"format": 9, "files": {}}), "[]"],
)
def test_broken_manifest_is_refused(entry, manifest):
    (entry / ENTRY_MANIFEST).write_text(manifest)
    with pytest.raises(CacheError, match=ENTRY_MANIFEST):
        verify_entry(entry)


def test_manifest_cannot_point_outside_the_entry(entry, tmp_path):
    outside = tmp_path / "secret.json"
    outside.write_text("{}")
    man = json.loads((entry / ENTRY_MANIFEST).read_text())
    man["files"]["../../secret.json"] = {"size": 2, "sha256": "0" * 64}
    (entry / ENTRY_MANIFEST).write_text(json.dumps(man))
    with pytest.raises(CacheError, match="listed in the entry's manifest but missing"):
        verify_entry(entry)


@pytest.mark.parametrize("kind", ["fifo", "symlink", "entry symlink"])
def test_special_files_are_refused_without_opening_them(entry, tmp_path, kind):
    target = entry
    if kind == "fifo":
        os.mkfifo(entry / "sub" / "pipe.json")
    elif kind == "symlink":
        (entry / "sub" / "info.json").unlink()
        (entry / "sub" / "info.json").symlink_to(tmp_path / "elsewhere.json")
    else:
        target = tmp_path / "link"
        target.symlink_to(entry)
    errors: list[BaseException] = []

    def check() -> None:
        try:
            verify_entry(target)
        except BaseException as err:  # handed to the test thread
            errors.append(err)

    t = threading.Thread(target=check, daemon=True)  # opening a FIFO would block forever
    t.start()
    t.join(timeout=20)
    assert not t.is_alive(), "verify_entry hung (it opened a FIFO?)"
    assert len(errors) == 1 and isinstance(errors[0], CacheError), errors
    assert "link or special file" in str(errors[0]) or "not a plain folder" in str(errors[0])


def test_no_code_in_loralens_unpickles():
    """Every torch.load passes weights_only=True, np.load allow_pickle=False, and model
    from_pretrained use_safetensors=True; nothing calls pickle.load(s)."""
    safe = {"torch.load": ("weights_only", "True"), "np.load": ("allow_pickle", "False")}
    config_only = {"PeftModel", "DDPMScheduler", "AutoTokenizer"}  # read no pickled weights
    bad = []
    for path in Path(loralens.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            owner, attr = ast.unparse(node.func.value), node.func.attr
            kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
            where = f"{path}:{node.lineno} {owner}.{attr}"
            if f"{owner}.{attr}" in safe:
                key, value = safe[f"{owner}.{attr}"]
                if kw.get(key) != value:
                    bad.append(f"{where} without {key}={value}")
            if owner in {"pickle", "dill", "joblib", "cloudpickle"} and attr.startswith("load"):
                bad.append(where)
            model = attr == "from_pretrained" and owner not in config_only
            if model and kw.get("use_safetensors") != "True":
                bad.append(f"{where} without use_safetensors=True")
    assert bad == []
