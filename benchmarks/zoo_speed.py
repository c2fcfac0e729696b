"""Zoo build throughput (LoRAs/hour) of the skills-lm preset under several settings.

    python benchmarks/zoo_speed.py --num 16 --settings slots8-t1,slots1-t1,slots8-t2

Each setting builds the same LoRAs (seed 0, indices 0..num-1) into a fresh temp folder with the
cached base model (pretrained first if missing, not timed) and reports LoRAs/hour of the build
alone. ``slotsK`` = K LoRAs finetuned at once over the shared frozen base (batched adapters),
``tN`` = N torch threads. Settings run one after another in one process, so their ratios are
comparable even when other work shares the machine.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from loralens.zoo.builder import build_zoo


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num", type=int, default=16)
    ap.add_argument("--size", default="small")
    ap.add_argument("--settings", default="slots8-t1,slots1-t1,slots8-t2")
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args()
    build_zoo(
        "skills-lm",
        1,
        tempfile.mkdtemp(),
        options={"size": args.size},
        progress=False,
        cache_dir=args.cache_dir,
    )
    print("| setting | LoRAs | seconds | LoRAs/hour | s/LoRA |\n|---|---|---|---|---|")
    for setting in args.settings.split(","):
        slots, threads = setting.split("-")
        opts = {"size": args.size, "slots": int(slots.removeprefix("slots"))}
        with tempfile.TemporaryDirectory() as out:
            t0 = time.time()
            build_zoo(
                "skills-lm",
                args.num,
                out,
                options=opts,
                threads=int(threads.removeprefix("t")),
                progress=False,
                cache_dir=args.cache_dir,
                log=lambda _: None,
            )
            dt = time.time() - t0
        print(
            f"| {setting} | {args.num} | {dt:.1f} | {args.num / dt * 3600:.0f} | {dt / args.num:.2f} |",
            flush=True,
        )
    print(f"torch {torch.__version__}")


if __name__ == "__main__":
    main()
