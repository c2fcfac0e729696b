"""Hostile and broken labels and adapter folders: every case is a clear error naming the file
or adapter, or a correct store; nothing outside the adapters folder is read, nothing hangs."""

import multiprocessing
import os
import shutil

import numpy as np
import pytest

import loralens as ll
from helpers import store_lora
from loralens.store import PackError, StoreError, is_packed_from, pack, read_labels

pytestmark = pytest.mark.filterwarnings("ignore:.*lora_alpha is unknown")


def _adapters(root, names=("000000", "000001", "000002")):
    """Single-file adapters <name>.safetensors (quick to read: no config)."""
    root.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(names):
        ll.save_lora(store_lora([2, 1, 2], k), root / "tmp")
        shutil.move(root / "tmp" / "adapter_model.safetensors", root / f"{name}.safetensors")
        shutil.rmtree(root / "tmp")
    return root


def _csv(path, text):
    path.write_text(text)
    return path


class _Recorder:
    """A ``load`` for pack that records every path it is asked to read."""

    def __init__(self):
        self.paths = []

    def __call__(self, path):
        self.paths.append(os.path.realpath(path))
        return ll.open_lora(path)


def _in_time(fn, seconds=30):
    """``fn()`` run in a forked child: its (picklable) result, or its StoreError raised here;
    fails if it does not end in time (a hang on a named pipe may hold the GIL: a thread
    would not do)."""
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)

    def run():
        try:
            send.send(("value", fn()))
        except StoreError as e:
            send.send(("error", str(e), getattr(e, "refused", None)))

    child = ctx.Process(target=run)
    child.start()
    done = receive.poll(seconds)
    if not done:
        child.kill()
    child.join()
    assert done, "hung"
    out = receive.recv()
    if out[0] == "error":
        raise StoreError(out[1]) if out[2] is None else PackError(out[1], out[2])
    return out[1]


def test_empty_and_header_only_labels_are_errors_naming_the_file(tmp_path):
    src = _adapters(tmp_path / "a")
    for text, why in [("", "empty"), ("adapter,y\n", "no rows"), ("\n\n", "empty")]:
        labels = _csv(tmp_path / "labels.csv", text)
        with pytest.raises(StoreError, match=f"{labels}: {why}"):
            pack(src, tmp_path / "s", labels=labels)
    assert not (tmp_path / "s").exists()


def test_the_adapter_column_need_not_be_first(tmp_path):
    src = _adapters(tmp_path / "a")
    labels = _csv(tmp_path / "l.csv", "y,adapter,z\n1.5,000001,x\n2.5,000000,y\n3.5,000002,z\n")
    assert read_labels(labels).columns.tolist() == ["adapter", "y", "z"]
    store, _ = pack(src, tmp_path / "s", labels=labels)
    assert store.ids == ["000001", "000000", "000002"]
    assert store.labels("y").ravel().tolist() == [1.5, 2.5, 3.5]
    first = _csv(tmp_path / "f.csv", "name,y\n000000,1\n000001,2\n000002,3\n")  # no 'adapter'
    assert read_labels(first)["adapter"].tolist() == ["000000", "000001", "000002"]


def test_a_label_named_like_a_store_column_keeps_its_values_or_is_refused(tmp_path):
    src = _adapters(tmp_path / "a")
    labels = _csv(tmp_path / "l.csv", "adapter,rank,id\n000000,16,x\n000001,32,y\n000002,8,z\n")
    store, _ = pack(src, tmp_path / "s", labels=labels)
    assert store.labels("rank_label").ravel().tolist() == [16, 32, 8]  # the user's ranks
    assert store.index["id_label"].tolist() == ["x", "y", "z"]
    assert store.index["rank"].tolist() == [2, 2, 2]  # the store's own: the adapters' ranks
    both = _csv(tmp_path / "b.csv", "adapter,rank,rank_label\n000000,16,1\n000001,32,2\n")
    with pytest.raises(StoreError) as e:
        pack(src, tmp_path / "t", labels=both, skip_missing=True)
    message = str(e.value)
    assert message.startswith(f"{both}: label columns 'rank' and 'rank_label' would both")
    assert "id, source, rank, shapes_key, _shard, _key, _row, _ranks" in message
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize(
    "names",
    [["000000", "./000000", "000000/"], ["000000", "000000.safetensors"], ["a/../000000"]],
    ids=["spellings", "suffix", "dotdot-inside"],
)
def test_names_aliasing_one_adapter_are_refused_naming_them(tmp_path, names):
    src = _adapters(tmp_path / "a")
    labels = _csv(tmp_path / "l.csv", "adapter,y\n" + "".join(f"{n},1\n" for n in names))
    load = _Recorder()
    with pytest.raises(StoreError) as e:
        pack(src, tmp_path / "s", labels=labels, skip_missing=True, load=load)
    message = str(e.value)
    assert message.startswith(str(labels)) and load.paths == []
    if len(names) > 1:
        assert "listed twice" in message and all(repr(n) in message for n in names)
    else:
        assert "points outside the adapters folder" in message


def test_names_outside_the_folder_are_refused_and_never_read(tmp_path):
    src = _adapters(tmp_path / "a")
    _adapters(tmp_path / "secret", ["key"])
    for name in ["../secret/key", str(tmp_path / "secret" / "key"), "000000/../../secret/key"]:
        labels = _csv(tmp_path / "l.csv", f"adapter,y\n000000,1\n{name},2\n")
        load = _Recorder()
        with pytest.raises(StoreError, match=f"adapter name '{name}' points outside"):
            pack(src, tmp_path / "s", labels=labels, skip_missing=True, load=load)
        assert load.paths == []
    # a symbolic link inside the folder that leads out: refused by name, not read
    os.symlink(tmp_path / "secret" / "key.safetensors", src / "link.safetensors")
    labels = _csv(tmp_path / "l.csv", "adapter,y\n000000,1\nlink,2\n")
    load = _Recorder()
    with pytest.raises(PackError) as e:
        pack(src, tmp_path / "s", labels=labels, skip_missing=True, load=load)
    assert e.value.refused == [("link", f"link.safetensors leads outside {src}")]
    assert all(str(tmp_path / "secret") not in p for p in load.paths)


def test_a_non_numeric_label_says_which_adapter_and_value(tmp_path):
    src = _adapters(tmp_path / "a")
    labels = _csv(tmp_path / "l.csv", "adapter,y,note\n000000,1.5,a\n000001,about 2,b\n000002,,c\n")
    store, _ = pack(src, tmp_path / "s", labels=labels)
    with pytest.raises(StoreError) as e:
        store.labels("y")
    assert str(e.value) == (
        f"{store.path}: label column 'y' is not numeric: LoRA '000001' has 'about 2' (labels must "
        "be numbers, or empty where unknown)"
    )
    assert store.index["note"].tolist() == ["a", "b", "c"]  # text columns are kept as text


def test_an_inf_label_is_stored_as_is(tmp_path):
    src = _adapters(tmp_path / "a")
    labels = _csv(tmp_path / "l.csv", "adapter,y\n000000,inf\n000001,-inf\n000002,1\n")
    store, _ = pack(src, tmp_path / "s", labels=labels)
    assert store.labels("y").ravel().tolist() == [np.inf, -np.inf, 1.0]


def test_labels_and_folder_that_do_not_match_are_refused_unless_skip_missing(tmp_path):
    src = _adapters(tmp_path / "a", ["000000", "000001", "000002", "000003"])
    labels = _csv(tmp_path / "l.csv", "adapter,y\n000000,1\n000001,2\nghost,3\n")
    with pytest.raises(PackError, match=r"1 adapter.* not in .*, 2 adapter.* in .* not named") as e:
        pack(src, tmp_path / "s", labels=labels)
    assert [n for n, _ in e.value.refused] == ["ghost", "000002.safetensors", "000003.safetensors"]
    assert "not found" in e.value.refused[0][1] and "not named" in e.value.refused[1][1]
    assert not (tmp_path / "s").exists()
    store, refused = pack(src, tmp_path / "s", labels=labels, skip_missing=True)
    assert store.ids == ["000000", "000001"] and refused == e.value.refused
    history = store.info["history"][-1]
    assert history["refused"] == ["ghost"]
    assert history["unlabeled"] == ["000002.safetensors", "000003.safetensors"]
    assert is_packed_from(tmp_path / "s", labels)


@pytest.mark.parametrize("skip_bad", [False, True])
def test_a_named_pipe_in_the_folder_is_refused_by_name_never_opened(tmp_path, skip_bad):
    src = _adapters(tmp_path / "a")
    os.mkfifo(src / "pipe.safetensors")
    (src / "folder").mkdir()  # an adapter folder whose weights are a pipe
    os.mkfifo(src / "folder" / "adapter_model.safetensors")
    os.mkfifo(src / "no-suffix")  # not an adapter by name: ignored

    def run():
        store, refused = pack(src, tmp_path / "s", skip_bad=skip_bad)
        return store.ids, refused

    if not skip_bad:
        with pytest.raises(PackError) as e:
            _in_time(run)
        refused = e.value.refused
    else:
        ids, refused = _in_time(run)
        assert ids == ["000000.safetensors", "000001.safetensors", "000002.safetensors"]
    assert refused == [
        ("folder", "folder/adapter_model.safetensors is a named pipe, not a file"),
        ("pipe.safetensors", "pipe.safetensors is a named pipe, not an adapter file or folder"),
    ]
    labels = _csv(tmp_path / "l.csv", "adapter,y\n000000,1\npipe,2\n")  # named in labels too
    with pytest.raises(PackError) as e:
        _in_time(lambda: pack(src, tmp_path / "t", labels=labels, skip_missing=True)[1])
    assert e.value.refused == [
        ("pipe", "pipe.safetensors is a named pipe, not an adapter file or folder")
    ]


def test_a_named_pipe_as_the_labels_file_is_refused(tmp_path):
    src = _adapters(tmp_path / "a")
    os.mkfifo(tmp_path / "labels.csv")
    with pytest.raises(StoreError, match=f"{tmp_path / 'labels.csv'} is a named pipe"):
        _in_time(lambda: pack(src, tmp_path / "s", labels=tmp_path / "labels.csv")[1])
    zoo = tmp_path / "zoo"  # a zoo folder whose labels.csv is a pipe: the same
    shutil.copytree(src, zoo / "adapters")
    os.mkfifo(zoo / "labels.csv")
    with pytest.raises(StoreError, match=r"labels\.csv is a named pipe"):
        _in_time(lambda: pack(zoo, tmp_path / "s")[1])
    assert not is_packed_from(tmp_path / "s", zoo / "labels.csv")
