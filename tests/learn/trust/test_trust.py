"""A run's intervals and fit check end to end: stored with the run, deterministic, on every
predict row (JSON schema), a scaled LoRA flagged, another layout refused by name, folders of
adapters predicted with per-adapter failures, and runs saved before calibration still predict."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import loralens as ll
from helpers import older_calibration
from loralens.cli import app
from loralens.errors import RunError
from loralens.learn.runs.folder import load_run
from loralens.learn.training.config import TrainConfig
from loralens.learn.training.loop import train
from loralens.store import LoRAStore

runner = CliRunner()
DATA = Path(__file__).parents[2] / "data"
COMMON = {"adapter", "prediction", "coverage", "in_distribution", "ood_score", "threshold"}
COMMON |= {"reasons", "calibrated", "error", "seen", "run"}


def _train(store, out, target="y", seed=0, **kw):
    config = TrainConfig(model="glnet", targets=[target], epochs=4, seed=seed, plots=False, **kw)
    return train(store, config, out)


@pytest.fixture(scope="module")
def reg_run(make_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("trust")
    store = make_store(root / "s", n=100)
    _train(store, root / "run")
    return store, root / "run"


def _scaled(lora: ll.LoRA, factor: float) -> ll.LoRA:
    return ll.LoRA([ll.LoRALayer(x.name, x.U * factor, x.V) for x in lora.layers])


def test_metrics_report_coverage_width_and_flag_share_on_the_test_split(reg_run):
    _, run_dir = reg_run
    cal = json.loads((run_dir / "metrics.json").read_text())["calibration"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # 10 held out; a run that is its linear base alone adds the base's 80 out-of-fold residuals
    held = {"split": 10, "split+cv": 90}
    assert cal["method"] == ("split+cv" if metrics["best_epoch"] == 0 else "split")
    assert cal["coverage"] == 0.9 and cal["n_calibration"] == held[cal["method"]]
    test = cal["test"]
    assert test["n"] == 10 and 0 <= test["coverage"] <= 1 and test["width_rel_std"] > 0
    assert 0 <= test["flagged"] <= 1 and test["width_no_weights_rel_std"] > 0
    assert cal["scale_threshold"] > 0 and cal["ood_threshold"] > 0
    assert (run_dir / "calibration.json").is_file() and (
        run_dir / "calibration.safetensors"
    ).is_file()


def test_predict_rows_have_the_documented_schema(reg_run, make_store, tmp_path):
    store, run_dir = reg_run
    ll.save_lora(store[0], tmp_path / "a")
    res = runner.invoke(app, ["predict", str(run_dir), str(tmp_path / "a"), "--json"])
    assert res.exit_code == 0, res.output
    (row,) = json.loads(res.output)
    assert set(row) == COMMON | {"interval"}
    lo, hi = row["interval"]["y"]
    assert lo <= row["prediction"]["y"] <= hi and row["coverage"] == 0.9
    assert isinstance(row["in_distribution"], bool) and row["threshold"] > 0
    assert row["calibrated"] is True and row["error"] is None and row["reasons"] == []
    # classification: probability and prediction set instead of an interval
    cls = make_store(tmp_path / "c", n=70)
    _train(cls, tmp_path / "crun", target="c")
    ll.save_lora(cls[0], tmp_path / "b")
    res = runner.invoke(app, ["predict", str(tmp_path / "crun"), str(tmp_path / "b"), "--json"])
    (row,) = json.loads(res.output)
    assert set(row) == COMMON | {"probability", "set", "label"}
    assert row["set"]["c"] in ([0], [1], [0, 1], []) and 0 <= row["probability"]["c"] <= 1


def test_a_lora_scaled_by_10_or_by_a_tenth_is_flagged(reg_run):
    store, run_dir = reg_run
    """The largest training-like LoRA times 10 and the smallest times 0.1: both 10x outside the
    range of update norms the run trained on."""
    run = load_run(run_dir)
    y = store.labels(["y"]).ravel()  # s^2: the scale of each LoRA's U
    lo, hi = store[int(np.argmin(y))], store[int(np.argmax(y))]
    plain, big, small = run.predict([hi, _scaled(hi, 10.0), _scaled(lo, 0.1)])
    assert not any("norm" in r for r in plain["reasons"])
    for row, side in ((big, "above"), (small, "below")):
        assert row["in_distribution"] is False and row["prediction"] is not None
        assert any(f"{side} the training range" in r for r in row["reasons"]), row["reasons"]


def test_another_layout_is_refused_naming_the_modules_and_the_rest_predicted(reg_run, tmp_path):
    store, run_dir = reg_run
    other = ll.LoRA(
        [ll.LoRALayer(f"mlp.{i}.fc", torch.randn(12, 2), torch.randn(10, 2)) for i in range(2)]
    )
    ll.save_lora(other, tmp_path / "other")
    ll.save_lora(store[1], tmp_path / "good")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    args = [str(tmp_path / "other"), str(tmp_path / "good"), str(tmp_path / "junk.safetensors")]
    res = runner.invoke(app, ["predict", str(run_dir), *args, "--json"])
    assert res.exit_code == 1  # some adapters failed
    other_row, good, junk = json.loads(res.stdout)
    assert "missing layers" in other_row["error"] and "h.0.attn" in other_row["error"]
    assert "mlp.0.fc" in other_row["error"] and other_row["prediction"] is None
    assert good["error"] is None and good["prediction"] is not None
    assert "junk.safetensors" in junk["error"]


def test_a_folder_of_adapters_is_predicted_adapter_by_adapter(reg_run, tmp_path):
    store, run_dir = reg_run
    for k in range(3):
        ll.save_lora(store[k], tmp_path / "zoo" / f"a{k}")
    rows = load_run(run_dir).predict(str(tmp_path / "zoo"))
    assert [Path(r["adapter"]).name for r in rows] == ["a0", "a1", "a2"]
    assert all(r["error"] is None for r in rows)


def test_calibration_is_the_same_for_the_same_seed(make_store, tmp_path):
    store = make_store(tmp_path / "s", n=64)
    for name in ("a", "b"):
        _train(store, tmp_path / name, seed=3)
    assert (tmp_path / "a" / "calibration.json").read_text() == (
        tmp_path / "b" / "calibration.json"
    ).read_text()
    a, b = (load_run(tmp_path / n).calibration for n in ("a", "b"))
    np.testing.assert_array_equal(a.scores, b.scores)
    np.testing.assert_array_equal(a.fit.reference, b.fit.reference)


def test_small_zoos_calibrate_cross_conformally(make_store, tmp_path):
    m = _train(make_store(tmp_path / "s", n=30), tmp_path / "r")
    assert m["calibration"]["method"] == "cross" and m["calibration"]["test"]["cross_fitted"]
    assert m["calibration"]["n_calibration"] == 30


@pytest.mark.parametrize("name", ["mlp", "mlp-oalign"])
def test_runs_saved_before_calibration_predict_without_intervals_and_say_so(name, tmp_path):
    shutil.copytree(DATA / "store-v1", tmp_path / "store")
    store = LoRAStore(tmp_path / "store")
    ll.save_lora(store[0], tmp_path / "a")
    run_dir = DATA / "runs-rowmajor" / name
    assert load_run(run_dir).calibration is None
    res = runner.invoke(app, ["predict", str(run_dir), str(tmp_path / "a"), "--json"])
    assert res.exit_code == 0, res.output
    (row,) = json.loads(res.output)
    assert row["interval"] is None and row["in_distribution"] is None
    assert row["calibrated"] is False and row["prediction"]["y"] is not None
    res = runner.invoke(app, ["predict", str(run_dir), str(tmp_path / "a")])
    assert res.exit_code == 0 and "no calibration" in res.output


def test_calibrations_saved_before_the_scale_score_load_and_predict_with_the_ood_score(
    reg_run, tmp_path
):
    """A version-1 calibration (no scale model) is this one without its size arrays and keys."""
    store, run_dir = reg_run
    assert load_run(run_dir).calibration.fit.size is not None
    older_calibration(run_dir, tmp_path / "run", version=1)
    old = load_run(tmp_path / "run")
    assert old.calibration.fit.size is None and old.calibration.fit.shares() == (0.05, 0.0, 0.0)
    (row,) = old.predict(store[0])
    assert row["error"] is None and isinstance(row["in_distribution"], bool)
    assert row["interval"]["y"][0] <= row["prediction"]["y"] <= row["interval"]["y"][1]


def test_a_damaged_calibration_is_refused_naming_the_file(reg_run, tmp_path):
    _, run_dir = reg_run
    shutil.copytree(run_dir, tmp_path / "run")
    path = tmp_path / "run" / "calibration.json"
    cal = json.loads(path.read_text())
    cal["targets"] = ["other"]
    path.write_text(json.dumps(cal))
    with pytest.raises(RunError, match=r"calibration\.json"):
        load_run(tmp_path / "run")


def test_a_scale_model_of_the_wrong_length_is_refused_naming_the_file(reg_run, tmp_path):
    from safetensors.numpy import load_file, save_file

    _, run_dir = reg_run
    shutil.copytree(run_dir, tmp_path / "run")
    path = tmp_path / "run" / "calibration.safetensors"
    arrays = load_file(str(path))
    arrays["size_coef"] = arrays["size_coef"][:-1]
    save_file(arrays, str(path))
    with pytest.raises(RunError, match=r"calibration\.safetensors: size_coef has shape"):
        load_run(tmp_path / "run")


@pytest.mark.parametrize("with_cal", [True, False])
def test_a_split_column_is_kept_and_its_cal_rows_calibrate(make_store, tmp_path, with_cal):
    """A store's split column decides the rows: its ``cal`` rows calibrate, else the rows the
    final model was fitted on, out of fold (CV+); no training row is moved."""

    def split(k, s):
        part = ["train"] * 6 + ["val", "test"] + (["cal"] * 2 if with_cal else ["train"] * 2)
        return {"split": part[k % 10]}

    m = _train(make_store(tmp_path / "s", n=100, extra=split), tmp_path / "r")
    cal = m["calibration"]
    assert m["n"]["train"] == (60 if with_cal else 80)
    # no cal rows: train + val out of fold for the base alone, else val with the base out of fold
    want = ("cv", 90) if m["best_epoch"] == 0 else ("val+cv", 10)
    if with_cal:  # 20 cal rows, and the linear base's 70 out-of-fold residuals if it alone won
        want = ("split+cv", 90) if m["best_epoch"] == 0 else ("split", 20)
    assert (cal["method"], cal["n_calibration"]) == want
