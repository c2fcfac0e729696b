"""Packing a folder of adapters plus labels: labels joined by name."""

import random
import shutil

import pytest

import loralens as ll
from helpers import random_lora
from loralens.store import StoreError, pack, read_labels


def _signature(lora: ll.LoRA) -> float:
    """A label that is a known function of an adapter's weights."""
    return float(lora.layers[0].U[0, 0]) + 10 * float(lora.layers[1].V[-1, -1])


def _folder(root, n, *, single_files, seed=0):
    """n adapters named by number, saved in disk order, and a labels.csv listing them shuffled,
    whose labels are each adapter's _signature and its number."""
    root.mkdir(parents=True)
    rows = []
    for k in range(n):
        lora = random_lora([2, 3, 1] if k % 2 else [4, 1, 2], 100 + k)
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
