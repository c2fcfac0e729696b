"""Writers of one store: the old store or the new, never none, never a stray copy, even when
two pack at once or one is killed mid-write."""

import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

import loralens as ll
from helpers import store_items, store_lora
from loralens.store import LoRAStore, StoreError, pack, verify_store, write_store

#: pack(src, out) in a child process, each adapter read ``delay`` seconds slower.
PACK = """
import sys, time
from loralens.formats import open_lora
from loralens.store import pack
src, out, delay, overwrite = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4] == "1"
def slow(path):
    time.sleep(delay)
    return open_lora(path)
pack(src, out, overwrite=overwrite, load=slow)
"""


def _adapters(root, prefix, n):
    """n single-file adapters <prefix><k>.safetensors (no config: quick to read)."""
    for k in range(n):
        ll.save_lora(store_lora([2, 1, 2], ord(prefix) * 100 + k), root / "tmp")
        shutil.move(root / "tmp" / "adapter_model.safetensors", root / f"{prefix}{k}.safetensors")
        shutil.rmtree(root / "tmp")
    return root


def _ids(prefix, n):
    """The ids a pack without labels gives them: their file names."""
    return tuple(f"{prefix}{k}.safetensors" for k in range(n))


def _spawn(src, out, *, delay=0.0, overwrite=True):
    args = [sys.executable, "-c", PACK, str(src), str(out), str(delay), "1" if overwrite else "0"]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.filterwarnings("ignore:.*lora_alpha is unknown")
def test_two_concurrent_packs_leave_one_whole_store_and_readers_never_see_none(tmp_path):
    a = _adapters(tmp_path / "a", "a", 6)
    b = _adapters(tmp_path / "b", "b", 6)
    c = _adapters(tmp_path / "c", "c", 2)
    out = tmp_path / "stores" / "s"
    pack(c, out)
    procs = [_spawn(a, out, delay=0.05), _spawn(b, out, delay=0.05)]
    seen = set()
    while any(p.poll() is None for p in procs):  # a reader all along: old or new, whole
        seen.add(tuple(LoRAStore(out).ids))
        time.sleep(0.01)
    for p in procs:
        assert p.wait() == 0, p.stderr.read()
    final = tuple(LoRAStore(out).ids)
    assert final in {_ids("a", 6), _ids("b", 6)}
    assert seen <= {_ids("c", 2), _ids("a", 6), _ids("b", 6)}
    assert verify_store(out).ok
    assert os.listdir(out.parent) == ["s"]  # no temporary, trash or lock left


@pytest.mark.filterwarnings("ignore:.*lora_alpha is unknown")
def test_two_packs_without_overwrite_one_wins_the_other_refuses(tmp_path):
    """Two writers in one process (threads) lock each other out just as processes do."""
    a = _adapters(tmp_path / "a", "a", 3)
    b = _adapters(tmp_path / "b", "b", 3)
    fresh = tmp_path / "stores" / "t"
    errors: list[Exception] = []

    def run(src):
        try:
            pack(src, fresh, load=lambda p: (time.sleep(0.05), ll.open_lora(p))[1])
        except StoreError as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(src,)) for src in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(errors) == 1 and "is already a store" in str(errors[0])
    assert tuple(LoRAStore(fresh).ids) in (_ids("a", 3), _ids("b", 3))
    assert os.listdir(fresh.parent) == ["t"]


@pytest.mark.filterwarnings("ignore:.*lora_alpha is unknown")
def test_an_overwrite_killed_mid_write_keeps_the_old_store_and_the_next_pack_cleans_up(tmp_path):
    old = _adapters(tmp_path / "old", "o", 3)
    new = _adapters(tmp_path / "new", "n", 8)
    out = tmp_path / "stores" / "s"
    pack(old, out)
    proc = _spawn(new, out, delay=0.3)
    deadline = time.time() + 60
    while not any(n.startswith(".s.tmp-") for n in os.listdir(out.parent)):
        assert proc.poll() is None and time.time() < deadline, "the pack never started writing"
        time.sleep(0.02)
    time.sleep(0.5)  # mid-write: some adapters read, nothing committed
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert any(n.startswith(".s.tmp-") for n in os.listdir(out.parent))  # the orphan
    store = LoRAStore(out)
    assert tuple(store.ids) == _ids("o", 3) and verify_store(out).ok

    store, _ = pack(new, out, overwrite=True)
    assert len(store) == 8
    assert os.listdir(out.parent) == ["s"]


def test_an_interrupted_two_rename_swap_is_undone_by_the_next_writer(tmp_path):
    """Where the kernel cannot exchange two names, a swap is two renames; a writer killed
    between them leaves the old store under a trash name, which the next writer puts back."""
    write_store(tmp_path / "s", store_items(3))
    pid = _dead_pid()
    os.rename(tmp_path / "s", tmp_path / f".s.old-0badcafe-{pid}")
    write_store(tmp_path / f".s.tmp-deadbeef-{pid}", store_items(1))  # its unfinished new one
    store = write_store(tmp_path / "s", [("x", store_lora([1, 1, 1], 5), {})], append=True)
    assert store.ids == ["a0", "a1", "a2", "x"]
    assert os.listdir(tmp_path) == ["s"]


def test_the_two_rename_swap_where_names_cannot_be_exchanged(tmp_path, monkeypatch):
    import loralens.atomic

    monkeypatch.setattr(loralens.atomic, "_exchange", lambda a, b: False)
    write_store(tmp_path / "s", store_items(3))
    store = write_store(tmp_path / "s", store_items(2), overwrite=True)
    assert store.ids == ["a0", "a1"] and os.listdir(tmp_path) == ["s"]


def test_a_live_writers_temporary_directory_is_spared(tmp_path):
    """Another process still writing (its pid alive) keeps its temporary directory."""
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / f".s.tmp-0123abcd-{live.pid}").mkdir()
        write_store(tmp_path / "s", store_items(2))
        assert sorted(os.listdir(tmp_path)) == [f".s.tmp-0123abcd-{live.pid}", "s"]
    finally:
        live.kill()
        live.wait()
