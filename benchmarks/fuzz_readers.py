"""Fuzz the LoRA readers for longer than CI does, with the same strategies and property.

    python benchmarks/fuzz_readers.py --examples 5000

Generates hostile inputs with tests/formats/reader_fuzz.py (broken safetensors headers, random
adapter_config.json values, random tensor shapes/dtypes/values in every key style, random
pickles) and loads each with load_lora: a finite float32 LoRA or a LoRAFormatError is fine,
anything else (another exception, a non-finite or non-float LoRA, a hang) is a crash. Prints
the inputs tried and their outcomes by kind, then every distinct crash with one input for it.
"""

from __future__ import annotations

import argparse
import collections
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "formats"))

from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from reader_fuzz import cases, outcome  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--examples", type=int, default=1000, help="inputs to try")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    crashes: dict[str, tuple] = {}

    @settings(
        max_examples=args.examples,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(cases())
    def run(case):
        result, detail = outcome(case)
        counts[case[0], result] += 1
        if result not in ("loaded", "refused"):
            crashes.setdefault(f"{result}: {detail.split(':', 1)[0]} {detail[:120]}", case)

    start = time.perf_counter()
    seed(args.seed)(run)()
    seconds = time.perf_counter() - start
    tried = sum(counts.values())
    print(f"machine: {platform.machine()} {platform.system()}, Python {platform.python_version()}")
    print(f"inputs tried: {tried} in {seconds:.0f} s (seed {args.seed})")
    for kind in sorted({k for k, _ in counts}):
        by = {r: n for (k, r), n in counts.items() if k == kind}
        print(f"  {kind}: " + ", ".join(f"{r} {n}" for r, n in sorted(by.items())))
    print(f"crashes found: {len(crashes)} distinct")
    for what, case in crashes.items():
        print(f"  {what}\n    input: {case[0]}, files {sorted(case[1])}, load {case[2]}")
    sys.exit(1 if crashes else 0)


if __name__ == "__main__":
    main()
