"""Tampered and broken run directories (issue 14): ``load_run`` refuses each with one RunError
line naming the file and the problem, before allocating anything the checkpoint does not hold.

Every hostile run is made at test time from one small trained run: its config.json edited
(``head_hidden: 1e7`` and friends), its checkpoint truncated, reshaped, replaced by a pickle,
or a file swapped for a FIFO. Where memory is at stake the load runs in a subprocess under an
address-space limit, so a large allocation would show up as a MemoryError, not a clean error.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loralens.errors import RunError, RunNotFoundError
from loralens.learn.runs.checkpoint import CHECKPOINT, CONFIG
from loralens.learn.runs.folder import load_run
from loralens.learn.training.config import TrainConfig
from loralens.learn.training.loop import train

SRC = Path(__file__).parents[3] / "src"


@pytest.fixture(scope="module")
def good_run(make_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-runs")
    store = make_store(root / "s", n=24)
    cfg = TrainConfig(model="glnet", targets=["y"], epochs=2, plots=False)
    train(store, cfg, root / "run")
    return root / "run"


@pytest.fixture
def run_copy(good_run, tmp_path):
    """A fresh copy of the good run to tamper with."""
    return Path(shutil.copytree(good_run, tmp_path / "run"))


def _edit_config(run: Path, edit) -> None:
    cfg = json.loads((run / CONFIG).read_text())
    edit(cfg)
    (run / CONFIG).write_text(json.dumps(cfg))


def _hp(**kw):
    return lambda cfg: cfg["model"]["hparams"].update(kw)


def _rewrite_header(path: Path, edit) -> None:
    """Rewrite the JSON header of a safetensors file in place (data bytes unchanged)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


CONFIG_EDITS = {
    # what is tampered: (edit of the config dict, pattern the message must hold)
    "head_hidden_1e7": (_hp(head_hidden=1e7), r"head_hidden must be an integer in \[1, 65536\]"),
    "head_hidden_10M": (_hp(head_hidden=10_000_000), r"head_hidden must be an integer"),
    "hidden_negative": (_hp(hidden=-1), r"hidden must be an integer"),
    "hidden_string": (_hp(hidden="8"), r"hidden must be an integer"),
    "blocks_huge": (_hp(blocks=10**9), r"blocks must be an integer in \[0, 64\]"),
    "dropout_nan_like": (_hp(dropout=2.5), r"dropout must be a number in \[0, 1\]"),
    "head_unknown": (_hp(head="gru"), r"head must be one of \['mlp', 'transformer'\]"),
    "unknown_hparam": (_hp(widht=3), r"no hyperparameter\(s\) \['widht'\]"),
    "hparams_not_a_dict": (
        lambda c: c["model"].update(hparams=[1, 2]),
        r"hyperparameters must be a mapping",
    ),
    "unknown_model": (lambda c: c["model"].update(name="gnn"), r"unknown model 'gnn'"),
    "out_dim_zero": (lambda c: c["model"].update(out_dim=0), r"model.out_dim must be"),
    "out_dim_string": (lambda c: c["model"].update(out_dim="1"), r"model.out_dim must be"),
    "shape_1e9": (
        lambda c: c["model"]["spec"]["shapes"][0].__setitem__(0, 10**9),
        r"model.spec.shapes must be",
    ),
    "shape_float": (
        lambda c: c["model"]["spec"]["shapes"][0].__setitem__(0, 12.5),
        r"model.spec.shapes must be",
    ),
    "spec_lengths": (
        lambda c: c["model"]["spec"]["names"].append("extra"),
        r"model.spec: 3 names, 2 shapes",
    ),
    "std_zero": (lambda c: c["task"].update(std=[0.0]), r"task.std must list 1 positive"),
    "mean_string": (lambda c: c["task"].update(mean=["x"]), r"task.mean must list 1 finite"),
    "range_inverted": (
        lambda c: c["task"].update(low=[2.0], high=[1.0]),
        r"task.low and task.high must list 1 finite",
    ),
    "range_string": (
        lambda c: c["task"].update(low=["x"], high=[1.0]),
        r"task.low and task.high must list 1 finite",
    ),
    "range_half": (
        lambda c: c["task"].update(low=[0.0], high=[]),
        r"task.low and task.high must list 1",
    ),
    "task_kind": (lambda c: c["task"].update(kind="ranking"), r"task.kind must be"),
    "targets_count": (lambda c: c["task"].update(targets=["y", "z"]), r"task.targets must list 1"),
    "version_2": (lambda c: c.update(version=2), r"version 2; this loralens reads version 1"),
    "no_model": (lambda c: c.pop("model"), r'needs the objects "model" and "task"'),
}


@pytest.mark.parametrize("case", list(CONFIG_EDITS))
def test_tampered_config_is_one_line_naming_config_json(case, run_copy):
    edit, pattern = CONFIG_EDITS[case]
    _edit_config(run_copy, edit)
    with pytest.raises(RunError, match=pattern) as err:
        load_run(run_copy)
    msg = str(err.value)
    assert msg.startswith(str(run_copy / CONFIG)) and "\n" not in msg, msg


# a width that passes every range check but does not match the checkpoint: the model is built
# on the meta device and compared with the safetensors header, never allocated
SHAPE_EDITS = {
    "head_hidden_4096": (
        _hp(head_hidden=4096),
        r"parameter 'head.0.weight' has shape \[128, (\d+)\], .* needs \[4096, \1\]",
    ),
    "glnet_1024x65536": (
        _hp(hidden=1024, head_hidden=65536),
        r"parameter 'equivariant.0.phi.0' has shape \[8, 12\]",
    ),
    "blocks_2": (_hp(blocks=2), r"lacks \['equivariant.2.phi.0'"),
    "shapes_2e7": (
        lambda c: c["model"]["spec"].update(shapes=[[2**24, 2**24], [2**24, 2**24]]),
        # the first parameter whose shape follows the layer shapes: the update basis' first side
        r"parameter 'basis.out_0' has shape \[12, 12\].*needs \[12, 16777216\]",
    ),
}


@pytest.mark.parametrize("case", list(SHAPE_EDITS))
def test_config_that_does_not_match_the_checkpoint_names_the_parameter(case, run_copy):
    edit, pattern = SHAPE_EDITS[case]
    _edit_config(run_copy, edit)
    with pytest.raises(RunError, match=pattern) as err:
        load_run(run_copy)
    assert str(err.value).startswith(str(run_copy / CHECKPOINT))


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {Path.cwd() / 'PWNED'}",))


FILE_EDITS = {
    "config_bad_json": (
        lambda r: (r / CONFIG).write_text('{"model": '),
        CONFIG,
        r"not valid JSON",
    ),
    "config_nan": (
        lambda r: (r / CONFIG).write_text((r / CONFIG).read_text().replace("0.0", "NaN", 1)),
        CONFIG,
        r"not valid JSON \(NaN is not JSON\)",
    ),
    "config_deep_nesting": (
        lambda r: (r / CONFIG).write_text("[" * 200_000 + "]" * 200_000),
        CONFIG,
        r"not valid JSON",
    ),
    "config_a_list": (lambda r: (r / CONFIG).write_text("[1, 2]"), CONFIG, r"not a JSON object"),
    "config_binary": (lambda r: (r / CONFIG).write_bytes(b"\xff\xfe\x00"), CONFIG, r"not valid"),
    "config_20MB": (
        lambda r: (r / CONFIG).write_text(" " * (20 * 2**20) + "{}"),
        CONFIG,
        r"larger than 16 MiB",
    ),
    "config_fifo": (lambda r: _fifo(r / CONFIG), CONFIG, r"not a regular file"),
    "config_a_folder": (
        lambda r: ((r / CONFIG).unlink(), (r / CONFIG).mkdir()),
        CONFIG,
        r"not a regular file",
    ),
    "checkpoint_fifo": (lambda r: _fifo(r / CHECKPOINT), CHECKPOINT, r"not a regular file"),
    "checkpoint_truncated": (
        lambda r: (r / CHECKPOINT).write_bytes((r / CHECKPOINT).read_bytes()[:100]),
        CHECKPOINT,
        r"not a readable safetensors file",
    ),
    "checkpoint_empty": (
        lambda r: (r / CHECKPOINT).write_bytes(b""),
        CHECKPOINT,
        r"not a readable safetensors file",
    ),
    "checkpoint_pickle": (
        lambda r: (r / CHECKPOINT).write_bytes(pickle.dumps(_Payload())),
        CHECKPOINT,
        r"not a readable safetensors file",
    ),
    "checkpoint_reshaped": (
        lambda r: _rewrite_header(
            r / CHECKPOINT, lambda h: h["equivariant.0.phi.0"].update(shape=[12, 8])
        ),
        CHECKPOINT,
        r"parameter 'equivariant.0.phi.0' has shape \[12, 8\], the glnet model .* needs \[8, 12\]",
    ),
    "checkpoint_claims_1e10_floats": (
        lambda r: _rewrite_header(
            r / CHECKPOINT, lambda h: h["equivariant.0.phi.0"].update(shape=[100_000, 100_000])
        ),
        CHECKPOINT,
        r"not a readable safetensors file",
    ),
    "checkpoint_extra_tensor": (
        lambda r: save_file({**load_file(r / CHECKPOINT), "evil": torch.zeros(3)}, r / CHECKPOINT),
        CHECKPOINT,
        r"has unexpected \['evil'\]",
    ),
    "checkpoint_missing_tensor": (
        lambda r: save_file(
            {k: v for k, v in load_file(r / CHECKPOINT).items() if k != "scale_skip.bias"},
            r / CHECKPOINT,
        ),
        CHECKPOINT,
        r"lacks \['scale_skip.bias'\]",
    ),
    "checkpoint_nan_weights": (
        lambda r: save_file(
            {
                k: v.fill_(float("nan")) if k == "scale_skip.bias" else v
                for k, v in load_file(r / CHECKPOINT).items()
            },
            r / CHECKPOINT,
        ),
        CHECKPOINT,
        r"parameter 'scale_skip.bias' holds NaN/inf values",
    ),
}


@pytest.mark.parametrize("case", list(FILE_EDITS))
def test_broken_run_files_are_one_line_naming_the_file(case, run_copy, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    edit, name, pattern = FILE_EDITS[case]
    edit(run_copy)
    with pytest.raises(RunError, match=pattern) as err:
        load_run(run_copy)
    msg = str(err.value)
    assert msg.startswith(str(run_copy / name)) and "\n" not in msg, msg
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("name", [CONFIG, CHECKPOINT])
def test_missing_run_files_are_run_errors_and_file_not_found(name, run_copy):
    (run_copy / name).unlink()
    with pytest.raises(RunNotFoundError, match=f"is not a loralens run \\(no {name}\\)") as err:
        load_run(run_copy)
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, ValueError)
    with pytest.raises(RunNotFoundError, match="no such directory"):
        load_run(run_copy / "nowhere")


_LOAD_UNDER_LIMIT = textwrap.dedent(
    """
    import resource, sys
    from loralens.learn.runs.folder import load_run
    from loralens.errors import RunError

    used = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
    limit = max(3 * 2**30, used + 2**30)  # ~3 GB: far below what the config asks for
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        load_run(sys.argv[1])
    except RunError as e:
        print("RunError:", e)
    """
)


@pytest.mark.parametrize(
    ("case", "edit"),
    [
        ("head_hidden_10M", _hp(head_hidden=10_000_000)),  # 5 GB of head weights
        ("glnet_1024x65536", _hp(hidden=1024, head_hidden=65536)),  # 550 GB, within each cap
        ("shapes_2e7", lambda c: c["model"]["spec"].update(shapes=[[2**24, 2**24]] * 2)),
    ],
)
def test_huge_configs_fail_cleanly_under_a_3gb_address_space_limit(case, edit, run_copy):
    _edit_config(run_copy, edit)
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    res = subprocess.run(
        [sys.executable, "-c", _LOAD_UNDER_LIMIT, str(run_copy)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith("RunError: ") and "MemoryError" not in res.stdout + res.stderr


def test_learning_code_never_unpickles():
    """Checkpoints are safetensors only: no torch.load / pickle anywhere in learn/ or models/."""
    root = SRC / "loralens"
    for path in [*(root / "learn").rglob("*.py"), *(root / "models").rglob("*.py")]:
        text = path.read_text()
        assert not re.search(r"torch\.load\(|import pickle|pickle\.loads?\(", text), path
