"""Packing a folder of adapters plus labels: labels joined by name, refusals, zoo re-packing."""

import json
import random
import shutil

import pytest

import loralens as ll
from helpers import can_measure_peak_memory, peak_memory, store_lora, wide_peft_adapter
from loralens.store import LoRAStore, StoreError, is_packed_from, pack, pack_zoo_cached, read_labels


def _signature(lora: ll.LoRA) -> float:
    """A label that is a known function of an adapter's weights."""
    return float(lora.layers[0].U[0, 0]) + 10 * float(lora.layers[1].V[-1, -1])


def _folder(root, n, *, single_files, seed=0):
    """n adapters named by number, saved in disk order, and a labels.csv listing them shuffled,
    whose labels are each adapter's _signature and its number."""
    root.mkdir(parents=True)
    rows = []
    for k in range(n):
        lora = store_lora([2, 3, 1] if k % 2 else [4, 1, 2], 100 + k)
        name = f"{k:03d}"
        ll.save_lora(lora, root / name)
        if single_files:  # a bare adapter file; the CSV names it without its suffix
            shutil.move(root / name / "adapter_model.safetensors", root / f"{name}.safetensors")
            shutil.rmtree(root / name)
        rows.append(f"{name},{_signature(lora)!r},{k}")
    random.Random(seed).shuffle(rows)
    labels = root.parent / f"{root.name}.csv"
    labels.write_text("adapter,sig,number\n" + "\n".join(rows) + "\n")
    return labels


@pytest.mark.filterwarnings("ignore:.*lora_alpha is unknown")
@pytest.mark.parametrize("single_files", [False, True], ids=["peft-folders", "single-files"])
def test_pack_joins_labels_by_adapter_name_not_position(tmp_path, single_files):
    labels = _folder(tmp_path / "adapters", 8, single_files=single_files)
    names = read_labels(labels)["adapter"].tolist()
    assert names != sorted(names)  # the CSV order differs from the disk order
    store, refused = pack(tmp_path / "adapters", tmp_path / "s", labels=labels)
    assert refused == [] and store.ids == names
    suffix = ".safetensors" if single_files else ""
    for row, name in enumerate(store.ids):
        lora = store[row]
        disk = ll.load_lora(tmp_path / "adapters" / f"{name}{suffix}")
        assert store.labels("number", [row])[0, 0] == int(name)
        assert store.labels("sig", [row])[0, 0] == _signature(lora) == _signature(disk)
        assert lora.metadata["source"].endswith(f"{name}{suffix}")


def test_labels_csv_keeps_adapter_names_as_text(tmp_path):
    (tmp_path / "labels.csv").write_text("adapter,y\n000017,1.5\n000002,2.0\n")
    assert read_labels(tmp_path / "labels.csv")["adapter"].tolist() == ["000017", "000002"]
    (tmp_path / "twice.csv").write_text("adapter,y\na,1\na,2\n")
    with pytest.raises(StoreError, match="listed twice"):
        read_labels(tmp_path / "twice.csv")


def _zoo(root, n=5):
    """A zoo folder (adapters/ + labels.csv + zoo.json) with one unreadable adapter, 'junk'."""
    labels = _folder(root / "adapters", n, single_files=False)
    shutil.move(labels, root / "labels.csv")
    (root / "adapters" / "junk").mkdir()
    (root / "adapters" / "junk" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with open(root / "labels.csv", "a") as f:
        f.write("junk,0.0,99\n")
    (root / "zoo.json").write_text(json.dumps({"preset": "test", "num": n}))
    return root


def test_pack_zoo_cached_reuses_a_current_store_even_after_a_refusal(tmp_path):
    zoo, target = _zoo(tmp_path / "zoo"), tmp_path / "run" / "store"
    log: list[str] = []
    assert pack_zoo_cached(zoo, target, log.append) == target
    assert log[0].startswith("packing") and log[1].startswith("skipped junk: unreadable")
    store = LoRAStore(target)
    assert len(store) == 5 and store.info["history"][-1]["refused"] == ["junk"]
    assert store.info["history"][-1]["zoo"] == {"preset": "test", "num": 5}
    assert is_packed_from(target, zoo / "labels.csv")
    stamp = (target / "store.json").stat().st_mtime_ns

    log.clear()
    assert pack_zoo_cached(zoo, target, log.append) == target
    assert log == [] and (target / "store.json").stat().st_mtime_ns == stamp  # not re-packed

    # a new adapter in labels.csv: packed anew
    ll.save_lora(store_lora([2, 2, 2], 7), zoo / "adapters" / "new")
    with open(zoo / "labels.csv", "a") as f:
        f.write("new,1.0,50\n")
    pack_zoo_cached(zoo, target, log.append)
    assert log[0].startswith("packing") and "new" in LoRAStore(target).ids

    # same number of rows, another adapter named: packed anew too
    text = (zoo / "labels.csv").read_text().replace("new,", "004x,")
    shutil.move(zoo / "adapters" / "new", zoo / "adapters" / "004x")
    (zoo / "labels.csv").write_text(text)
    assert not is_packed_from(target, zoo / "labels.csv")
    pack_zoo_cached(zoo, target)
    assert "004x" in LoRAStore(target).ids and "new" not in LoRAStore(target).ids


@pytest.mark.filterwarnings("ignore:.*lora_alpha is unknown")
def test_a_base_model_folder_beside_the_adapters_is_not_an_unlabeled_adapter(tmp_path):
    """A folder of adapters laid out as people keep them, with the base model saved by
    transformers beside them, packs the labelled adapters; an adapter left unlabelled is still
    refused by name."""
    from helpers import tiny_llama

    labels = _folder(tmp_path / "adapters", 4, single_files=False)
    tiny_llama().save_pretrained(tmp_path / "adapters" / "base")  # config.json + weights
    store, refused = pack(tmp_path / "adapters", tmp_path / "s", labels=labels)
    assert refused == [] and len(store) == 4
    ll.save_lora(store_lora([1, 1, 1], 7), tmp_path / "adapters" / "stray")
    with pytest.raises(StoreError, match=r"^1 adapter\(s\) in .* are not named in ") as e:
        pack(tmp_path / "adapters", tmp_path / "s2", labels=labels)
    assert [name for name, _ in e.value.refused] == ["stray"]


_PACK = """
import sys
from loralens.store import pack


def warm():  # one small adapter: lazy imports (pandas, pyarrow), thread pools, their memory
    pack(sys.argv[2], sys.argv[3] + "-warm")


def run():
    store, _ = pack(sys.argv[1], sys.argv[3], dtype="float16")
    return len(store)
"""


@pytest.mark.skipif(not can_measure_peak_memory(), reason="reads peak memory from Linux /proc")
def test_pack_holds_one_layer_of_one_adapter_at_a_time(tmp_path):
    """The README's bound: pack peaks at most 1.5x the largest layer's float32 factors plus
    16 MiB. Two adapters of six 16384 x 16384 rank-128 float16 layers (16 MiB each as float32,
    96 MiB per adapter); reading whole adapters and buffering their rows, as pack did, peaked
    near 670 MiB."""
    for k in range(2):
        wide_peft_adapter(tmp_path / "big" / f"a{k}", layers=6, width=16384, rank=128, seed=k)
    wide_peft_adapter(tmp_path / "small" / "a", layers=1, width=16384, rank=128)
    m = peak_memory(_PACK, tmp_path / "big", tmp_path / "small", tmp_path / "store")
    assert m["result"] == 2
    layer = 2 * 16384 * 128 * 4
    assert m["peak"] <= 1.5 * layer + 16 * 2**20, f"{m['peak'] / 2**20:.1f} MiB"
