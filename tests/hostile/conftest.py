"""What the hostile tests share: a run trained on valid adapters of the corpus's layout."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

import corpus
from loralens.cli import app

runner = CliRunner()


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    """A run trained on valid adapters of the corpus's layout, for `predict` and `screen`."""
    root = tmp_path_factory.mktemp("run")
    (root / "adapters").mkdir()
    lines = ["adapter,y"]
    for k in range(12):
        corpus.good_peft(root / "adapters" / f"a{k}", seed=k)
        lines.append(f"a{k},{k}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    args = ["pack", str(root / "adapters"), "--labels", str(root / "labels.csv")]
    assert runner.invoke(app, [*args, "--out", str(root / "s")]).exit_code == 0
    args = ["train", "--data", str(root / "s"), "--target", "y", "--model", "mlp-svd"]
    res = runner.invoke(app, [*args, "--out", str(root / "run"), "--epochs", "2", "--quiet"])
    assert res.exit_code == 0, res.output
    return root / "run"
