"""`loralens train --target backdoor` with every model on a tiny store: a classification run that
reports AUROC and the TPR at 1% and 5% FPR for the model and every probe (spectral stats too),
and `evaluate` on rows held out by `--where` (the unseen-trigger split of the benchmark)."""

import json

import pytest
import torch
from typer.testing import CliRunner

from loralens.cli import app
from loralens.learn.fitting.probes import PROBE_SPECTRAL_STATS
from loralens.models.registry import MODEL_NAMES

pytestmark = pytest.mark.slow
runner = CliRunner()


def _ok(result):
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def store_dir(make_store, tmp_path_factory):
    """64 random LoRAs; the backdoored half carry a strong rank-1 spike in layer 0 (a planted
    signal); ``group`` splits them the way the pools' groups split a backdoor zoo."""
    import loralens as ll
    from loralens.store import write_store

    base = make_store(tmp_path_factory.mktemp("s") / "plain", n=64, seed=3)
    g = torch.Generator().manual_seed(0)
    items = []
    for k in range(len(base)):
        lora = base[k]
        layers = list(lora.layers)
        if k % 2:  # backdoored: a rank-1 spike on top of the finetune in layer 0
            u, v = layers[0].U, layers[0].V
            spike_u = torch.randn(u.shape[0], 1, generator=g) * 3
            spike_v = torch.randn(v.shape[0], 1, generator=g)
            layers[0] = ll.LoRALayer(layers[0].name, u + spike_u, v + spike_v)
        items.append((base.ids[k], ll.LoRA(layers), {"backdoor": k % 2, "group": k % 3}))
    out = tmp_path_factory.mktemp("s") / "backdoor"
    write_store(out, items)
    return out


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_train_target_backdoor_works_with_every_model(model, store_dir, tmp_path):
    run = tmp_path / "run"
    args = ["train", "--data", str(store_dir), "--target", "backdoor", "--model", model]
    _ok(runner.invoke(app, [*args, "--out", str(run), "--quiet", "--epochs", "2", "--folds", "1"]))
    m = json.loads((run / "metrics.json").read_text())
    assert m["task"] == "classification"
    for res in (m["test"], m["probes"][PROBE_SPECTRAL_STATS]["test"]):
        assert {"auroc", "tpr@1%fpr", "tpr@5%fpr"} <= set(res)
        assert 0.0 <= res["tpr@5%fpr"] <= 1.0


def test_train_on_some_groups_and_evaluate_on_the_others(store_dir, tmp_path):
    """43 training LoRAs are cross-validated (the default below 60): the folds' validation rows
    show that the network beats the linear base on the spike, which no linear map of ΔW finds."""
    run = tmp_path / "run"
    args = ["train", "--data", str(store_dir), "--target", "backdoor", "--model", "mlp-dense"]
    _ok(
        runner.invoke(
            app,
            [
                *args,
                "--out",
                str(run),
                "--quiet",
                "--where",
                "group != 2",
                "--epochs",
                "30",
            ],
        )
    )
    out = _ok(
        runner.invoke(
            app, ["evaluate", str(run), "--data", str(store_dir), "--where", "group == 2", "--json"]
        )
    )
    ev = json.loads(out.stdout)
    assert ev["n"] == 21 and ev["metrics"]["auroc"] > 0.9  # the planted spike
    assert "tpr@5%fpr" in ev["metrics"]
