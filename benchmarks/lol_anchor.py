"""The paper's own GL-net (moeputt/LoL, ``llm/metanet``) trained on loralens stores: the anchor
row of issue 13, on the same rows and splits as ``loralens train``.

    python benchmarks/lol_anchor.py --lol ~/src/LoL --target eval_loss --seeds 3 STORE [STORE ...]
        [--where F] [--train-where F --test-where F [--test-where F ...]] [--eval-store S2]
        [--lrs 5e-5,1e-4,5e-4,1e-3,5e-3] [--standardize] [--probe] [--json OUT]

Modes: one store split 80/10/10 (default); ``--train-where``/``--test-where``: train on the rows
of one filter (split as ``train --where`` splits them), report on those of each other (rank
generalization); ``--eval-store``: train on STORE, report on every labelled row of another store
with the same layers (variant-base transfer). Rows a model trained or early-stopped on are left
out of every report (matched as ``loralens evaluate`` matches them) and counted.

What is theirs, imported at run time from ``--lol`` (nothing of it is copied here): the model
class ``models_metanet.GLInvariantMLP``, their per-epoch ``main.train`` (AdamW step on MSE of raw
labels) and ``main.Tester`` (the validation MSE that picks the epoch). Settings are those of
``main.py --transform pair --model gl_mlp --num_layers 2 --epochs 60 --target eval_loss`` in
``scripts/eval_loss.sh`` with main.py's defaults (batch 32, AdamW weight decay 1e-2, dropout 0.1,
invariant hidden width 256; equivariant width 16, k 4, d 32 fixed in main.py); that script
sweeps the learning rate over 5e-5..5e-3, so per seed every rate of ``--lrs`` is trained and the
one with the lowest best-epoch validation MSE is kept; the test numbers are those of the best
validation epoch, as in main.py.

What is adapted, and why:
- Input: their ``PairWeights`` gives, per layer, (B, A.T) of a PEFT state dict: (out, r) and
  (in, r), exactly a loralens ``LoRABatch``'s (U, V), whose U carries PEFT's alpha/r scale
  (U V^T is the weight update; their data had one rank and one alpha, so the scale was fixed).
- Mixed ranks: zero-padded to the widest rank of the rows used, as ``loralens train`` does; the
  model sees r only through products U V^T, row-wise masks and left multiplications, so the
  zero columns change no output.
- ``n_input_layers`` is 56 in main.py (their Qwen2 adapters); here it is the store's layer count.
- Splits: ``loralens.learn.fitting.data.make_splits`` with ``TrainConfig``'s defaults for the seed, as
  ``learn/loop.py`` calls it (stores under 60 labelled LoRAs: its k folds, metrics averaged).
- CPU: ``models_metanet`` sends ``EquivDropout``'s masks to a module-level
  ``device = cuda``; it is reassigned to the device used. Their ``torch.autocast("cuda")`` is
  disabled by torch on a machine without CUDA (a warning), so CPU runs train in float32 where
  theirs ran in float16 autocast. Seeds: ``torch.manual_seed(seed)`` before each model and a
  seeded shuffle; their script seeds nothing.

``--standardize`` (off by default, not their recipe) trains on labels standardized on the train
split, as ``loralens train`` does, to tell their model from their raw-label MSE recipe.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import sys
import time
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from loralens.learn.fitting.data import make_splits, select_rows
from loralens.learn.fitting.probes import probe_folds
from loralens.learn.fitting.tasks import REGRESSION, regression_metrics
from loralens.learn.runs.seen import seen_mask, trained_on
from loralens.learn.training.config import TrainConfig
from loralens.lora import LoRABatch
from loralens.store import LoRAStore

#: The learning rates ``scripts/eval_loss.sh`` sweeps.
SWEEP_LRS = (5e-5, 1e-4, 5e-4, 1e-3, 5e-3)
#: main.py's settings for ``--model gl_mlp --num_layers 2`` (argparse defaults otherwise).
GLNET = {"n_layers": 2, "hidden_dim_equiv": 16, "hidden_dim_inv": 256, "k": 4, "d": 32, "p": 0.1}
EPOCHS, BATCH_SIZE, WEIGHT_DECAY = 60, 32, 1e-2

Pairs = list[tuple[torch.Tensor, torch.Tensor]]
#: (shift, scale) of the labels a model trains on: (0, 1) is their raw labels.
Norm = tuple[float, float]
RAW: Norm = (0.0, 1.0)


def lol_pairs(batch: LoRABatch) -> Pairs:
    """A LoRABatch in their ``PairWeights`` format: per layer (B, A.T), here (U, V)."""
    return [(u.float().contiguous(), v.float().contiguous()) for u, v in zip(batch.U, batch.V)]


def load_pairs(store: LoRAStore, rows: np.ndarray, pad: np.ndarray) -> Pairs:
    """All ``rows`` of ``store`` in memory, zero-padded to ranks ``pad``."""
    batch = store.batch(np.asarray(rows, dtype=np.int64), pad_ranks=[int(r) for r in pad])
    return lol_pairs(batch)


def import_lol(path: Path, device: torch.device) -> tuple[ModuleType, ModuleType]:
    """Their ``models_metanet`` and ``main`` from a checkout of moeputt/LoL, made to run on
    ``device`` (their module-level ``device`` is CUDA)."""
    metanet = Path(path).expanduser() / "llm" / "metanet"
    for name in ("models_metanet.py", "main.py", "data_utils.py"):
        if not (metanet / name).is_file():
            sys.exit(f"{path}: not a checkout of moeputt/LoL ({metanet / name} is missing)")
    sys.path.insert(0, str(metanet))
    models = importlib.import_module("models_metanet")
    main = importlib.import_module("main")
    models.device = device
    warnings.filterwarnings("ignore", message=".*CUDA is not available.*")
    return models, main


class Data:
    """One store's labelled rows in memory: their pairs and labels, addressed by store row."""

    def __init__(self, store: LoRAStore, target: str, rows: np.ndarray, pad: np.ndarray):
        self.pos = {int(r): i for i, r in enumerate(rows)}
        self.pairs = load_pairs(store, rows, pad)
        self.y = torch.from_numpy(store.labels([target])[rows]).float()

    def take(self, rows: np.ndarray) -> tuple[Pairs, torch.Tensor]:
        """The pairs and labels of store ``rows``."""
        i = torch.as_tensor([self.pos[int(r)] for r in rows], dtype=torch.long)
        return [(u[i], v[i]) for u, v in self.pairs], self.y[i]

    def loader(self, rows: np.ndarray, batch_size: int, seed: int | None, norm: Norm) -> Any:
        """Batches ``(pairs, (y - shift) / scale)`` of ``rows`` as their loops read them;
        shuffled when seeded."""
        pairs, y = self.take(rows)
        y = (y - norm[0]) / norm[1]
        g = None if seed is None else torch.Generator().manual_seed(seed)
        order = torch.utils.data.DataLoader(
            range(len(y)), batch_size=batch_size, shuffle=g is not None, generator=g
        )
        return _Batches(pairs, y, order)


class _Batches:
    """Re-iterable (pairs, y) batches in the index order of a DataLoader."""

    def __init__(self, pairs: Pairs, y: torch.Tensor, order: Any):
        self.pairs, self.y, self.order = pairs, y, order

    def __iter__(self):
        for i in self.order:
            yield [(u[i], v[i]) for u, v in self.pairs], self.y[i]


def build_glnet(models: ModuleType, pairs: Pairs) -> torch.nn.Module:
    """Their GL-net as main.py builds ``gl_mlp`` (n_input_layers: this store's layers)."""
    ns = [int(u.shape[1]) for u, _ in pairs]
    ms = [int(v.shape[1]) for _, v in pairs]
    return models.GLInvariantMLP(
        ns, ms, n_input_layers=len(pairs), rank=4, out_dim=1, pool_mean=False, head_type=1, **GLNET
    )


def fit(
    lol: tuple[ModuleType, ModuleType],
    data: Data,
    split: dict[str, np.ndarray],
    lr: float,
    seed: int,
    device: torch.device,
    epochs: int = EPOCHS,
    norm: Norm = RAW,
) -> dict[str, Any]:
    """Their recipe on one split: AdamW, ``epochs`` epochs, the best validation epoch's model."""
    models, main = lol
    torch.manual_seed(seed)
    model = build_glnet(models, data.take(split["train"][:1])[0]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    crit = torch.nn.MSELoss()
    train = data.loader(split["train"], BATCH_SIZE, seed, norm)
    val = main.Tester("Val", data.loader(split["val"], 2 * BATCH_SIZE, None, norm), crit,
                      "regression", device, verbose=False)  # fmt: skip
    best = {"val_loss": float("inf"), "epoch": -1, "state": None}
    for epoch in range(epochs):
        train_loss = main.train(train, model, crit, opt, device)
        val_loss = float(val(model)["loss"])
        if val_loss < best["val_loss"]:
            state = copy.deepcopy(model.state_dict())
            best = {"val_loss": val_loss, "epoch": epoch, "train_loss": train_loss, "state": state}
    model.load_state_dict(best.pop("state"))
    return {"model": model, "lr": lr, **best}


@torch.no_grad()
def predict(model: torch.nn.Module, pairs: Pairs, device: torch.device) -> np.ndarray:
    """Model outputs for in-memory pairs, in batches of 64."""
    model.eval()
    n, out = int(pairs[0][0].shape[0]), []
    for s in range(0, n, 64):
        out.append(model([(u[s : s + 64].to(device), v[s : s + 64].to(device)) for u, v in pairs]))
    return torch.cat(out).float().cpu().numpy()


def score(
    model: torch.nn.Module, data: Data, rows: np.ndarray, device: torch.device, norm: Norm
) -> dict:
    """R², Kendall tau, Spearman of the model on store ``rows`` (loralens' own metrics)."""
    pairs, y = data.take(rows)
    pred = predict(model, pairs, device) * norm[1] + norm[0]
    m = regression_metrics(pred, y.numpy(), ["y"])
    return {k: m[k] for k in ("r2", "kendall_tau", "spearman")} | {"n": len(rows)}


def labelled(store: LoRAStore, target: str, where: str | None) -> np.ndarray:
    """Rows of ``store`` that ``where`` selects and that have a ``target`` label."""
    rows = select_rows(store, where)
    return rows[np.isfinite(store.labels([target])[rows, 0])]


def run_store(args: argparse.Namespace, lol: tuple, path: str, device: torch.device) -> dict:
    """Every seed on one store: per seed the chosen rate, best epoch and test scores."""
    store = LoRAStore(path)
    where = args.train_where or args.where
    train_rows = labelled(store, args.target, where)
    tests: dict[str, tuple[LoRAStore, np.ndarray]] = {}
    for f in args.test_where or []:
        tests[f"where {f}"] = (store, labelled(store, args.target, f))
    if args.eval_store:
        other = LoRAStore(args.eval_store)
        if other.spec.names != store.spec.names or other.spec.shapes != store.spec.shapes:
            sys.exit(f"{args.eval_store}: its layers differ from those of {path}")
        tests[f"store {args.eval_store}"] = (other, labelled(other, args.target, args.where))
    for name, (_, rows) in tests.items():
        if len(rows) == 0:
            sys.exit(f"{path}: no labelled {args.target!r} rows to report on for {name}")
    pad = np.max([s.ranks[r].max(axis=0) for s, r in [(store, train_rows), *tests.values()]], 0)
    same = [r for s, r in tests.values() if s is store]
    data = Data(store, args.target, np.unique(np.concatenate([train_rows, *same])), pad)
    datas = {k: data if s is store else Data(s, args.target, r, pad) for k, (s, r) in tests.items()}
    y_all = store.labels([args.target])
    seeds = []
    for seed in range(args.seeds):
        cfg = TrainConfig(model="glnet", targets=[args.target], seed=seed, where=where)
        splits = make_splits(
            store, select_rows(store, where), y_all, seed, fractions=cfg.fractions,
            split_column=cfg.split_column, folds=cfg.folds,
        )  # fmt: skip
        folds = []
        for split in splits:
            t0 = time.time()
            y = y_all[split["train"], 0]
            norm = (float(y.mean()), float(y.std())) if args.standardize else RAW
            runs = [fit(lol, data, split, lr, seed, device, args.epochs, norm) for lr in args.lrs]
            run = min(runs, key=lambda r: r["val_loss"])
            used = trained_on(store, np.concatenate([split["train"], split["val"]]))
            res = {"test": score(run["model"], data, split["test"], device, norm)}
            for name, (s, rows) in tests.items():
                keep = rows[~seen_mask(used, s, rows)]
                res[name] = score(run["model"], datas[name], keep, device, norm)
                res[name]["seen_left_out"] = len(rows) - len(keep)
            if args.probe:
                res |= probe_scores(store, y_all, split, {n: rows for n, (s, rows) in
                                    tests.items() if s is store})  # fmt: skip
            info = {k: run[k] for k in ("lr", "epoch", "val_loss", "train_loss")}
            folds.append(res | info | {"seconds": round(time.time() - t0, 1)})
            print(f"{path} seed {seed}: {json.dumps(folds[-1])}", flush=True)
        seeds.append(folds[0] if len(folds) == 1 else _fold_mean(folds))
    return {"store": path, "train_rows": len(train_rows), "seeds": seeds}


def probe_scores(
    store: LoRAStore, y_all: np.ndarray, split: dict[str, np.ndarray], tests: dict[str, np.ndarray]
) -> dict[str, dict]:
    """loralens' linear probes (learn.probes) fitted on the split's train and val rows, scored
    on its test rows and on each same-store test set (``"<test set> [<probe>]"``)."""
    fit_rows = np.concatenate([split["train"], split["val"]])
    named = {"test": split["test"], **{n: r[~np.isin(r, fit_rows)] for n, r in tests.items()}}
    probes = probe_folds(store, REGRESSION, ["y"], y_all, [(fit_rows, r) for r in named.values()])
    out = {}
    for probe, got in probes.items():
        for name, m in zip(named, got.get("folds", [])):
            out[f"{name} [{probe}]"] = {k: m[k] for k in ("r2", "kendall_tau", "spearman", "n")}
    return out


def _fold_mean(folds: list[dict]) -> dict:
    """One seed's k folds: each test set's metrics averaged over the folds."""
    out = {"folds": folds}
    for name in (k for k, v in folds[0].items() if isinstance(v, dict)):
        out[name] = {m: float(np.nanmean([f[name][m] for f in folds])) for m in folds[0][name]}
    return out


def summary(result: dict) -> list[str]:
    """Markdown rows: per test set and metric, the per-seed values and their mean ± std."""
    lines = []
    for name in (k for k, v in result["seeds"][0].items() if isinstance(v, dict)):
        cells = []
        for m in ("r2", "kendall_tau", "spearman"):
            v = np.array([s[name][m] for s in result["seeds"]], dtype=float)
            per = " / ".join(f"{x:.3f}" for x in v)
            cells.append(f"{np.mean(v):.3f} ± {np.std(v):.3f} ({per})")
        lines.append(f"| {result['store']} | {name} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("stores", nargs="+", metavar="STORE")
    p.add_argument("--lol", required=True, type=Path, help="checkout of moeputt/LoL")
    p.add_argument("--target", default="eval_loss")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (split, init, shuffle)")
    p.add_argument("--where", help="rows used (as train --where); with --eval-store: its rows")
    p.add_argument("--train-where", help="rows trained on (split into train/val/test)")
    p.add_argument("--test-where", action="append", help="rows reported on (repeatable)")
    p.add_argument("--eval-store", help="a store with the same layers to report on")
    p.add_argument("--lrs", default=",".join(map(str, SWEEP_LRS)), help="rates swept per seed")
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument(
        "--standardize",
        action="store_true",
        help="not their recipe: train on labels standardized on the train split (as loralens)",
    )
    p.add_argument("--probe", action="store_true", help="also loralens' linear probes, same rows")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, help="write every number here")
    args = p.parse_args()
    if bool(args.train_where) != bool(args.test_where):
        p.error("--train-where and --test-where go together")
    args.lrs = [float(x) for x in args.lrs.split(",")]
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    lol = import_lol(args.lol, device)
    results = [run_store(args, lol, s, device) for s in args.stores]
    print("| store | test set | R² | Kendall τ | Spearman |\n|---|---|---|---|---|")
    print("\n".join(line for r in results for line in summary(r)))
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args), "results": results}, default=str))


if __name__ == "__main__":
    main()
