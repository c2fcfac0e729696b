"""End to end on a tiny zoo of real PEFT adapters: pack -> train -> evaluate -> predict.

The zoo (``peft_zoo`` in conftest.py) is made with PEFT directly on a tiny random-init model
(fast): each adapter is a rank-4 LoRA on q_proj/v_proj whose B factor is scaled by a random
``s``; the labels are ``quality`` = s^2 + noise (regression) and ``big`` = s > 1.1.
"""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import loralens as ll
from loralens.cli import app
from loralens.learn.runs.folder import load_run
from loralens.store import LoRAStore

runner = CliRunner()
N = 48


def _ok(result):
    assert result.exit_code == 0, result.output
    return result


def _train(store, target: str, model: str, run, *extra: str):
    """`loralens train` on ``store`` into ``run``, quietly; must succeed."""
    args = ["train", "--data", str(store), "--target", target, "--model", model]
    return _ok(runner.invoke(app, [*args, "--out", str(run), "--quiet", *extra]))


def test_pack_train_evaluate_predict(peft_zoo, tmp_path):
    store_dir, run = tmp_path / "store", tmp_path / "run"
    out = _ok(
        runner.invoke(
            app,
            [
                "pack",
                str(peft_zoo / "adapters"),
                "--labels",
                str(peft_zoo / "labels.csv"),
                "--out",
                str(store_dir),
                "--json",
            ],
        )
    )
    summary = json.loads(out.stdout)
    assert summary["num_loras"] == N and summary["layers"] == 4 and summary["ranks"] == [4]
    store = LoRAStore(store_dir)
    first = ll.load_lora(peft_zoo / "adapters" / "a000")
    for a, b in zip(store[0].layers, first.layers):
        assert a.name == b.name and torch.equal(a.U, b.U) and torch.equal(a.V, b.V)

    _train(str(store_dir), "quality", "glnet", str(run), "--epochs", "8", "--folds", "1")
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["task"] == "regression"
    assert set(metrics["test"]) >= {"r2", "kendall_tau", "spearman"}
    assert set(metrics["val"]) >= {"r2", "kendall_tau", "spearman"}
    assert 0 <= metrics["best_epoch"] <= 8  # 0: the linear base alone, kept on 5 validation LoRAs
    assert metrics["n"] == {"train": 33, "val": 5, "cal": 5, "test": 5}
    for name in ("model.safetensors", "config.json", "pred_vs_true.png", "learning_curves.png"):
        assert (run / name).is_file()

    ev = json.loads(
        _ok(runner.invoke(app, ["evaluate", str(run), "--data", str(store_dir), "--json"])).stdout
    )
    # the LoRAs the run trained or early-stopped on are left out, and said to be
    assert ev["n"] == 5 and ev["n_seen"] == 43 and "43 of 48" in ev["warnings"][0]
    assert set(ev["metrics"]) >= {"r2", "kendall_tau", "spearman"}

    # predict on the PEFT folder and on its weights file alone: same numbers as on the store
    adapters = [
        str(peft_zoo / "adapters" / "a000"),
        str(peft_zoo / "adapters" / "a001" / "adapter_model.safetensors"),
    ]
    preds = json.loads(_ok(runner.invoke(app, ["predict", str(run), *adapters, "--json"])).stdout)
    assert [p["adapter"] for p in preds] == adapters
    loaded = load_run(run)
    assert loaded.task.targets == ["quality"]
    direct = loaded.task.decode(loaded.raw(store.batch([0, 1])))
    np.testing.assert_allclose(
        [p["prediction"]["quality"] for p in preds], direct[:, 0], rtol=1e-4, atol=1e-5
    )
    table = _ok(runner.invoke(app, ["predict", str(run), adapters[0]]))
    assert "quality" in table.stdout


def test_classification_same_seed_same_metrics_and_rank_padding(peft_zoo, make_peft_zoo, tmp_path):
    store_dir = tmp_path / "store"
    _ok(runner.invoke(app, ["pack", str(peft_zoo), "--out", str(store_dir)]))  # zoo folder form
    runs = []
    for k in range(2):
        run = tmp_path / f"run{k}"
        _train(str(store_dir), "big", "mlp-svd", str(run), "--epochs", "4", "--seed", "3")
        runs.append(json.loads((run / "metrics.json").read_text()))
    assert runs[0]["task"] == "classification"
    assert set(runs[0]["test"]) >= {"accuracy", "auroc"}
    assert runs[0]["test"] == runs[1]["test"] and runs[0]["val"] == runs[1]["val"]

    # a rank-2 zoo with the same layers: evaluate works (GL-invariant models take any rank)
    other = make_peft_zoo(tmp_path / "zoo2", n=6, ranks=(2,), seed=1)
    _ok(runner.invoke(app, ["pack", str(other), "--out", str(tmp_path / "s2")]))
    ev = json.loads(
        _ok(
            runner.invoke(
                app, ["evaluate", str(tmp_path / "run0"), "--data", str(tmp_path / "s2"), "--json"]
            )
        ).stdout
    )
    assert ev["n"] == 6


def _write_single_file(lora, path, style):
    tensors = {}
    for la in lora.layers:
        if style == "kohya":
            key = "lora_unet_" + la.name.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = la.V.T.contiguous()
            tensors[f"{key}.lora_up.weight"] = la.U.contiguous()
            tensors[f"{key}.alpha"] = torch.tensor(float(la.rank))
        else:  # diffusers
            tensors[f"unet.{la.name}.lora.down.weight"] = la.V.T.contiguous()
            tensors[f"unet.{la.name}.lora.up.weight"] = la.U.contiguous()
    save_file(tensors, str(path))


@pytest.mark.parametrize("style", ["kohya", "diffusers"])
def test_single_file_formats_pack_and_predict(peft_zoo, tmp_path, style):
    folder = tmp_path / "files"
    folder.mkdir()
    labels = ["adapter,quality"]
    for k in range(12):
        lora = ll.load_lora(peft_zoo / "adapters" / f"a{k:03d}")
        _write_single_file(lora, folder / f"l{k}.safetensors", style)
        labels.append(f"l{k},{k}")
    (tmp_path / "labels.csv").write_text("\n".join(labels) + "\n")
    _ok(
        runner.invoke(
            app,
            [
                "pack",
                str(folder),
                "--labels",
                str(tmp_path / "labels.csv"),
                "--out",
                str(tmp_path / "s"),
            ],
        )
    )
    run = tmp_path / "run"
    _train(str(tmp_path / "s"), "quality", "mlp-dense", str(run), "--epochs", "2")
    preds = json.loads(
        _ok(
            runner.invoke(app, ["predict", str(run), str(folder / "l3.safetensors"), "--json"])
        ).stdout
    )
    assert np.isfinite(preds[0]["prediction"]["quality"])
    # a PEFT adapter has other layer names: a clear error, exit code 1 (an input that is invalid)
    bad = runner.invoke(app, ["predict", str(run), str(peft_zoo / "adapters" / "a000")])
    assert bad.exit_code == 1 and "does not fit" in bad.output


def test_pack_refuses_mismatched_adapters_and_writes_nothing(peft_zoo, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for k in range(4):
        ll.save_lora(ll.load_lora(peft_zoo / "adapters" / f"a{k:03d}"), folder / f"a{k}")
    odd = ll.LoRA([ll.LoRALayer("layers.0.q_proj", torch.randn(5, 2), torch.randn(3, 2))])
    ll.save_lora(odd, folder / "odd")
    (folder / "junk.safetensors").write_bytes(b"not a safetensors file")
    out = tmp_path / "s"
    res = runner.invoke(app, ["pack", str(folder), "--out", str(out)])
    assert res.exit_code == 1
    assert "refused odd" in res.output and "refused junk.safetensors" in res.output
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["mixed"]
    res = _ok(runner.invoke(app, ["pack", str(folder), "--out", str(out), "--skip-bad", "--json"]))
    summary = json.loads(res.stdout)
    assert summary["num_loras"] == 4 and len(summary["refused"]) == 2
