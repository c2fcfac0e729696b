"""Featurizers of LoRA batches (batched torch, CPU and CUDA, float32/bfloat16/float64).

| featurizer | output | GL(r)-inv. | O(r)-inv. | cost per layer |
|---|---|---|---|---|
| :func:`flatten` | U, V padded/truncated to fixed ranks | no | no | O((m+n)r) |
| :func:`oalign` | U Q, V Q, Q from Procrustes to a template | no | yes | O((m+n)r^2) |
| :func:`svals` | singular values of U V^T (never formed) | yes | yes | O((m+n)r^2) |
| :func:`dense` | U V^T | yes | yes | O(mnr) |
| :func:`spectral_stats` | per-layer singular values, norms, entropy, kurtosis | yes | yes | O((m+n)r^2) |

Linear algebra (QR, SVD) runs in float32 at least (float64 for float64 input) and results are
cast back to the input dtype, so bfloat16 batches work.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from loralens.fused import grams, linalg_dtype
from loralens.lora import (
    LoRA,
    LoRABatch,
    LoRALayer,
    all_finite,
    collate,
    factor_gram,
    overflowing_norm,
    row_blocks,
)

__all__ = [
    "NUMERICAL_RANK_TOL",
    "delta_norms",
    "dense",
    "describe_layer",
    "describe_layers",
    "effective_rank",
    "flatten",
    "gram_condition",
    "layer_svals",
    "oalign",
    "pad_rank",
    "pick_template",
    "spectral_stats",
    "svals",
    "template_factors",
]


def pad_rank(t: torch.Tensor, r: int) -> torch.Tensor:
    """Zero-pad or truncate the last (rank) axis of ``t`` to width ``r``."""
    cur = t.shape[-1]
    if cur == r:
        return t
    if cur > r:
        return t[..., :r]
    return torch.nn.functional.pad(t, (0, r - cur))


def _widths(batch: LoRABatch, ranks: int | Sequence[int] | None) -> list[int]:
    if ranks is None:
        return [int(u.shape[2]) for u in batch.U]
    if isinstance(ranks, int):
        return [ranks] * batch.num_layers
    ranks = [int(r) for r in ranks]
    if len(ranks) != batch.num_layers:
        raise ValueError(f"got {len(ranks)} rank widths for {batch.num_layers} layers")
    return ranks


def flatten(batch: LoRABatch, ranks: int | Sequence[int] | None = None) -> torch.Tensor:
    """(B, sum_i (out_i + in_i) * r_i): every U_i and V_i, rank axis padded/truncated to ``ranks``,
    each factor rank-major (column by column: U_i^T row by row, the order factors are stored in).

    ``ranks`` is one width for all layers or one per layer (default: the batch's own widths).
    Fixed widths let a model trained on rank 4 take rank 8 (extra columns are dropped) or rank 2
    (zero-padded).
    """
    widths = _widths(batch, ranks)
    parts = []
    for u, v, r in zip(batch.U, batch.V, widths):
        parts.append(pad_rank(u, r).mT.flatten(1))
        parts.append(pad_rank(v, r).mT.flatten(1))
    return torch.cat(parts, dim=1)


def dense(batch: LoRABatch) -> list[torch.Tensor]:
    """Per layer, the (B, out, in) stack of delta W = U @ V.T."""
    return batch.delta_weights()


def _grams(batch: LoRABatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L, R, R) float64 stacks of U_i^T U_i and V_i^T V_i, zero-padded to the widest rank R.

    One pass over each factor (:func:`loralens.fused.grams`); all later r x r work is batched
    over layers, so wide, deep LoRAs pay per layer only for reading their factors.
    """
    return grams(batch.U), grams(batch.V)


def delta_norms(batch: LoRABatch) -> torch.Tensor:
    """(B, L) Frobenius norms of every delta W, from the small factors: tr((U^T U)(V^T V))^1/2.

    Computed in float32 at least; never forms U @ V.T.
    """
    return norms_from_grams(*_grams(batch)).to(linalg_dtype(batch.dtype))


def norms_from_grams(gu: torch.Tensor, gv: torch.Tensor) -> torch.Tensor:
    """|U V^T|_F = tr((U^T U)(V^T V))^1/2 from stacked Grams."""
    return (gu * gv).sum(dim=(-1, -2)).clamp_min(0).sqrt()


#: A layer of a LoRA takes the Gram route in :func:`svals` when both factors' condition numbers
#: are at most this. The Gram route's relative error grows as eps * kappa^2 (float32, 12288-wide
#: factors: 4e-6 at kappa 1, 8e-5 at 10), QR's as eps * kappa; trained LoRAs sit at kappa 1.5-5.
GRAM_MAX_COND = 8.0


def _qr_svals(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(B, min(out, in, r)) singular values of U V^T from R_U R_V^T (U = Q_U R_U, V = Q_V R_V)."""
    ru = torch.linalg.qr(u, mode="r").R  # (B, min(n, r), r)
    rv = torch.linalg.qr(v, mode="r").R  # (B, min(m, r), r)
    return torch.linalg.svdvals(ru @ rv.transpose(1, 2))


def _gram_svals(
    gu: torch.Tensor, gv: torch.Tensor, rank: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Descending singular values of U V^T from the Grams (..., R, R), and the larger condition
    number of U and V over their ``rank`` (...) true columns (the rest is zero padding)."""
    lu, qu = torch.linalg.eigh(gu)  # ascending
    lv = torch.linalg.eigvalsh(gv)
    half = (qu * lu.clamp_min(0).sqrt()[..., None, :]) @ qu.mT  # (U^T U)^(1/2)
    s2 = torch.linalg.eigvalsh(half @ gv @ half)
    return s2.clamp_min(0).sqrt().flip(-1), torch.maximum(
        gram_condition(lu, rank), gram_condition(lv, rank)
    )


def gram_condition(lam: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """Condition number of a factor from its Gram's ascending eigenvalues (..., R), over its
    ``rank`` (...) true columns (the rest is zero padding)."""
    R = lam.shape[-1]
    low = (R - rank.to(lam.device).long()).clamp(0, R - 1)[..., None]
    small = lam.gather(-1, low)[..., 0].clamp_min(0)
    return (lam[..., -1].clamp_min(0) / small).sqrt().nan_to_num(nan=1.0, posinf=math.inf)


def svals(batch: LoRABatch, k: int | None = None) -> torch.Tensor:
    """(B, L, k) top-k singular values of every delta W, descending, zero-padded past the rank.

    U V^T is never formed: its singular values are those of an r x r problem, O((m+n) r^2).
    From the Grams U^T U and V^T V where both factors are well conditioned (``GRAM_MAX_COND``:
    one GEMM pass per factor), else from QR of U and V (slower, accurate at any conditioning),
    chosen per LoRA and layer. ``k`` defaults to the largest rank in the batch.
    """
    return svals_and_norms(batch, k)[0]


def svals_and_norms(batch: LoRABatch, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`svals` and :func:`delta_norms` from one pass over the factors, once per batch and
    ``k`` (``LoRABatch.derived``; copies are returned, so a caller may change its own)."""
    if k is None:
        k = max(int(u.shape[2]) for u in batch.U)
    s, norms = batch.derived(("svals_and_norms", k), lambda: _svals_and_norms(batch, k))
    return s.clone(), norms.clone()


def _svals_and_norms(batch: LoRABatch, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = linalg_dtype(batch.dtype)
    gu, gv = _grams(batch)
    norms = norms_from_grams(gu, gv).to(w)
    s, cond = _gram_svals(gu, gv, batch.ranks)
    s = s.to(w)
    cols = []
    bad = (cond > GRAM_MAX_COND).any(dim=0).tolist()
    for i, (u, v) in enumerate(zip(batch.U, batch.V)):
        col = s[:, i, : min(u.shape[1], v.shape[1], u.shape[2])]
        if bad[i]:
            rows = cond[:, i] > GRAM_MAX_COND
            col = col.clone()
            col[rows] = _qr_svals(u[rows].to(w), v[rows].to(w))
        cols.append(pad_rank(col, k))
    return torch.stack(cols, dim=1).to(batch.dtype), norms


def effective_rank(s: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Roy & Vetterli's effective rank exp(H(p)), p = s / sum(s), along the last axis (0 if s = 0)."""
    s = s.double()
    total = s.sum(dim=-1, keepdim=True)
    p = s / total.clamp_min(eps)
    h = -(p * torch.log(p.clamp_min(eps))).sum(dim=-1)
    return torch.where(total.squeeze(-1) > 0, torch.exp(h), torch.zeros_like(h))


#: The statistics :func:`spectral_stats` gives per layer, after the singular values.
SPECTRAL_STATS = ("fro", "spectral", "nuclear", "stable_rank", "top_share", "entropy", "kurtosis")


def spectral_stats(batch: LoRABatch, k: int | None = None) -> torch.Tensor:
    """(B, L, k + 7) per-layer spectral statistics of delta W (the baseline of weight-space
    backdoor detectors): the top ``k`` singular values (default: the widest rank), then
    :data:`SPECTRAL_STATS`: Frobenius, spectral and nuclear norms, stable rank |W|_F^2 / s_1^2,
    the top direction's share of the energy s_1^2 / sum s^2, the entropy of p = s^2 / sum s^2,
    and the kurtosis of the singular values (zero-padded ones included)."""
    s, fro = svals_and_norms(batch, k)
    s = s.double()
    energy = (s**2).sum(-1)
    top = s[..., 0]
    p = s**2 / energy.clamp_min(1e-30).unsqueeze(-1)
    entropy = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)
    centred = s - s.mean(-1, keepdim=True)
    var = (centred**2).mean(-1)
    kurt = (centred**4).mean(-1) / var.clamp_min(1e-30) ** 2
    stats = [
        fro.double(),
        top,
        s.sum(-1),
        energy / (top**2).clamp_min(1e-30),
        top**2 / energy.clamp_min(1e-30),
        entropy,
        torch.where(var > 0, kurt, torch.zeros_like(kurt)),
    ]
    return torch.cat([s, torch.stack(stats, -1)], -1).to(linalg_dtype(batch.dtype))


# ---------------------------------------------------------------------------- O-align


def template_factors(
    template: LoRA | LoRABatch,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(U list, V list) of one template LoRA, each (out, r) / (in, r), padding removed."""
    if isinstance(template, LoRABatch):
        if len(template) != 1:
            raise ValueError(f"a template is one LoRA; got a batch of {len(template)}")
        template = template.unbatch()[0]
    if not isinstance(template, LoRA):
        raise TypeError(f"template must be a LoRA, got {type(template).__name__}")
    return [la.U for la in template.layers], [la.V for la in template.layers]


def oalign(
    batch: LoRABatch,
    template: LoRA | LoRABatch | tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]],
    *,
    eps: float = 1e-12,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Align every layer to a template LoRA by orthogonal Procrustes; O(r)-invariant.

    Per layer, with template factors (U_t, V_t) of rank r_t, Q (r x r_t, orthonormal rows or
    columns) maximizes tr(Q^T M), M = U^T U_t / (|U| |U_t|) + V^T V_t / (|V| |V_t|) (norms
    balance the two factors and are O(r)-invariant): Q = W Z^T from the SVD M = W S Z^T.
    Returns (U Q list, V Q list), each (B, out, r_t) / (B, in, r_t): the template's width, so a
    model sees fixed widths for any input rank. Replacing (U, V) by (U O, V O), O orthogonal,
    changes M to O^T M and Q to O^T Q, so U Q is unchanged (exactly when M has full rank, which
    holds for generic inputs). Zero padding gives zero rows of M and changes nothing.
    """
    if isinstance(template, (LoRA, LoRABatch)):
        tU, tV = template_factors(template)
    else:
        tU, tV = list(template[0]), list(template[1])
    if len(tU) != batch.num_layers:
        raise ValueError(f"template has {len(tU)} layers, batch has {batch.num_layers}")
    outU, outV = [], []
    for u, v, ut, vt in zip(batch.U, batch.V, tU, tV):
        w = linalg_dtype(u.dtype)
        uu, vv = u.to(w), v.to(w)
        ut = ut.to(device=u.device, dtype=w)
        vt = vt.to(device=u.device, dtype=w)
        nu = torch.linalg.vector_norm(uu, dim=(1, 2)).clamp_min(eps)[:, None, None]
        nv = torch.linalg.vector_norm(vv, dim=(1, 2)).clamp_min(eps)[:, None, None]
        m = uu.transpose(1, 2) @ ut / (nu * ut.norm().clamp_min(eps))
        m = m + vv.transpose(1, 2) @ vt / (nv * vt.norm().clamp_min(eps))
        W, _, Zh = torch.linalg.svd(m, full_matrices=False)
        q = W @ Zh  # (B, r, r_t)
        # Q^T U^T keeps the output rank-major like the input (free to flatten column by column).
        outU.append((q.mT @ uu.mT).mT.to(u.dtype))
        outV.append((q.mT @ vv.mT).mT.to(v.dtype))
    return outU, outV


def pick_template(data: LoRABatch | Sequence[LoRA]) -> LoRA:
    """Choose an O-align template from training data: the full-rank LoRA of median size.

    "Size" is sum_i |delta W_i|_F (GL-invariant). Only LoRAs whose rank is the batch's widest on
    every layer are candidates (a template of full width aligns every input), and among them
    LoRAs with a zero delta W layer are skipped when possible. Deterministic.
    """
    batch = data if isinstance(data, LoRABatch) else collate(list(data))
    widths = torch.tensor([int(u.shape[2]) for u in batch.U])
    full = (batch.ranks.cpu() == widths).all(dim=1)
    norms = delta_norms(batch).double().cpu()
    nonzero = (norms > 0).all(dim=1)
    cand = torch.nonzero(full & nonzero).flatten()
    if cand.numel() == 0:
        cand = torch.nonzero(full).flatten()
    if cand.numel() == 0:
        cand = torch.arange(len(batch))
    size = norms.sum(dim=1)[cand]
    order = torch.argsort(size, stable=True)
    idx = int(cand[order[(len(order) - 1) // 2]])
    return batch.select([idx]).unbatch()[0]


# ---------------------------------------------------------------------------- inspect


#: singular values at or below this fraction of a layer's largest do not count toward its
#: numerical rank (``describe_layers``' ``numerical_rank``)
NUMERICAL_RANK_TOL = 1e-3


def describe_layer(layer: LoRALayer, k: int = 4) -> dict[str, Any]:
    """One layer's ``inspect`` row: name, shape, rank, scale (from layer.meta), |delta W|_F, top-k
    singular values, effective rank, numerical rank (singular values above NUMERICAL_RANK_TOL of
    the largest), whether the factors are finite (and their squares fit float32). Everything from the small factors, a block of
    rows at a time (:func:`layer_svals`): no U @ V.T, and no copy of a factor, is formed. A layer
    with NaN/inf factors, or too large to square, gets a NaN norm, no singular values and no numerical rank."""
    finite = all_finite(layer.U) and all_finite(layer.V) and not overflowing_norm(layer.U, layer.V)
    norm, s = math.nan, torch.zeros(0)
    if finite:
        s, fro = layer_svals(layer.U, layer.V)
        norm = float(fro)
    er = float(effective_rank(s)) if s.numel() else (0.0 if finite else math.nan)
    nr = int((s > NUMERICAL_RANK_TOL * s[0]).sum()) if s.numel() and s[0] > 0 else 0
    scale = layer.meta.get("scale")
    return {
        "name": layer.name,
        "shape": [layer.out_features, layer.in_features],
        "rank": layer.rank,
        "scale": None if scale is None else float(scale),
        "kind": layer.meta.get("kind", "linear"),
        "fro_norm": norm,
        "top_svals": [float(x) for x in s[:k]],
        "effective_rank": er if math.isfinite(er) else None,
        "numerical_rank": nr if finite else None,
        "finite": finite,
    }


def describe_layers(lora: LoRA, k: int = 4) -> list[dict[str, Any]]:
    """:func:`describe_layer` of every layer of ``lora``."""
    return [describe_layer(layer, k) for layer in lora.layers]


def layer_svals(U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the min(out, in, r) singular values of U V^T, descending; |U V^T|_F) of one layer's
    factors, in the factors' linear-algebra dtype: :func:`svals_and_norms`' Gram route (QR where
    a factor's condition number passes ``GRAM_MAX_COND``), with the Grams and QR's R factors
    summed over blocks of rows in float64, so memory beyond the factors stays fixed."""
    rank = U.shape[1]
    gu, gv = factor_gram(U), factor_gram(V)
    norm = norms_from_grams(gu, gv)
    s, cond = _gram_svals(gu, gv, torch.tensor(rank))
    if cond > GRAM_MAX_COND:
        s = torch.linalg.svdvals(_r_factor(U) @ _r_factor(V).T)
    w = linalg_dtype(U.dtype)
    return s[: min(U.shape[0], V.shape[0], rank)].to(w), norm.to(w)


def _r_factor(f: torch.Tensor) -> torch.Tensor:
    """R of f = Q R (at most r x r, float64), a block of rows at a time: R of [R; next block]."""
    r = torch.zeros(0, f.shape[1], dtype=torch.float64, device=f.device)
    for block in row_blocks(f, torch.float64):
        r = torch.linalg.qr(torch.cat([r, block]), mode="r").R
    return r
