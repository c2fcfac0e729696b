"""Width invariance: a zoo whose layers are all embedded isometrically in wider ones (the same
updates, inner products, norms and singular values) trains to the same run."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import loralens as ll
from loralens.learn import TrainConfig, load_run, train
from loralens.store import LoRAStore, write_store


def lift_store(store: LoRAStore, path, factor: int, seed: int = 7) -> LoRAStore:
    """``store`` with every LoRA lifted by :func:`loralens.lift_width` (one Q per layer and
    side, the same for every LoRA)."""
    items = []
    for row in range(len(store)):
        lora = store[row]
        labels = {c: float(v) for c, v in lora.metadata["labels"].items()}
        items.append((lora.metadata["id"], ll.lift_width(lora, factor, seed), labels))
    return write_store(path, items)


@pytest.mark.slow
@pytest.mark.parametrize("linear_base", ["auto", "none"])
def test_a_lifted_store_trains_to_the_same_predictions(tmp_path, make_store, linear_base):
    """The default run (base and network), and the network alone, on a store and on its lift to
    layers 8 times wider: the same test predictions, to 1e-3 of the labels' spread (the
    network's float32 steps drift apart by rounding, nothing more)."""
    store = make_store(
        tmp_path / "s", n=80, ranks=(2, 3), extra=lambda k, s: {"z": np.log(s) + 0.1 * (k % 5)}
    )
    wide = lift_store(store, tmp_path / "w", 8)
    runs = []
    for name, data in (("a", store), ("b", wide)):
        cfg = TrainConfig("glnet", ["z"], epochs=4, plots=False, linear_base=linear_base)
        train(data, cfg, tmp_path / name)
        runs.append(pd.read_csv(tmp_path / name / "predictions.csv").set_index("id"))
    a, b = runs
    assert list(a.index) == list(b.index)
    spread = float(store.labels(["z"]).std())
    np.testing.assert_allclose(b["z_pred"], a["z_pred"], rtol=0, atol=1e-3 * spread)
    assert (
        load_run(tmp_path / "b").model.inner.shapes == load_run(tmp_path / "a").model.inner.shapes
    )
