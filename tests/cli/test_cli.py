"""The command line as one tool: version, flags shown as flags, one exit code per kind of
failure, runs not overwritten by accident, readable summaries and strict JSON."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import loralens as ll
from helpers import store_items, store_lora
from loralens import __version__
from loralens.cli import app
from loralens.store import write_store

runner = CliRunner()


@pytest.fixture
def store(tmp_path):
    return write_store(tmp_path / "s", store_items(24)).path


def _train(store, out, *extra):
    args = ["train", "--data", str(store), "--target", "y", "--model", "mlp-svd"]
    return runner.invoke(app, [*args, "--out", str(out), "--epochs", "2", "--quiet", *extra])


def test_version_flag_and_command_print_the_version():
    for args in (["--version"], ["version"]):
        res = runner.invoke(app, args)
        assert res.exit_code == 0 and res.stdout.strip() == __version__


@pytest.mark.parametrize(
    "command", ["pack", "train", "inspect", "predict", "zoo build", "embed", "index", "search"]
)
def test_help_shows_boolean_options_as_flags(command):
    res = runner.invoke(app, [*command.split(), "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    assert "<bool>" not in res.stdout and "--no-json" not in res.stdout


def test_help_lists_the_exit_codes():
    res = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert "Exit codes" in res.stdout and "3 the output already exists" in res.stdout


def _commands(group, prefix=()):
    for name, cmd in group.commands.items():
        yield (*prefix, name), cmd
        yield from _commands(cmd, (*prefix, name)) if hasattr(cmd, "commands") else ()


def test_help_paragraphs_are_left_to_the_terminal_to_wrap():
    """Docstrings are hand-wrapped in the source; the help gets each paragraph as one line, so
    rich wraps it once, at the terminal's width, never mid-phrase where the source broke it."""
    from typer.main import get_command

    seen = 0
    for name, cmd in _commands(get_command(app)):
        for paragraph in (cmd.help or "").split("\n\n"):
            assert "\n" not in paragraph, (name, paragraph)
        seen += bool(cmd.help)
    assert seen > 20
    res = runner.invoke(app, ["inspect", "--help"], env={"COLUMNS": "60"})
    lines = [line.strip() for line in res.stdout.splitlines()]
    start = lines.index(next(x for x in lines if x.startswith("Norms and singular")))
    # one reflowed paragraph: every line but its last is filled close to the width
    paragraph = lines[start : lines.index("", start)]
    assert len(paragraph) > 3 and all(len(x) > 45 for x in paragraph[:-1]), paragraph


def test_ray_help_points_to_the_clusters_page():
    for command in (["zoo", "build"], ["screen"]):
        res = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "300"})
        assert "docs/clusters.md" in res.stdout and "see the README" not in res.stdout


def test_serve_takes_its_runs_as_arguments_or_with_runs(tmp_path):
    res = runner.invoke(app, ["serve", "--help"], env={"COLUMNS": "200"})
    assert "[RUN...]" in res.stdout and "--runs" in res.stdout
    res = runner.invoke(app, ["serve"])
    assert res.exit_code == 2 and "give the run directories" in res.output
    # both forms are parsed (a bind other than loopback without a token is refused before
    # any run is loaded)
    for args in (["runs/a", "runs/b"], ["--runs", "runs/a", "runs/b"]):
        res = runner.invoke(app, ["serve", *args, "--host", "0.0.0.0"])
        assert res.exit_code == 2 and "set --token too" in res.output, res.output


def test_train_prints_a_table_beside_the_baseline_and_json_on_request(store, tmp_path):
    res = _train(store, tmp_path / "run")
    assert res.exit_code == 0, res.output
    assert "no weights" in res.stdout and "r2" in res.stdout and "{" not in res.stdout
    assert "90% intervals on the test split: coverage" in res.stdout
    res = _train(store, tmp_path / "run2", "--json")
    metrics = json.loads(res.stdout)
    saved = json.loads((tmp_path / "run2" / "metrics.json").read_text())
    assert metrics["test"] == saved["test"] and metrics["baseline"] == saved["baseline"]


def test_train_refuses_an_existing_run_unless_overwrite(store, tmp_path):
    assert _train(store, tmp_path / "run").exit_code == 0
    before = (tmp_path / "run" / "metrics.json").read_bytes()
    res = _train(store, tmp_path / "run", "--seed", "1")
    assert res.exit_code == 3 and "--overwrite" in res.output
    assert (tmp_path / "run" / "metrics.json").read_bytes() == before
    res = _train(store, tmp_path / "run", "--seed", "1", "--overwrite")
    assert res.exit_code == 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["seed"] == 1


def test_exit_codes_say_the_kind_of_failure(store, tmp_path):
    missing = runner.invoke(app, ["inspect", str(tmp_path / "nope.safetensors")])
    assert missing.exit_code == 1 and "nope.safetensors" in missing.output
    usage = runner.invoke(app, ["train", "--data", str(store)])
    assert usage.exit_code == 2
    exists = runner.invoke(app, ["pack", str(tmp_path), "--out", str(store)])
    assert exists.exit_code == 3 and "--append or --overwrite" in exists.output
    bad_target = _train(store, tmp_path / "r", "--target", "no_such_column")
    assert bad_target.exit_code == 1 and "no_such_column" in bad_target.output


def test_evaluate_prints_a_table_and_strict_json(store, tmp_path):
    """Both say what the run is worth: its test R² over its test LoRAs, and its coverage."""
    trained = _train(store, tmp_path / "run")
    assert trained.exit_code == 0 and "this run: test R² " in trained.stdout
    assert "on 24 LoRAs" in trained.stdout and "intervals covered" in trained.stdout
    res = runner.invoke(app, ["evaluate", str(tmp_path / "run"), "--data", str(store)])
    assert res.exit_code == 0 and "model" in res.stdout and "r2" in res.stdout
    assert "this run: test R² " in res.stdout
    res = runner.invoke(app, ["evaluate", str(tmp_path / "run"), "--data", str(store), "--json"])
    assert json.loads(res.stdout)["n"] == 24 and json.loads(res.stdout)["run"]["n_test"] == 24


def test_store_verify_passes_a_clean_store_and_names_a_flipped_shard(store):
    res = runner.invoke(app, ["store", "verify", str(store), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["ok"] is True
    shard = sorted(store.glob("weights-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x10
    shard.write_bytes(bytes(data))
    res = runner.invoke(app, ["store", "verify", str(store)])
    assert res.exit_code == 1 and shard.name in res.output


def test_pack_skip_missing_packs_what_both_name(tmp_path):
    folder = tmp_path / "in"
    for k in range(3):
        layer = store_lora([2], k).layers[0]
        ll.save_lora(ll.LoRA([ll.LoRALayer("model.l0.q_proj", layer.U, layer.V)]), folder / f"a{k}")
    (tmp_path / "labels.csv").write_text("adapter,y\na0,1\na1,2\nghost,3\n")
    args = ["pack", str(folder), "--labels", str(tmp_path / "labels.csv"), "--out"]
    res = runner.invoke(app, [*args, str(tmp_path / "s")])
    assert res.exit_code == 1 and "ghost" in res.output and "a2" in res.output
    res = runner.invoke(app, [*args, str(tmp_path / "s"), "--skip-missing", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["num_loras"] == 2


def test_library_warnings_print_as_warning_lines_and_others_pass_through(capsys):
    import warnings

    from loralens.cli.common import user_errors
    from loralens.errors import LoRALensWarning

    with user_errors():
        warnings.warn("the run is its linear base alone", LoRALensWarning, stacklevel=1)
        warnings.warn("some library's notice", DeprecationWarning, stacklevel=1)
    err = capsys.readouterr().err
    assert "warning: the run is its linear base alone" in err
    assert "LoRALensWarning" not in err  # one line, not Python's traceback-like form


def test_an_interval_shows_both_ends_with_the_same_decimals():
    from loralens.cli.common import interval

    assert interval(1.93, 1.998, digits=3) == "[1.93, 2.00]"
    assert interval(1.93, 1.998) == "[1.930, 1.998]"
    assert interval(1.9312, 1.9318, digits=3) == "[1.9312, 1.9318]"  # the width stays visible
    assert interval(-0.5, 2.5, digits=3) == "[-0.50, 2.50]"
    assert interval(2e6, 3e6, digits=3) == "[2.00e+06, 3.00e+06]"
