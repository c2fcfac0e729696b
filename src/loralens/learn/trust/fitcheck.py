"""Does an adapter fit a trained model at all? Three layers, checked on every prediction:

1. layout: the module names and shapes the model was built for; a mismatch is refused
   (:class:`LayoutError`, naming the modules that differ);
2. sanity: the size of the update per layer, RMS of delta W, against the range the training
   LoRAs spanned (``NORM_FACTOR`` times beyond it is flagged: an all-zero LoRA, one scaled far
   beyond what any learning rate reached);
3. distribution, three scores against the training LoRAs:
   ``ood_score``, how far the adapter's embedding (the model's own invariant features as its
   head reads them, ``LoLModel.embed``) lies from theirs (a shrunk Mahalanobis distance); and
   ``scale_score``, how far its update size (mean log RMS over layers) lies from the size a ridge
   predicts from its scale-free features (ΔW or singular values over their norm), so a LoRA
   scaled by 10 scores about log 10 even where a higher learning rate reaches that size; and
   ``span_score``, the share of its update outside the directions the training LoRAs' updates
   use, layer by layer (:mod:`loralens.learn.trust.span`; no model involved, so it catches a LoRA of a
   base pretrained from another seed whatever the model's embedding makes of it).
   Each score's threshold flags its part of ``share`` of in-distribution LoRAs (a conformal
   quantile of held-out scores: the calibration LoRAs and the training LoRAs scored out of
   fold), so together they flag at most ``share`` of them (Bonferroni on the conformal
   p-values). Size and direction are two questions and get half each; the direction's half is
   split between the model's view of it (ood_score) and the model-free one (span_score).

A flagged adapter is still predicted; its row says why it is not to be trusted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from loralens.errors import InputError
from loralens.learn.trust.conformal import conformal_quantile
from loralens.learn.trust.span import SPAN_FLOOR, Span
from loralens.lora import LayerSpec

#: Share of in-distribution LoRAs the distribution layer flags by default.
OOD_SHARE = 0.05
#: An update this many times above the largest (or below the smallest) training RMS is flagged.
NORM_FACTOR = 2.0


class LayoutError(InputError):
    """An adapter (or store) whose modules or shapes are not those the model was built for."""


def check_layout(model: LayerSpec, other: LayerSpec, what: str, where: str) -> None:
    """Layer 1: refuse ``other`` unless it has the model's module names and shapes (any rank);
    the message names ``what`` (the adapter), ``where`` (the run) and the modules that differ."""
    problem = model.describe_mismatch(other)
    if problem:
        raise LayoutError(f"{what} does not fit {where}: {problem}")


@dataclass
class FitInputs:
    """What the fit check reads of each of N LoRAs (rows in one order)."""

    embed: np.ndarray  # (N, D) the model's embedding
    log_rms: np.ndarray  # (N, L) log RMS of delta W per layer
    unit: np.ndarray  # (N, U) scale-free features (``linear_base.unit_features``)
    span: np.ndarray  # (N,) span_score against the run's bases (zeros where it has none)

    def __len__(self) -> int:
        return len(self.embed)

    def take(self, rows: np.ndarray) -> FitInputs:
        return FitInputs(self.embed[rows], self.log_rms[rows], self.unit[rows], self.span[rows])


@dataclass
class ScaleModel:
    """A ridge of a LoRA's mean log RMS over layers on its scale-free features."""

    coef: np.ndarray  # (U,)
    bias: float

    @classmethod
    def fit(cls, unit: np.ndarray, log_rms: np.ndarray) -> ScaleModel:
        from loralens.learn.fitting.probes import fit_linear

        coef, bias = fit_linear(np.asarray(unit), np.asarray(log_rms).mean(axis=1), False)
        return cls(coef, bias)

    def residual(self, unit: np.ndarray, log_rms: np.ndarray) -> np.ndarray:
        """(N,) signed: mean log RMS minus the predicted one (log of "times larger")."""
        return np.asarray(log_rms).mean(axis=1) - (np.asarray(unit) @ self.coef + self.bias)


@dataclass
class FitCheck:
    """Layers 2 and 3, fitted on a run's training LoRAs and calibrated on held-out ones.

    The ood_score is the Mahalanobis distance (over sqrt(D)) to the training embeddings under
    their Ledoit-Wolf shrunk covariance, (1 - a) S + a m I, computed in the N x N dual so that
    nothing D x D is ever formed (D can be far above N). ``size`` (the scale score's model) and
    ``span`` (the span score's bases) are None for runs saved before those scores existed; the
    others then share ``share``.
    """

    mean: np.ndarray  # (D,) embedding mean over the training LoRAs
    scale: np.ndarray  # (D,) their per-dimension std (floored)
    reference: np.ndarray  # (N, D) standardized, centered embeddings of the training LoRAs
    shrinkage: float  # Ledoit-Wolf a
    trace: float  # m: the mean variance, the identity's weight
    log_rms_lo: np.ndarray  # (L,) smallest log RMS of delta W per layer among them
    log_rms_hi: np.ndarray  # (L,) largest
    layer_names: list[str]
    threshold: float = math.inf
    share: float = OOD_SHARE
    size: ScaleModel | None = None
    size_threshold: float = math.inf
    span: Span | None = None
    span_threshold: float = math.inf

    @classmethod
    def fit(cls, inputs: FitInputs, names: list[str]) -> FitCheck:
        """The reference of the training LoRAs' embeddings, update sizes and size model."""
        e = np.asarray(inputs.embed, dtype=np.float64)
        mean, std = e.mean(axis=0), e.std(axis=0)
        scale = np.maximum(std, 1e-2 * max(float(std.mean()), 1e-12))
        x = (e - mean) / scale
        n, p = x.shape
        gram = x @ x.T
        trace = float(np.trace(gram)) / n / p
        fro2 = float((gram * gram).sum()) / n**2  # |S|_F^2
        d2 = (fro2 - 2 * trace * trace * p + trace * trace * p) / p
        b2 = min((float((np.diag(gram) ** 2).sum()) / n - fro2) / n / p, d2)
        a = b2 / d2 if d2 > 0 else 1.0
        r = np.asarray(inputs.log_rms, dtype=np.float64)
        size = ScaleModel.fit(inputs.unit, r) if inputs.unit.shape[1] else None
        return cls(mean, scale, x, float(a), trace, r.min(axis=0), r.max(axis=0), names, size=size)

    def scores(self, embeddings: np.ndarray) -> np.ndarray:
        """(N,) ood_score of embeddings (N, D): sqrt(z' Sigma^-1 z / D), z standardized."""
        z = (np.asarray(embeddings, dtype=np.float64) - self.mean) / self.scale
        x, n = self.reference, len(self.reference)
        c = max(self.shrinkage * self.trace, 1e-12)
        # Woodbury: Sigma^-1 = (I - X' (c n / (1 - a) I + X X')^-1 X) / c
        k = (c * n / max(1.0 - self.shrinkage, 1e-12)) * np.eye(n) + x @ x.T
        xz = x @ z.T
        d2 = ((z * z).sum(axis=1) - (xz * np.linalg.solve(k, xz)).sum(axis=0)) / c
        out = np.sqrt(np.maximum(d2, 0.0) / max(z.shape[1], 1))
        return np.where(np.isfinite(z).all(axis=1), out, np.inf)

    def size_residuals(self, inputs: FitInputs) -> np.ndarray:
        """(N,) signed log of how many times larger each update is than its direction predicts
        (zeros without a size model); the scale_score is its absolute value."""
        if self.size is None:
            return np.zeros(len(inputs))
        res = self.size.residual(inputs.unit, inputs.log_rms)
        return np.where(np.isfinite(res), res, np.inf)

    def shares(self) -> tuple[float, float, float]:
        """The part of ``share`` that the ood, scale and span scores each flag (0 for a score
        the check lacks: runs saved before it existed)."""
        size = self.share / 2 if self.size is not None else 0.0
        span = (self.share - size) / 2 if self.span is not None else 0.0
        return self.share - size - span, size, span

    def calibrate(
        self,
        scores: np.ndarray,
        size_scores: np.ndarray | None = None,
        span_scores: np.ndarray | None = None,
        share: float = OOD_SHARE,
    ) -> None:
        """Set each threshold so that at most its part of ``share`` (:meth:`shares`) of LoRAs
        exchangeable with the held-out scores lie above it (the conformal quantile); with too
        few scores for that, the largest (about 1/(n+1) of them are flagged)."""
        self.share = float(share)
        ood, size, span = self.shares()
        self.threshold = _threshold(scores, ood)
        if self.size is not None and size_scores is not None:
            self.size_threshold = _threshold(size_scores, size)
        if self.span is not None and span_scores is not None:
            self.span_threshold = max(_threshold(span_scores, span), SPAN_FLOOR)

    def sanity(self, log_rms: np.ndarray) -> list[list[str]]:
        """Layer 2: per LoRA, the reasons its per-layer update sizes are off (empty if none)."""
        r = np.asarray(log_rms, dtype=np.float64)
        far = math.log(NORM_FACTOR)
        out = []
        for row in r:
            reasons = []
            if not np.isfinite(row).all():
                bad = [n for n, v in zip(self.layer_names, row) if not np.isfinite(v)]
                reasons.append(f"non-finite update in {_names(bad)}")
            else:
                above = row - self.log_rms_hi
                below = self.log_rms_lo - row
                for side, gap in (("above", above), ("below", below)):
                    hit = gap > far
                    if hit.any():
                        x = math.exp(float(gap[hit].max()))
                        reasons.append(
                            f"its update is {x:.3g}x {side} the training range of update sizes "
                            f"in {int(hit.sum())} of {len(row)} layers "
                            f"({_names([n for n, h in zip(self.layer_names, hit) if h])})"
                        )
            out.append(reasons)
        return out

    def check(self, inputs: FitInputs) -> list[dict[str, Any]]:
        """Per LoRA ``{"in_distribution", "ood_score", "threshold", "reasons"}`` (layers 2+3)."""
        scores = self.scores(inputs.embed)
        sizes = self.size_residuals(inputs)
        rare = [_one_in(a) for a in self.shares()]
        rows = []
        for s, r, sp, reasons in zip(scores, sizes, inputs.span, self.sanity(inputs.log_rms)):
            if s > self.threshold:
                reasons = [
                    *reasons,
                    f"it looks unlike the LoRAs this run trained on: {rare[0]} LoRAs like them "
                    f"looks this different (ood_score {s:.3g} > {self.threshold:.3g})",
                ]
            if abs(r) > self.size_threshold:
                x = math.exp(min(abs(float(r)), 700.0))
                reasons = [
                    *reasons,
                    f"its update is {x:.3g}x {'larger' if r > 0 else 'smaller'} than training "
                    f"LoRAs pointing the same way: {rare[1]} LoRAs like them is this far off "
                    f"(scale_score {abs(r):.3g} > {self.size_threshold:.3g})",
                ]
            if sp > self.span_threshold:
                reasons = [
                    *reasons,
                    f"{100 * sp:.0f}% of its update lies outside the directions the training "
                    f"LoRAs' updates use, as for a LoRA of another base model: {rare[2]} LoRAs "
                    f"like them does (span_score {sp:.3g} > {self.span_threshold:.3g})",
                ]
            rows.append(
                {
                    "in_distribution": not reasons,
                    "ood_score": float(s),
                    "threshold": self.threshold,
                    "reasons": reasons,
                }
            )
        return rows


def _one_in(share: float) -> str:
    """A share of LoRAs in words: "only about 1 in 80" (0.0125)."""
    return f"only about 1 in {round(1 / share)}" if share > 0 else "none of the"


def out_of_fold_scores(
    inputs: FitInputs, groups: np.ndarray, names: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """(ood_score, scale_score) of every LoRA against a fit check fitted on the other groups:
    held-out scores of LoRAs the check's reference contains."""
    ood, size = np.zeros(len(inputs)), np.zeros(len(inputs))
    for g in np.unique(groups):
        m = groups == g
        other = FitCheck.fit(inputs.take(~m), names)
        held = inputs.take(m)
        ood[m] = other.scores(held.embed)
        size[m] = np.abs(other.size_residuals(held))
    return ood, size


def _threshold(scores: np.ndarray, alpha: float) -> float:
    s = np.asarray(scores, dtype=np.float64)
    s = s[np.isfinite(s)]
    q = conformal_quantile(s, 1.0 - alpha)
    return float(s.max()) if math.isinf(q) and len(s) else q


def _names(names: list[str], k: int = 3) -> str:
    return ", ".join(names[:k]) + (f", ... ({len(names) - k} more)" if len(names) > k else "")


__all__ = [
    "NORM_FACTOR",
    "OOD_SHARE",
    "FitCheck",
    "FitInputs",
    "LayoutError",
    "ScaleModel",
    "check_layout",
    "out_of_fold_scores",
]
