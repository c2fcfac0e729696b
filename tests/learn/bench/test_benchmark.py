"""``loralens benchmark`` and ``loralens demo``: the table's rows hold the values they name."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from loralens.cli import app
from loralens.learn.fitting.data import hparam_columns
from loralens.learn.fitting.probes import PROBES
from loralens.models import MODEL_NAMES
from loralens.store import LoRAStore

runner = CliRunner()


def _ok(result):
    assert result.exit_code == 0, result.output
    return result


def _split(k: int) -> str:
    return {3: "val", 4: "test"}.get(k % 5, "train")


def test_benchmark_no_weights_row_is_the_train_mean(make_store, tmp_path):
    """With a ``split`` column every seed has the same split, so the no-weights row is one
    number: R^2 on the test rows of predicting the train rows' mean."""
    store = make_store(
        tmp_path / "s", n=30, extra=lambda k, s: {"split": _split(k), "lr": 10.0 ** -(k % 3)}
    )
    out = tmp_path / "bench"
    cmd = ["benchmark", "--data", str(store.path), "--targets", "y", "--models", "mlp,glnet"]
    res = _ok(
        runner.invoke(app, [*cmd, "--seeds", "2", "--epochs", "2", "--out", str(out), "--json"])
    )
    table = json.loads(res.stdout)["table"]
    probes = set(PROBES)
    assert set(table) == {"mlp", "glnet", "no weights", "hyperparameters only"} | probes
    for p in probes:  # fitted once per seed, on that seed's split
        assert table[p]["y"]["n_seeds"] == 2 and table[p]["y"]["r2"]["mean"] is not None

    y = store.labels(["y"])[:, 0]
    split = np.array([_split(k) for k in range(30)])
    mean = y[split == "train"].mean()
    y_test = y[split == "test"]
    r2 = 1 - ((y_test - mean) ** 2).sum() / ((y_test - y_test.mean()) ** 2).sum()
    cell = table["no weights"]["y"]
    assert cell["n_seeds"] == 2
    assert cell["r2"]["mean"] == pytest.approx(r2, rel=1e-9) and cell["r2"]["std"] == 0
    assert table["hyperparameters only"]["y"]["columns"] == ["lr"]
    assert table["mlp"]["y"]["n_seeds"] == 2

    # every run used the split column: its test rows are the ``test`` rows
    test_ids = sorted(f"x{k:03d}" for k in range(30) if _split(k) == "test")
    for seed in (0, 1):
        run = out / "runs" / "y" / "glnet" / f"seed{seed}"
        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["n"] == {"train": 18, "val": 6, "test": 6}
        ids = pd.read_csv(run / "predictions.csv", dtype={"id": str})["id"]
        assert sorted(ids) == test_ids
    md = (out / "benchmark.md").read_text()
    assert "| no weights |" in md and "| probe: dense ΔW |" in md
    best = max(table[p]["y"]["r2"]["mean"] for p in probes)
    for name in ("mlp", "glnet"):  # a model below the better probe is marked, and only then
        row = next(line for line in md.splitlines() if line.startswith(f"| {name} |"))
        assert ("▼" in row) == (table[name]["y"]["r2"]["mean"] < best)


def test_hyperparameter_columns_come_from_the_zoo_manifest(make_peft_zoo, tmp_path):
    """A zoo whose zoo.json lists ``hyperparameter_columns`` names them (even under names the
    fallback does not know, or none); an older zoo without the key falls back to known names."""
    zoo = make_peft_zoo(tmp_path / "zoo", n=12)
    labels = pd.read_csv(zoo / "labels.csv", dtype={"adapter": str})
    labels["knob"] = np.arange(12) % 3
    labels["lr"] = 10.0 ** -(np.arange(12) % 4)
    labels["flat"] = 1.0  # listed but constant: says nothing, left out
    labels.to_csv(zoo / "labels.csv", index=False)

    (zoo / "zoo.json").write_text(json.dumps({"preset": "x"}))
    _ok(runner.invoke(app, ["pack", str(zoo), "--out", str(tmp_path / "old")]))
    assert hparam_columns(LoRAStore(tmp_path / "old")) == ["lr"]

    (zoo / "zoo.json").write_text(json.dumps({"hyperparameter_columns": ["knob", "flat"]}))
    _ok(runner.invoke(app, ["pack", str(zoo), "--out", str(tmp_path / "new")]))
    store = LoRAStore(tmp_path / "new")
    assert hparam_columns(store) == ["knob"]
    assert hparam_columns(store, exclude=["knob"]) == []

    # a zoo that records no hyperparameters says so: no guess from column names
    (zoo / "zoo.json").write_text(json.dumps({"hyperparameter_columns": []}))
    _ok(runner.invoke(app, ["pack", str(zoo), "--out", str(tmp_path / "none")]))
    assert hparam_columns(LoRAStore(tmp_path / "none")) == []


@pytest.mark.slow
def test_demo_runs_end_to_end_on_a_tiny_zoo(tmp_path):
    """Every step of ``loralens demo`` (zoo, store, every model and row, plots, verdict) on the
    smallest settings: the table and the verdict name the three targets the zoo gives."""
    out = tmp_path / "demo"
    cmd = ["demo", "--out", str(out), "--num", "10", "--seeds", "1", "--epochs", "1"]
    res = _ok(runner.invoke(app, [*cmd, "--threads", "1"]))
    demo = json.loads((out / "demo.json").read_text())
    # eval_loss, the skill loss that varies most and the most balanced 0/1 label column
    manifest = json.loads((out / "zoo" / "zoo.json").read_text())
    labels = pd.read_csv(out / "zoo" / "labels.csv")
    rates = {c: labels[c].mean() for c in manifest["binary_columns"]}
    balanced = min(rates, key=lambda c: (abs(rates[c] - 0.5), c))
    varied = labels.filter(like="loss_").std(ddof=0).idxmax()
    assert demo["targets"] == ["eval_loss", varied, balanced] and demo["num"] == 10
    result = json.loads((out / "benchmark" / "benchmark.json").read_text())
    assert set(MODEL_NAMES) | {"no weights"} <= set(result["table"])
    assert result["models"] == list(MODEL_NAMES)
    assert "| no weights |" in res.stdout and "| probe: spectral |" in res.stdout
    assert "How to read it" in res.stdout
    verdict = res.stdout[res.stdout.index("What the demo learned") :].splitlines()
    assert verdict == demo["verdict"] and verdict[-1].startswith("In short:")
    for target, line in zip(demo["targets"], verdict[1::2]):
        assert line.startswith(f"- {target} (") and "knowing nothing" in line
    assert all("linear base" in line for line in verdict[2:-1:2])
    assert len(list((out / "benchmark" / "runs").rglob("learning_curves.png"))) == 3 * 6


def _result(scores: dict[str, dict[str, tuple[float, float]]], kept: dict[str, int]) -> dict:
    """A benchmark result: (row -> target -> primary metric's mean and std over seeds),
    (target -> best epoch of every model's run)."""
    models = ["mlp", "glnet"]
    task = {"eval_loss": "regression", "loss_sort": "regression", "src_sub": "classification"}
    key = {"regression": "r2", "classification": "accuracy"}
    table = {
        row: {
            t: {"task": task[t], key[task[t]]: {"mean": mean, "std": std}}
            for t, (mean, std) in cells.items()
        }
        for row, cells in scores.items()
    }
    runs = [{"target": t, "model": m, "best_epoch": e} for t, e in kept.items() for m in models]
    return {"table": table, "runs": runs, "models": models, "targets": list(task), "seeds": [0, 1]}


def test_the_demo_verdict_says_what_was_learned_against_what():
    from loralens.learn.bench.demo import verdict

    lines = verdict(
        _result(
            {
                "mlp": {
                    "eval_loss": (0.16, 0.36),
                    "loss_sort": (0.71, 0.1),
                    "src_sub": (0.62, 0.04),
                },
                "glnet": {
                    "eval_loss": (0.16, 0.36),
                    "loss_sort": (0.75, 0.1),
                    "src_sub": (0.64, 0.04),
                },
                "no weights": {
                    "eval_loss": (-0.14, 0.2),
                    "loss_sort": (-0.02, 0.0),
                    "src_sub": (0.5, 0),
                },
                "hyperparameters only": {
                    "eval_loss": (-0.33, 0.5),
                    "loss_sort": (0.3, 0.1),
                    "src_sub": (0.55, 0.1),
                },
                "probe: dense ΔW": {"loss_sort": (0.74, 0.1), "src_sub": (0.63, 0.05)},
            },
            {"eval_loss": 0, "loss_sort": 3, "src_sub": 0},
        )
    )
    assert lines[0] == "What the demo learned (on test LoRAs no model saw, mean over 2 seed(s)):"
    # R² from 0 (the training mean's), and a margin inside the seeds' spread is none
    assert lines[1].startswith("- eval_loss (the finetuned model's loss")
    assert "R² 0.16 ± 0.36 from the weights (every model alike)" in lines[1]
    assert lines[1].endswith("level with both within the spread over seeds.")
    assert "kept its linear base alone" in lines[2] and "t-test" in lines[2]
    assert "R² 0.75 ± 0.10 from the weights (best: glnet)" in lines[3]
    assert "-0.02 knowing nothing and 0.30 from the finetuning hyperparameters" in lines[3]
    assert "well above both; a linear probe of the weights gets 0.74." in lines[3]
    assert "improved on its linear base in 2 of 2 runs (glnet, mlp)" in lines[4]
    assert "accuracy 0.64 ± 0.04" in lines[5] and "above both;" in lines[5]
    assert "well" not in lines[5]
    assert lines[7] == (
        "In short: from the adapter weights alone the models learned loss_sort well beyond "
        "what knowing nothing or knowing the training recipe gives."
    )
