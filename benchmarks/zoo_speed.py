"""Zoo build throughput (LoRAs/hour) of a preset under several settings, timed in one process.

    python benchmarks/zoo_speed.py --num 8 --settings slots8-t1,slots1-t1,slots8-t2
    python benchmarks/zoo_speed.py --preset digits-dreambooth --num 32 --settings group16-t1,group1-t1

Each setting builds the same LoRAs (seed 0, indices 0..num-1) into a fresh temp folder with the
cached base model (pretrained first if missing, not timed). A setting is ``<option><K>-t<N>``:
preset option ``<option>`` = K LoRAs finetuned at once over the shared frozen base (``slots`` for
skills-lm, ``group`` for the digits presets; 1 = one LoRA at a time) and N torch threads.
Settings run one after another in one process, so their ratios are comparable even when other
work shares the machine. Besides wall time it reports the process's CPU seconds per LoRA, which
other work does not inflate much: on 2 idle cores, 2 shards with 1 thread each build about
2 / (CPU s per LoRA) LoRAs per second.
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time

import torch

from loralens.zoo.builder import build_zoo

DEFAULT_SETTINGS = {"skills-lm": "slots8-t1,slots1-t1,slots8-t2"}


def parse_setting(setting: str) -> tuple[str, int, int]:
    """``slots8-t1`` -> ("slots", 8, 1)."""
    m = re.fullmatch(r"([a-z_]+)(\d+)-t(\d+)", setting)
    if not m:
        raise SystemExit(f"setting {setting!r} is not <option><K>-t<N>, e.g. slots8-t1")
    return m.group(1), int(m.group(2)), int(m.group(3))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="skills-lm")
    ap.add_argument("--num", type=int, default=16)
    ap.add_argument("--size", default="small")
    ap.add_argument(
        "--settings",
        default=None,
        help="default: slots8-t1,slots1-t1,slots8-t2 for skills-lm, group16-t1,group1-t1 otherwise",
    )
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args()
    settings = args.settings or DEFAULT_SETTINGS.get(args.preset, "group16-t1,group1-t1")
    build_zoo(
        args.preset,
        1,
        tempfile.mkdtemp(),
        options={"size": args.size},
        progress=False,
        cache_dir=args.cache_dir,
    )
    print(
        "| preset | setting | LoRAs | wall s | LoRAs/hour (wall) | CPU s/LoRA | LoRAs/hour, 2 idle cores (est.) |\n"
        "|---|---|---|---|---|---|---|"
    )
    for setting in settings.split(","):
        option, k, threads = parse_setting(setting)
        with tempfile.TemporaryDirectory() as out:
            t0, c0 = time.time(), time.process_time()
            build_zoo(
                args.preset,
                args.num,
                out,
                options={"size": args.size, option: k},
                threads=threads,
                progress=False,
                cache_dir=args.cache_dir,
                log=lambda _m: None,
            )
            wall, cpu = time.time() - t0, time.process_time() - c0
        per = cpu / args.num
        print(
            f"| {args.preset} | {setting} | {args.num} | {wall:.1f} | {args.num / wall * 3600:.0f} | "
            f"{per:.2f} | {2 / per * 3600:.0f} |",
            flush=True,
        )
    print(f"torch {torch.__version__}")


if __name__ == "__main__":
    main()
