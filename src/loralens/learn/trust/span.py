"""The fit check's span score: how much of a LoRA's update lies outside the subspaces that the
training LoRAs' updates occupy, layer by layer. It reads no trained model, ignores scale, and is
GL(r)-invariant (it sees U V^T only through U^T U, V^T V and projections of U and V).

Per layer, each training update ΔW = U V^T is scaled to unit norm; its input side contributes
V (U^T U) V^T to a covariance over the layer's inputs, its output side U (V^T V) U^T to one over
its outputs. A basis holds the top eigenvectors carrying ``SPAN_ENERGY`` of each covariance (at
most ``SPAN_MAX_RANK``). A LoRA's span score is the mean over its layers of
1 - (share of |ΔW|^2 inside the input basis) x (share inside the output basis): about 0.2 for
LoRAs like the training ones, near 1 for one finetuned on a base pretrained from another seed,
whose layers use other directions (BENCHMARKS.md, "Trust").

Everything is computed from the factors, never forming ΔW: a covariance's eigenvectors come from
the stacked factors' Gram matrix in whichever of its two sides is smaller. :class:`SpanFit` fits
the bases on a run's training LoRAs and scores those LoRAs out of fold, for calibration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from loralens.lora import LoRABatch
from loralens.models.basis import leading_directions, side_factors

if TYPE_CHECKING:
    from loralens.store import LoRAStore

#: Share of the training updates' energy a basis keeps, per layer and side.
SPAN_ENERGY = 0.9
#: Most basis vectors kept per layer and side (bounds the calibration file on wide layers).
SPAN_MAX_RANK = 128
#: Most training LoRAs whose factors build the bases (a seeded sample above this), and the
#: most factor entries they may hold together (fewer LoRAs where each is large; never below 16).
SPAN_REFERENCE = 256
SPAN_BUDGET = 2**23


def span_sample_size(spec_shapes: list[tuple[int, int]], ranks: list[int]) -> int:
    """How many LoRAs of this layout the bases are fitted on: SPAN_REFERENCE, fewer for LoRAs
    so large that their factors would pass SPAN_BUDGET entries."""
    per_lora = sum((o + i) * r for (o, i), r in zip(spec_shapes, ranks))
    return max(16, min(SPAN_REFERENCE, SPAN_BUDGET // max(per_lora, 1)))


#: The lowest span threshold: a share this small outside the bases is rounding, not a shift
#: (training LoRAs that all lie in one exact subspace score 0 up to float error).
SPAN_FLOOR = 0.01


@dataclass
class Span:
    """Per layer, orthonormal bases (rows) of the training updates' input and output sides."""

    inputs: list[np.ndarray]  # (k_in, in) per layer
    outputs: list[np.ndarray]  # (k_out, out) per layer

    @classmethod
    def fit(cls, factors: list[tuple[torch.Tensor, torch.Tensor]]) -> Span:
        """The bases of stacked side factors (:func:`side_factors`) per layer."""
        return cls([_basis(f_in) for f_in, _ in factors], [_basis(f_out) for _, f_out in factors])

    @torch.no_grad()
    def scores(self, batch: LoRABatch) -> np.ndarray:
        """(N,) span score of each LoRA of ``batch`` (0 for a LoRA whose layers are all zero)."""
        per = []
        for u, v, b_in, b_out in zip(batch.U, batch.V, self.inputs, self.outputs):
            u, v = u.detach().cpu().double(), v.detach().cpu().double()
            gu, gv = _grams(u), _grams(v)
            total = (gu * gv).sum(dim=(1, 2))
            a, c = torch.from_numpy(b_in) @ v, torch.from_numpy(b_out) @ u  # bases x V, x U
            inside_in = ((a @ gu) * a).sum(dim=(1, 2))
            inside_out = ((c @ gv) * c).sum(dim=(1, 2))
            outside = 1 - inside_in * inside_out / total.clamp(min=1e-300) ** 2
            per.append(torch.where(total > 0, outside, torch.nan).numpy())
        per_layer = np.stack(per, axis=1)
        has = np.isfinite(per_layer).any(axis=1)
        out = np.zeros(len(per_layer))
        out[has] = np.nanmean(per_layer[has], axis=1)
        return np.clip(out, 0.0, 1.0)


def fit_out_of_fold(
    factors: list[tuple[torch.Tensor, torch.Tensor]], folds: np.ndarray
) -> list[Span]:
    """One :class:`Span` per fold label of ``folds`` (sorted; one label per LoRA in
    ``factors``), fitted on the LoRAs of the other folds."""
    folds = np.asarray(folds)
    spans = []
    for g in np.unique(folds):
        other = folds != g
        sides = []
        for f_in, f_out in factors:
            width = f_in.shape[1] // len(folds)  # the layer's (padded) rank
            m = torch.from_numpy(np.repeat(other, width))
            sides.append((f_in[:, m], f_out[:, m]))
        spans.append(Span.fit(sides))
    return spans


def _grams(f: torch.Tensor) -> torch.Tensor:
    return f.mT @ f


@torch.no_grad()
def _basis(f: torch.Tensor) -> np.ndarray:
    """Orthonormal rows spanning the top eigenvectors of f f^T that carry SPAN_ENERGY of its
    trace (at most SPAN_MAX_RANK)."""
    rows, lam = leading_directions(f, SPAN_MAX_RANK)
    total = float((f * f).sum())
    if total <= 0 or len(lam) == 0:
        return np.zeros((0, f.shape[0]))
    k = int(np.searchsorted((lam.cumsum(0) / total).numpy(), SPAN_ENERGY)) + 1
    return np.ascontiguousarray(rows[:k].numpy())


@dataclass
class SpanFit:
    """The span score's bases, fitted on ``rows`` (sorted), and those rows' out-of-fold scores."""

    span: Span
    rows: np.ndarray
    oof: np.ndarray

    @classmethod
    def of(
        cls, model: Any, store: LoRAStore, rows: np.ndarray, folds: np.ndarray, seed: int
    ) -> SpanFit:
        """Bases from ``rows`` (a seeded sample of :func:`span_sample_size` above that), each
        sampled row scored against bases of the other ``folds`` (one label per row)."""
        rows, folds = np.asarray(rows), np.asarray(folds)
        pad = [int(r) for r in model.spec.ranks]
        size = span_sample_size(list(model.spec.shapes), pad)
        keep = np.arange(len(rows))
        if len(rows) > size:
            keep = np.sort(np.random.default_rng(seed).choice(keep, size, replace=False))
        rows, folds = rows[keep], folds[keep]
        _, batch = next(store.iter_batches(len(rows), rows=rows, pad_ranks=pad))
        factors = side_factors([batch])
        oof = np.zeros(len(rows))
        labels = np.unique(folds)
        for g, span in zip(labels, fit_out_of_fold(factors, folds)):
            at = np.flatnonzero(folds == g)
            oof[at] = span.scores(batch.select(at))
        order = np.argsort(rows)
        return cls(Span.fit(factors), rows[order], oof[order])

    def held_out(self, rows: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """``scores`` of ``rows`` against the bases, the fitted rows' replaced by their
        out-of-fold scores: every score held out from the bases that gave it."""
        rows = np.asarray(rows)
        at = np.searchsorted(self.rows, rows).clip(max=len(self.rows) - 1)
        hit = self.rows[at] == rows
        out = np.array(scores, dtype=np.float64)
        out[hit] = self.oof[at[hit]]
        return out


__all__ = [
    "SPAN_BUDGET",
    "SPAN_ENERGY",
    "SPAN_FLOOR",
    "SPAN_MAX_RANK",
    "SPAN_REFERENCE",
    "Span",
    "SpanFit",
    "fit_out_of_fold",
    "span_sample_size",
]
