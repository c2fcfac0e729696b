"""The command line starts fast: `--help`, `--version` and every command's help import nothing
heavy (torch, numpy, pandas and the rest are imported by the commands that use them), while
``import loralens as ll`` keeps every public name."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import loralens as ll

SRC = str(Path(__file__).resolve().parents[2] / "src")
HEAVY = ("torch", "numpy", "pandas", "safetensors", "transformers", "peft", "sklearn", "scipy")
#: Runs the CLI on the arguments given, then prints which heavy modules it imported.
PROBE = """
import json, sys
from loralens.cli import app
for args in json.loads(sys.argv[1]):
    try:
        app(args, prog_name="loralens")
    except SystemExit as e:
        assert not e.code, (args, e.code)
print(json.dumps(sorted(m for m in {heavy} if m in sys.modules)))
"""


def _imported(*commands: list[str]) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY), json.dumps(list(commands))],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": SRC, "COLUMNS": "100", "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_help_and_version_import_nothing_heavy():
    assert _imported(["--help"]) == []
    assert _imported(["--version"]) == []


def test_every_commands_help_imports_nothing_heavy():
    from typer.main import get_command

    from loralens.cli import app

    group = get_command(app)
    commands = [[name, "--help"] for name in group.commands]
    for name, sub in group.commands.items():
        commands += [[name, s, "--help"] for s in getattr(sub, "commands", {})]
    assert len(commands) > 20
    assert _imported(*commands) == []


def test_the_help_lists_the_registered_models():
    from loralens.cli.learning import MODEL_CHOICES
    from loralens.models import MODEL_NAMES

    assert MODEL_CHOICES == MODEL_NAMES


def test_all_lists_every_lazy_name():
    assert sorted(set(ll.__all__) - {"__version__"}) == sorted(ll._PUBLIC)


@pytest.mark.parametrize("name", ll.__all__)
def test_every_public_name_resolves(name):
    assert getattr(ll, name) is not None
    assert name in dir(ll)


def test_public_functions_are_the_modules_own():
    from loralens.formats import load_lora
    from loralens.search.index import search

    assert ll.load_lora is load_lora and ll.search is search
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ll.nope  # noqa: B018
