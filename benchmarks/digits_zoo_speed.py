"""Zoo build throughput (LoRAs/hour) of the digits presets under several settings.

    python benchmarks/digits_zoo_speed.py --preset digits-dreambooth --num 32 --settings group16-t1,group1-t1

Each setting builds the same LoRAs (seed 0, indices 0..num-1) into a fresh temp folder with the
cached base model (pretrained first if missing, not timed). ``groupK`` = K LoRAs finetuned and
sampled at once over the shared frozen UNet (batched adapters), ``tN`` = N torch threads. Besides
wall time it reports the process's CPU seconds per LoRA, which other work on a shared machine
does not inflate much: on 2 idle cores, 2 shards with 1 thread each build about
2 / (CPU s per LoRA) LoRAs per second.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from loralens.zoo.builder import build_zoo


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="digits-dreambooth")
    ap.add_argument("--num", type=int, default=32)
    ap.add_argument("--size", default="small")
    ap.add_argument("--settings", default="group16-t1,group1-t1")
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args()
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
    for setting in args.settings.split(","):
        group, threads = setting.split("-")
        opts = {"size": args.size, "group": int(group.removeprefix("group"))}
        with tempfile.TemporaryDirectory() as out:
            t0, c0 = time.time(), time.process_time()
            build_zoo(
                args.preset,
                args.num,
                out,
                options=opts,
                threads=int(threads.removeprefix("t")),
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


if __name__ == "__main__":
    main()
