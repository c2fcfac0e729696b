"""How much of a label the recipe explains: gradient-boosted trees on a store's recipe columns.

    python benchmarks/recipe_trees.py STORE [--target eval_loss] [--seeds 3]

Fits trees on the training hyperparameters alone, then on the hyperparameters plus the
data-source flags (``src_*``), with the same 80/10/10 splits ``loralens train`` uses, and prints
test R² (mean ± std over seeds): a ceiling of sorts for what a LoRA's recipe determines.
"""

from __future__ import annotations

import argparse

import numpy as np
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.metrics import r2_score

from loralens.learn.fitting.data import hparam_columns, make_split, select_rows
from loralens.store import LoRAStore


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("store")
    ap.add_argument("--target", default="eval_loss")
    ap.add_argument("--seeds", type=int, default=3)
    a = ap.parse_args()
    store = LoRAStore(a.store)
    hp = [c for c in hparam_columns(store, exclude=[a.target]) if c != "init_seed"]
    src = [c for c in store.label_columns if c.startswith("src_")]
    y = store.labels([a.target]).ravel()
    for name, cols in (
        ("training hyperparameters", hp),
        ("hyperparameters + data sources", hp + src),
    ):
        x, scores = store.labels(cols), []
        for seed in range(a.seeds):
            split = make_split(store, select_rows(store, None), y[:, None], seed)
            tr, te = split["train"], split["test"]
            model = HistGradientBoostingRegressor(
                max_iter=300, min_samples_leaf=5, random_state=seed
            )
            scores.append(r2_score(y[te], model.fit(x[tr], y[tr]).predict(x[te])))
        print(f"{name:32s} R² {np.mean(scores):.3f} ± {np.std(scores):.3f}  ({len(cols)} columns)")


if __name__ == "__main__":
    main()
