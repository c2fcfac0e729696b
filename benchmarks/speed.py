"""Speed benchmarks of loralens: one command reproduces every number of BENCHMARKS.md's "Speed".

    python benchmarks/speed.py                       # everything, CPU float32 (about 30 min)
    python benchmarks/speed.py --parts models,svals  # a selection
    python benchmarks/speed.py --shapes 125M,175B --models glnet,mlp-svd
    python benchmarks/speed.py --device cuda --dtype bfloat16
    python benchmarks/speed.py --quick               # tiny shapes: the CI smoke test

Writes ``<out>.md`` (the tables) and ``<out>.json`` (every number, medians too). The harness
lives in ``benchmarks/speedbench/``; its package docstring says what each number measures.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from speedbench.harness import DTYPES, PARTS, Config, run
from speedbench.models import MODELS
from speedbench.report import to_markdown
from speedbench.shapes import parse_shape


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--parts", default=",".join(PARTS), help="comma list of %(default)s")
    p.add_argument("--shapes", default=None, help="labels (125M,...,175B) or LxW, e.g. 12x768")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--budget", type=float, default=1.0, help="seconds of repeats per cell")
    p.add_argument("--dense-budget", type=float, default=60.0, help="seconds for dense svdvals")
    p.add_argument("--dense-max-gib", type=float, default=6.0, help="mlp-dense memory cap")
    p.add_argument("--store-size", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--work-dir", default=".cache/bench-speed", help="adapters and stores")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: cores)")
    p.add_argument("--no-isolate", action="store_true", help="all shapes in this process")
    p.add_argument("--quick", action="store_true", help="tiny shapes, 40 LoRAs: a smoke test")
    p.add_argument("--out", default=None, help="output stem (default benchmarks/results/speed-…)")
    a = p.parse_args(argv)

    kw = dict(
        parts=tuple(_csv(a.parts)),
        models=tuple(_csv(a.models)),
        train_models=tuple(_csv(a.models)),
        device=a.device,
        dtype=a.dtype,
        work_dir=a.work_dir,
    )
    if a.threads:
        kw["threads"] = a.threads
    unknown = set(kw["parts"]) - set(PARTS)
    if unknown:
        p.error(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    if a.quick:
        cfg = Config.quick(**kw)
    else:
        cfg = Config(
            **kw,
            batch_sizes=tuple(int(b) for b in _csv(a.batch_sizes)),
            budget_s=a.budget,
            dense_budget_s=a.dense_budget,
            dense_max_gib=a.dense_max_gib,
            store_size=a.store_size,
            train_epochs=a.epochs,
            isolate=not a.no_isolate,
        )
    if a.shapes:
        cfg.shapes = tuple(parse_shape(s) for s in _csv(a.shapes))

    res = run(cfg, log=lambda s: print(s, file=sys.stderr, flush=True))
    md = to_markdown(res)
    stem = a.out or f"benchmarks/results/speed-{a.device}-{a.dtype}{'-quick' if a.quick else ''}"
    out = Path(stem)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(md + "\n")
    out.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    print(md)
    print(f"\nwrote {out.with_suffix('.md')} and {out.with_suffix('.json')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
