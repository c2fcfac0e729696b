"""Peak memory of ``inspect``, ``pack`` and ``predict`` on one large float16 adapter, for this
checkout's code and an older revision's, measured in one run.

    PYTHONPATH=src python3 benchmarks/memory_bench.py --before 0d896e6
    PYTHONPATH=src python3 benchmarks/memory_bench.py --quick          # a 64 MiB adapter

The adapter is synthetic: a PEFT folder of ``--layers`` square ``--width`` layers at rank
``--rank``, float16 factors drawn N(0, 1) (the defaults, 171 layers of 12288 x 12288 at rank
128, make 1.0 GiB). ``predict`` uses a mlp-svd run trained (with this checkout's code, 2 epochs)
on 12 rank-2 adapters of the same layout. Each command runs in a fresh child process under each
revision's ``src/`` (``git archive``); a row is the child's peak resident memory (VmHWM, from
its start: imports included, as ``/usr/bin/time`` shows it) with the default allocator
(``--exact-malloc``: the tests' settings), that peak above the resident memory once imports
(and, for predict, the run) are loaded, and the command's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
#: glibc tunables the memory tests run under (tests/helpers.py): every block of 64 KiB or more
#: mapped on its own and unmapped when freed, so resident memory is what the code holds.
EXACT_MALLOC = {
    "MALLOC_MMAP_THRESHOLD_": "65536",
    "MALLOC_TRIM_THRESHOLD_": "65536",
    "MALLOC_ARENA_MAX": "1",
}

#: What each command's child sets up (imports; the run, for predict) and then runs: the
#: library call behind the CLI command.
COMMANDS = {
    "inspect": (
        "from loralens.inspection import inspect_adapter",
        "inspect_adapter(sys.argv[1])",
    ),
    "pack": ("from loralens.store import pack", "pack(Path(sys.argv[1]).parent, sys.argv[2])"),
    "predict": (
        "from loralens.learn import load_run\ntrained = load_run(sys.argv[3])",
        "assert trained.predict([sys.argv[1]])[0]['error'] is None",
    ),
}

_CHILD = """
import sys, time
from pathlib import Path


def status(field):
    line = next(ln for ln in open("/proc/self/status") if ln.startswith(field + ":"))
    return int(line.split()[1]) * 1024


{setup}
ready = status("VmRSS")
t0 = time.perf_counter()
{call}
print(status("VmHWM"), ready, time.perf_counter() - t0)
"""


def write_adapter(
    folder: Path,
    layers: int,
    width: int,
    rank: int,
    seed: int,
    *,
    modules: tuple[str, ...] = ("q_proj",),
    scale: float = 1.0,
    base_model: str | None = None,
) -> Path:
    """A PEFT adapter folder of ``layers`` x ``modules`` ``width`` x ``width`` float16 layers
    of ``rank``: factors drawn N(0, 1), lora_B times ``scale``, lora_alpha = rank."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(layers):
        for m in modules:
            key = f"base_model.model.model.layers.{i}.self_attn.{m}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, width, generator=g).half()
            tensors[f"{key}.lora_B.weight"] = (torch.randn(width, rank, generator=g) * scale).half()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": list(modules)}
    if base_model:
        config["base_model_name_or_path"] = base_model
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def train_run(work: Path, layers: int, width: int) -> Path:
    """A mlp-svd run for the layout, trained on 12 rank-2 adapters (this checkout's code)."""
    from loralens.learn import TrainConfig, train
    from loralens.store import pack

    zoo = work / "zoo"
    for k in range(12):
        write_adapter(zoo / f"a{k}", layers, width, 2, seed=k)
    labels = pd.DataFrame({"adapter": [f"a{k}" for k in range(12)], "y": list(range(12))})
    pack(zoo, work / "zoo.store", labels=labels)
    config = TrainConfig(model="mlp-svd", targets=["y"], epochs=2, plots=False, probes=False)
    train(work / "zoo.store", config, work / "run")
    return work / "run"


def source_tree(rev: str, where: Path) -> Path:
    """``src/`` of git revision ``rev``, extracted under ``where``."""
    archive = where / "src.tar"
    with open(archive, "wb") as f:
        subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"], stdout=f, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(where / rev, filter="data")
    return where / rev / "src"


def measure(
    src: Path, command: str, adapter: Path, store: Path, run: Path, exact_malloc: bool
) -> tuple[int, int, float]:
    """(peak resident bytes, resident bytes once set up, seconds of the call) of ``command``
    in a child running ``src``'s code."""
    setup, call = COMMANDS[command]
    code = _CHILD.format(setup=setup, call=call)
    env = {**os.environ, "PYTHONPATH": str(src), **(EXACT_MALLOC if exact_malloc else {})}
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            str(adapter / "adapter_model.safetensors"),
            str(store),
            str(run),
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"{command} under {src} failed:\n{out.stderr[-3000:]}")
    peak, ready, seconds = out.stdout.split()
    return int(peak), int(ready), float(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", help="git revision to compare with (e.g. 0d896e6)")
    parser.add_argument("--layers", type=int, default=171)
    parser.add_argument("--width", type=int, default=12288)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="11 layers: a 64 MiB adapter")
    parser.add_argument(
        "--exact-malloc",
        action="store_true",
        help="run the children with glibc handing freed blocks back (the tests' setting)",
    )
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    layers = 11 if args.quick else args.layers
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        adapter = write_adapter(work / "big" / "adapter", layers, args.width, args.rank, seed=99)
        file_bytes = (adapter / "adapter_model.safetensors").stat().st_size
        run = train_run(work, layers, args.width)
        revisions = {"after": ROOT / "src"}
        if args.before:
            revisions = {f"before ({args.before})": source_tree(args.before, work), **revisions}
        rows = []
        for command in COMMANDS:
            for name, src in revisions.items():
                store = work / f"store-{command}-{len(rows)}"
                peak, ready, seconds = measure(src, command, adapter, store, run, args.exact_malloc)
                rows.append(
                    {
                        "command": command,
                        "code": name,
                        "peak_MiB": round(peak / 2**20),
                        "above_setup_MiB": round((peak - ready) / 2**20),
                        "seconds": round(seconds, 1),
                    }
                )
    layer = 2 * args.width * args.rank * 4
    if args.json:
        print(json.dumps({"file_bytes": file_bytes, "layer_f32_bytes": layer, "rows": rows}))
        return
    print(
        f"adapter: {layers} layers {args.width}x{args.width} rank {args.rank}, float16 file "
        f"{file_bytes / 2**30:.2f} GiB, float32 factors {layers * layer / 2**30:.2f} GiB, "
        f"largest layer {layer / 2**20:.0f} MiB as float32"
    )
    print("| command | code | peak RSS (MiB) | above imports (MiB) | seconds |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['command']} | {r['code']} | {r['peak_MiB']} | {r['above_setup_MiB']} "
            f"| {r['seconds']} |"
        )


if __name__ == "__main__":
    main()
