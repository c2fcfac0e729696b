"""Training recipes compared on development stores: R² (accuracy for a classification target
family such as 'src_*') of each variant, mean ± std over seeds.

    python benchmarks/recipe_search.py --target eval_loss --seeds 3 STORE [STORE ...] \\
        --variant default --variant 'glnet:weight_decay=1e-2,hidden=32'

A variant is ``MODEL[:KEY=VALUE,...]``: training settings (epochs, lr, weight_decay, patience,
batch_size) or model hyperparameters (anything else). Probes are fitted once per store and seed
(the ``default`` variant's run) and printed beside. Use it on development zoos only: the
defaults it picks are then judged once on an evaluation zoo it never saw.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from loralens.learn.fitting.data import resolve_targets
from loralens.learn.training.config import TrainConfig
from loralens.learn.training.loop import train
from loralens.models.registry import TRAINING_DEFAULTS
from loralens.store import LoRAStore

TRAINING = set(TRAINING_DEFAULTS) - {"grad_clip"}


def parse_variant(text: str) -> tuple[str, dict, dict]:
    """``glnet:lr=1e-3,hidden=32`` -> ("glnet", training settings, model hyperparameters)."""
    model, _, rest = (text if text != "default" else "glnet").partition(":")
    settings, hparams = {}, {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        (settings if key in TRAINING else hparams)[key] = _value(value)
    return model, settings, hparams


def _value(text: str) -> int | float | str:
    """``3`` -> 3, ``1e-3`` -> 0.001, anything else (``none``, ``dense``) stays a string."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stores", nargs="+")
    ap.add_argument("--target", default="eval_loss", help="a target family: COL[,COL] or a glob")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--variant", action="append", default=[])
    ap.add_argument("--json", dest="json_out")
    a = ap.parse_args()
    variants = a.variant or ["default"]
    results: dict[str, dict[str, list[float]]] = {}
    for store in a.stores:
        targets = resolve_targets(LoRAStore(store), a.target)
        for seed in range(a.seeds):
            for k, v in enumerate(variants):
                model, settings, hparams = parse_variant(v)
                cfg = TrainConfig(
                    model, targets, seed=seed, hparams=hparams, plots=False, threads=1,
                    probes=k == 0, **settings,
                )  # fmt: skip
                m = train(store, cfg, None)
                metric = "r2" if "r2" in m["test"] else "accuracy"
                results.setdefault(store, {}).setdefault(v, []).append(m["test"][metric])
                for name, p in m["probes"].items():
                    if "test" in p:
                        results[store].setdefault(name, []).append(p["test"][metric])
                print(f"{store} seed {seed} {v}: {metric} {m['test'][metric]:.3f}", flush=True)
    for store, rows in results.items():
        print(f"\n{store}")
        for name, vals in rows.items():
            print(f"  {name:<48s} {np.mean(vals):.3f} ± {np.std(vals):.3f}")
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
