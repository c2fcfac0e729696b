"""Issue 16, a candidate distribution score: how much of a LoRA's update lies outside the input
and output subspaces that the training LoRAs' updates occupy, layer by layer.

    python benchmarks/trust_subspace.py ZOOS [--train 160] [--energy 0.9] [--seed 0]

ZOOS holds the trust benchmark's stores (``z-main.store``, ``z-id.store``, ``z-seed1.store``,
``z-variant.store``, ``z-ranks.store``; see BENCHMARKS.md, "Trust"). The reference is ``--train``
LoRAs of z-main (seeded). Per layer, each training ΔW is scaled to unit norm, and the subspaces
are the top singular directions of the stacked rows (input side) and columns (output side) that
hold ``--energy`` of the energy. A LoRA's score is 1 - (share of its ΔW inside the input subspace)
x (share inside the output subspace), averaged over layers. The score is GL(r)-invariant, ignores
scale, and does not depend on any trained model.

Prints, for each shifted zoo against z-id, the score's AUROC and the share flagged at z-id's
97.5% quantile. That quantile is taken on z-id itself, so the flag rates are optimistic; the
AUROC is not.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from loralens.store import LoRAStore


def delta_weights(store: LoRAStore, rows: np.ndarray) -> list[np.ndarray]:
    """Per layer, the (N, out, in) float64 ΔW of ``rows``."""
    pad = store.ranks.max(axis=0)
    parts = [
        [w.double().numpy() for w in batch.delta_weights()]
        for _, batch in store.iter_batches(64, rows=rows, pad_ranks=pad)
    ]
    return [np.concatenate(layer) for layer in zip(*parts)]


def subspaces(dws: list[np.ndarray], energy: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer, (input basis (k_in, in), output basis (k_out, out)) holding ``energy`` of
    the unit-normalized training updates' stacked rows and columns."""
    out = []
    for w in dws:
        n, o, i = w.shape
        w = w / np.linalg.norm(w.reshape(n, -1), axis=1)[:, None, None]
        bases = []
        for stacked in (w.reshape(n * o, i), w.transpose(0, 2, 1).reshape(n * i, o)):
            _, s, vt = np.linalg.svd(stacked, full_matrices=False)
            k = int(np.searchsorted(np.cumsum(s**2) / (s**2).sum(), energy)) + 1
            bases.append(vt[:k])
        out.append((bases[0], bases[1]))
    return out


def scores(dws: list[np.ndarray], bases: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """(N,) mean over layers of 1 - share(inside input subspace) x share(inside output one)."""
    per = []
    for w, (b_in, b_out) in zip(dws, bases):
        total = (w**2).sum(axis=(1, 2))
        inside_in = ((w @ b_in.T) ** 2).sum(axis=(1, 2)) / total
        inside_out = (np.einsum("noi,ko->nki", w, b_out) ** 2).sum(axis=(1, 2)) / total
        per.append(1 - inside_in * inside_out)
    return np.mean(per, axis=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("zoos", type=Path)
    ap.add_argument("--train", type=int, default=160)
    ap.add_argument("--energy", type=float, default=0.9)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    main_store = LoRAStore(args.zoos / "z-main.store")
    rows = np.sort(np.random.default_rng(args.seed).permutation(len(main_store))[: args.train])
    bases = subspaces(delta_weights(main_store, rows), args.energy)

    def zoo_scores(name: str) -> np.ndarray:
        store = LoRAStore(args.zoos / f"{name}.store")
        return scores(delta_weights(store, np.arange(len(store))), bases)

    iid = zoo_scores("z-id")
    threshold = np.quantile(iid, 0.975)
    print(f"z-id: mean score {iid.mean():.3f}, 97.5% quantile {threshold:.3f}")
    for name in ("z-seed1", "z-variant", "z-ranks"):
        s = zoo_scores(name)
        auroc = roc_auc_score(np.r_[np.zeros(len(iid)), np.ones(len(s))], np.r_[iid, s])
        print(
            f"{name}: mean score {s.mean():.3f}, AUROC {auroc:.3f}, "
            f"flagged {float((s > threshold).mean()):.2f}"
        )


if __name__ == "__main__":
    main()
