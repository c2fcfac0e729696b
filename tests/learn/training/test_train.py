"""Training: per-model defaults, determinism, checkpoints, and a 2-process accelerate (DDP) run."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import loralens as ll
from loralens.learn.runs.evaluation import evaluate
from loralens.learn.runs.folder import load_run
from loralens.learn.training.config import TrainConfig
from loralens.learn.training.loop import train
from loralens.store import LoRAStore, write_store

SHAPES = ((12, 10), (6, 10))


def _store(path, n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    items = []
    for k in range(n):
        s = 0.2 + 1.8 * float(torch.rand(1, generator=g))
        layers = [
            ll.LoRALayer(
                f"h.{i}.attn", torch.randn(o, 2, generator=g) * s, torch.randn(m, 2, generator=g)
            )
            for i, (o, m) in enumerate(SHAPES)
        ]
        items.append((f"x{k}", ll.LoRA(layers), {"y": s * s, "c": int(s > 1.1)}))
    return write_store(path, items)


def test_defaults_need_no_flags_and_checkpoint_reloads(tmp_path):
    store = _store(tmp_path / "s")
    cfg = TrainConfig(model="mlp-oalign", targets=["y"], epochs=3, plots=False)
    assert cfg.resolved()["lr"] > 0 and cfg.resolved()["batch_size"] > 0
    m = train(store, cfg, tmp_path / "run")
    run = load_run(tmp_path / "run")
    # the O-Align template was chosen from training data and travels in the checkpoint
    assert any(k.startswith("template_U_") for k in run.model.state_dict())
    ev = evaluate(run, store)
    assert ev["n"] == 40 and m["task"] == "regression"
    cfg_json = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg_json["model"]["name"] == "mlp-oalign" and cfg_json["task"]["targets"] == ["y"]


@pytest.mark.slow
def test_two_process_accelerate_run(tmp_path):
    """`accelerate launch` with 2 CPU processes (DDP over gloo) trains with no code change.

    The launcher runs as a module of this interpreter (accelerate is a dependency), so the test
    runs wherever loralens is installed, whether or not an `accelerate` script is on PATH."""
    _store(tmp_path / "s")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "loralens",
        "train", "--data", str(tmp_path / "s"), "--target", "y", "--model", "glnet",
        "--out", str(tmp_path / "run"), "--epochs", "3", "--quiet", "--folds", "1",
    ]  # fmt: skip
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["num_processes"] == 2
    assert metrics["n"]["test"] == 4 and np.isfinite(metrics["test"]["r2"])
    assert (tmp_path / "run" / "model.safetensors").is_file()


@pytest.mark.parametrize("name", ["mlp", "mlp-oalign"])
def test_runs_saved_before_rank_major_flattening_predict_as_they_did(name, tmp_path):
    """tests/data/runs-rowmajor holds runs written by the code before mlp/mlp-oalign flattened
    factors rank-major; their configs lack ``layout``, so they must rebuild row-major."""
    data = Path(__file__).parents[2] / "data"
    shutil.copytree(data / "store-v1", tmp_path / "store")
    store = LoRAStore(tmp_path / "store")
    run = load_run(data / "runs-rowmajor" / name)
    assert run.model.hparams["layout"] == "row-major"
    want = json.loads((data / "runs-rowmajor" / "expected.json").read_text())["predictions"][name]
    got = run.predict_loras([store[i] for i in range(len(store))])
    np.testing.assert_allclose(got, np.array(want), rtol=1e-5, atol=1e-6)
    # the same weights read rank-major see other inputs: the marker is what keeps them right
    cfg = json.loads((data / "runs-rowmajor" / name / "config.json").read_text())
    cfg["model"]["hparams"]["layout"] = "rank-major"
    moved = tmp_path / "moved"
    shutil.copytree(data / "runs-rowmajor" / name, moved)
    (moved / "config.json").write_text(json.dumps(cfg))
    other = load_run(moved).predict_loras([store[i] for i in range(len(store))])
    assert not np.allclose(other, np.array(want), rtol=1e-3)


def test_new_runs_flatten_rank_major_and_reload_so(tmp_path):
    store = _store(tmp_path / "s", n=12)
    train(store, TrainConfig(model="mlp", targets=["y"], epochs=1, plots=False), tmp_path / "r")
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["model"]["hparams"]["layout"] == "rank-major"
    assert load_run(tmp_path / "r").model.hparams["layout"] == "rank-major"


def test_a_w2t_run_computes_each_loras_canonical_form_once(tmp_path, monkeypatch):
    import importlib

    cf = importlib.import_module("loralens.canonical_form")  # the module, not the function
    plain, seen = cf.canonical_form, []  # LoRAs the run's cache put through the canonical form

    def counting(batch):
        seen.append(len(batch))
        return plain(batch)

    monkeypatch.setattr(cf, "canonical_form", counting)
    cfg = TrainConfig(model="w2t", targets=["y"], epochs=6, patience=10, plots=False)
    metrics = train(_store(tmp_path / "s", n=80), cfg)
    n = metrics["n"]
    # 6 epochs and validations, yet every train, validation and test LoRA computed once
    assert metrics["epochs_run"] == 6 and sum(seen) == n["train"] + n["val"] + n["test"]


@pytest.mark.parametrize("model, base", [("mlp-svd", "auto"), ("glnet", "none")])
def test_the_history_starts_with_epoch_0(model, base, tmp_path):
    """history.json and the learning curves begin at epoch 0, the linear base alone or GL-net
    at its warm start: validated (its point is drawn, so a best epoch of 0 marks a drawn
    point), never trained."""
    store = _store(tmp_path / "s", n=80)  # one split, not cross-validation
    cfg = TrainConfig(model=model, targets=["y"], epochs=3, patience=3, linear_base=base)
    m = train(store, cfg, tmp_path / "run")
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]
    assert history[0]["train_loss"] is None and history[0]["val_loss"] > 0
    assert all(h["train_loss"] is not None for h in history[1:])
    assert history[0]["best"] == (m["best_epoch"] == 0)
    assert m["epochs_run"] == 3 and (tmp_path / "run" / "learning_curves.png").stat().st_size
