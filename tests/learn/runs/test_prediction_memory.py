"""predict holds one batch of adapters at a time (one adapter, for adapters as large as the
batch budget), never all of them, each read a layer at a time into the model's batch: the
README's bound, measured."""

from __future__ import annotations

import pandas as pd
import pytest

from helpers import can_measure_peak_memory, peak_memory, wide_peft_adapter
from loralens.learn import TrainConfig, train
from loralens.learn.runs.prediction import BATCH_BYTES
from loralens.store import pack

pytestmark = pytest.mark.skipif(
    not can_measure_peak_memory(), reason="reads peak memory from Linux /proc"
)

MiB = 2**20
LAYERS, WIDTH = 4, 16384

_PREDICT = """
import sys
from loralens.learn import load_run

trained = load_run(sys.argv[3])


def warm():  # a small adapter of the same layout: lazy imports, thread pools, the model's buffers
    trained.predict([sys.argv[2]])


def run():
    return [row["error"] for row in trained.predict([sys.argv[1]])]
"""


def test_predict_holds_one_large_adapter_at_a_time(tmp_path):
    """Two adapters of four 16384 x 16384 rank-128 float16 layers (16 MiB each as float32,
    64 MiB per adapter: the batch budget, so each is its own batch): predict peaks at most at
    one adapter (its batch) + 2 layers (one being read, and what mlp-svd and the fit check work
    with) + 16 MiB; reading both first and collating them, as predict did, peaked near 320 MiB.
    """
    zoo = tmp_path / "zoo"
    for k in range(12):  # a run for this layout, trained on rank-2 adapters
        wide_peft_adapter(zoo / f"a{k}", LAYERS, WIDTH, 2, seed=k)
    labels = pd.DataFrame({"adapter": [f"a{k}" for k in range(12)], "y": list(range(12))})
    pack(zoo, tmp_path / "store", labels=labels)
    config = TrainConfig(model="mlp-svd", targets=["y"], epochs=2, plots=False, probes=False)
    train(tmp_path / "store", config, tmp_path / "run")
    big = tmp_path / "big"
    for k in range(2):
        wide_peft_adapter(big / f"b{k}", LAYERS, WIDTH, 128, seed=100 + k)
    layer = 2 * WIDTH * 128 * 4
    assert LAYERS * layer == BATCH_BYTES
    m = peak_memory(_PREDICT, big, zoo / "a0", tmp_path / "run")
    assert m["result"] == [None, None]
    assert m["peak"] <= LAYERS * layer + 2 * layer + 16 * MiB, f"{m['peak'] / MiB:.1f} MiB"
