"""Silently wrong results (issue 14): inf labels, labels too large to standardize, models whose
outputs are not finite, JSON with NaN in it, and training settings of the wrong type or size.

Each must end in a clear error (naming the column, the adapters or the setting) or in strict
JSON, never in a NaN model saved with exit 0.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from loralens.cli import app
from loralens.errors import NonFiniteOutputError
from loralens.formats.peft import save_peft
from loralens.jsonio import json_safe
from loralens.learn.runs.checkpoint import CHECKPOINT
from loralens.learn.runs.evaluation import evaluate
from loralens.learn.runs.folder import load_run
from loralens.learn.runs.prediction import predict
from loralens.learn.training import loop
from loralens.learn.training.config import TrainConfig
from loralens.learn.training.loop import train
from loralens.models import HParamError, ModelSizeError
from loralens.store import StoreError

runner = CliRunner()


def _strict(text: str):
    """json.loads that refuses NaN / Infinity (what other JSON readers do)."""

    def refuse(name):
        raise ValueError(f"{name} in JSON")

    return json.loads(text, parse_constant=refuse)


def _labels(k: int, s: float) -> dict:
    bad = {3: math.inf, 5: -math.inf}
    return {
        "q": bad.get(k, s),  # two non-finite labels
        "big": 1e300 * (1 if k % 2 else -1) * s,  # finite, but overflows once standardized
        "z": None if k % 4 == 0 else s,  # missing labels stay allowed
        "flat": 1.5,  # constant: r2 and kendall tau are NaN
    }


@pytest.fixture(scope="module")
def store(make_store, tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("labels") / "s", n=30, extra=_labels)


def _cfg(target, **kw):
    return TrainConfig(model="mlp-svd", targets=[target], epochs=1, plots=False, **kw)


def test_inf_labels_are_refused_naming_the_column_and_the_rows(store, tmp_path):
    with pytest.raises(StoreError, match=r"target column 'q' \(2 rows\) holds inf/-inf labels"):
        train(store, _cfg("q"), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    res = runner.invoke(
        app,
        ["train", "--data", str(store.path), "--target", "q,y", "--out", str(tmp_path / "r")],
    )
    assert res.exit_code == 1 and "'q' (2 rows)" in res.output, res.output
    # rows left out by --where are not used, so their labels do not matter
    train(store, _cfg("q", where="id not in ['x003', 'x005']"), tmp_path / "ok")
    train(store, _cfg("z"), tmp_path / "missing-ok")  # NaN = missing: masked, allowed


def test_labels_too_large_to_standardize_are_refused(store):
    with pytest.raises(StoreError, match=r"labels of 'big' \(\d+ rows\) are too large"):
        train(store, _cfg("big"))


def test_evaluate_refuses_inf_labels_too(store, make_store, tmp_path):
    train(store, _cfg("y"), tmp_path / "run")
    other = make_store(tmp_path / "other", n=30, extra=lambda k, s: {"y": _labels(k, s)["q"]})
    with pytest.raises(StoreError, match=r"'y' \(2 rows\) holds inf/-inf"):
        evaluate(tmp_path / "run", other)


def test_every_json_written_or_returned_is_strict(store, tmp_path):
    metrics = train(store, _cfg("flat"), tmp_path / "run")
    json.dumps(metrics, allow_nan=False)
    for name in ("metrics.json", "history.json", "config.json"):
        _strict((tmp_path / "run" / name).read_text())
    written = _strict((tmp_path / "run" / "metrics.json").read_text())
    assert written["test"]["r2"] is None  # NaN -> null
    result = evaluate(tmp_path / "run", store, out_dir=tmp_path / "ev")
    json.dumps(result, allow_nan=False)
    assert _strict((tmp_path / "ev" / "evaluate.json").read_text())["metrics"]["r2"] is None
    nested = {"a": [1.0, float("nan"), (np.float32("inf"), np.arange(2))], "b": np.nan}
    assert json_safe(nested) == {"a": [1.0, None, [None, [0, 1]]], "b": None}


@pytest.fixture
def overflowing_run(store, tmp_path):
    """A run whose weights are finite but whose outputs overflow float32 (inf)."""
    train(store, TrainConfig(model="glnet", targets=["y"], epochs=1, plots=False), tmp_path / "r")
    state = load_file(tmp_path / "r" / CHECKPOINT)
    state["scale_skip.weight"] = torch.full_like(state["scale_skip.weight"], 3e38)
    state["scale_skip.bias"] = torch.full_like(state["scale_skip.bias"], 3e38)
    save_file(state, tmp_path / "r" / CHECKPOINT)
    return tmp_path / "r"


def test_non_finite_predictions_are_refused_naming_the_adapters(store, overflowing_run, tmp_path):
    files = [save_peft(store[k], tmp_path / f"adapter{k}") for k in range(3)]
    run = load_run(overflowing_run)
    rows = predict(run, files)  # the row of each adapter concerned says so, with no number
    bad = [r for r in rows if r["error"] is not None]
    assert bad and all("non-finite" in r["error"] and r["prediction"] is None for r in bad)
    assert all("adapter" in r["error"] for r in bad)
    res = runner.invoke(app, ["predict", str(overflowing_run), *map(str, files), "--json"])
    assert res.exit_code == 1 and "non-finite" in res.output, res.output
    assert "NaN" not in res.stdout and "Infinity" not in res.stdout
    with pytest.raises(NonFiniteOutputError, match=r"for \d+ of 30 LoRAs of .* \(ids x0"):
        evaluate(run, store)


def test_training_that_diverges_is_refused_not_saved(store, tmp_path, monkeypatch):
    real = loop.build_model

    def poisoned(*args, **kwargs):
        model = real(*args, **kwargs)
        with torch.no_grad():
            model.head[-1].bias.fill_(float("nan"))
        return model

    monkeypatch.setattr(loop, "build_model", poisoned)
    with pytest.raises(NonFiniteOutputError, match=r"training diverged.*any of 2 epoch"):
        train(store, TrainConfig(model="mlp-svd", targets=["y"], epochs=2), tmp_path / "run")
    assert not (tmp_path / "run").exists()


BAD_CONFIGS = {
    "head_hidden_1e7": ({"model": "glnet", "hparams": {"head_hidden": 1e7}}, HParamError, r"head_hidden must be an integer"),
    "hidden_0": ({"model": "glnet", "hparams": {"hidden": 0}}, HParamError, r"hidden must be an integer in \[1, 1024\]"),
    "ranks_float": ({"model": "mlp", "hparams": {"ranks": [2, 2.5]}}, HParamError, r"ranks has entries \[2.5\]"),
    "unknown_hparam": ({"model": "glnet", "hparams": {"widht": 3}}, HParamError, r"no hyperparameter\(s\) \['widht'\]"),
    "template": ({"model": "mlp-oalign", "hparams": {"template": "x"}}, HParamError, r"no hyperparameter"),
    "unknown_model": ({"model": "gnn"}, ValueError, r"unknown model 'gnn'"),
    "epochs_0": ({"epochs": 0}, HParamError, r"training: setting epochs must be an integer in \[1"),
    "epochs_float": ({"epochs": 2.0}, HParamError, r"setting epochs must be an integer"),
    "lr_nan": ({"lr": float("nan")}, HParamError, r"setting lr must be a number"),
    "batch_size_huge": ({"batch_size": 10**9}, HParamError, r"setting batch_size"),
    "targets_str": ({"targets": "y"}, ValueError, r"targets must be a non-empty list"),
    "fractions": ({"fractions": (0.5, 0.6, 0.1)}, ValueError, r"fractions must be three numbers"),
    "threads_0": ({"threads": 0}, ValueError, r"threads"),
    "task": ({"task": "ranking"}, ValueError, r"task must be"),
    "where": ({"where": "rank.__class__ == 1"}, StoreError, r"--where"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_train_settings_are_checked_when_the_config_is_made(case):
    kw, error, pattern = BAD_CONFIGS[case]
    with pytest.raises(error, match=pattern):
        TrainConfig(**{"model": "glnet", "targets": ["y"], **kw})


def test_cli_hparam_of_the_wrong_type_is_one_line(store, tmp_path):
    cmd = ["train", "--data", str(store.path), "--target", "y", "--out", str(tmp_path / "r")]
    res = runner.invoke(app, [*cmd, "--hparam", "head_hidden=1e7"])
    assert res.exit_code == 2 and "head_hidden must be an integer" in res.output, res.output
    assert not (tmp_path / "r").exists()


def test_a_model_too_large_for_memory_is_refused_before_allocating(store):
    cfg = TrainConfig(model="glnet", targets=["y"], hparams={"hidden": 1024, "head_hidden": 65536})
    with pytest.raises(ModelSizeError, match=r"GiB.*more than the .* GiB of memory available"):
        train(store, cfg)
    assert issubclass(ModelSizeError, ValueError) and issubclass(ModelSizeError, MemoryError)
