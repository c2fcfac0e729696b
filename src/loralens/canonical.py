"""The canonical form of a LoRA layer (W2T): delta W = sum_k s_k l_k r_k^T from the factors.

Per layer, U = Q_U R_U and V = Q_V R_V; the small core R_U R_V^T = A S B^T; then the left
vectors are Q_U A, the right vectors Q_V B and the singular values S: the SVD of U V^T without
forming it, O((out + in) r^2). (U R, V R^-T) gives the same core up to the orthogonal Q's, so
the form is GL(r)-invariant wherever the SVD is unique. Where both factors are well conditioned
the Q's come from the Grams (Q_U = U (U^T U)^-1/2, one GEMM pass, as in ``features.svals``),
else from Householder QR, chosen per LoRA and layer.

What canonicalization cannot fix, and how it is handled:

- sign: (l_k, r_k) and (-l_k, -r_k) give the same delta W; the entry of l_k of largest magnitude
  is made positive (ambiguous only when two entries tie in magnitude: measure zero);
- ties between singular values: the vectors of a repeated s_k are any basis of their subspace,
  so the form (not delta W) depends on the input's basis there (measure zero; no crash);
- zero components (rank padding, or a rank-deficient layer): their vectors are arbitrary, so
  they are masked (``mask`` False), never used as data.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from loralens.features import GRAM_MAX_COND, gram_condition, pad_rank
from loralens.fused import grams, linalg_dtype
from loralens.lora import LoRABatch

#: A component whose singular value is at most this times the layer's largest counts as zero
#: (its vectors are noise) and is masked.
NULL_SVAL = 1e-6


class Canonical(NamedTuple):
    """One layer's canonical form for a batch: ``left`` (B, out, K), ``s`` (B, K) descending,
    ``right`` (B, in, K), ``mask`` (B, K) True for the components that carry data; K = the
    layer's rank width in the batch. Computed in float32 at least."""

    left: torch.Tensor
    s: torch.Tensor
    right: torch.Tensor
    mask: torch.Tensor


def _half_and_pinv(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """G^(1/2) and its pseudo-inverse for symmetric PSD stacks G (zero padding -> zero rows)."""
    lam, q = torch.linalg.eigh(g)
    lam = lam.clamp_min(0)
    keep = lam > lam[..., -1:] * 1e-12
    root = lam.sqrt()
    inv = torch.where(keep, 1 / root.where(keep, torch.ones_like(root)), torch.zeros_like(root))
    return (q * root[..., None, :]) @ q.mT, (q * inv[..., None, :]) @ q.mT


def _gram_route(
    u: torch.Tensor, v: torch.Tensor, gu: torch.Tensor, gv: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left vectors, singular values, right vectors with Q = F (F^T F)^+1/2 from the Grams."""
    hu, pu = _half_and_pinv(gu)
    hv, pv = _half_and_pinv(gv)
    a, s, bh = torch.linalg.svd(hu @ hv)
    return u @ (pu @ a).to(u.dtype), s.to(u.dtype), v @ (pv @ bh.mT).to(v.dtype)


def _qr_route(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same from Householder QR of U and V (accurate at any conditioning), padded to r."""
    qu, ru = torch.linalg.qr(u)
    qv, rv = torch.linalg.qr(v)
    a, s, bh = torch.linalg.svd(ru @ rv.mT, full_matrices=False)
    r = u.shape[2]
    return pad_rank(qu @ a, r), pad_rank(s, r), pad_rank(qv @ bh.mT, r)


def _fix_signs(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each pair (l_k, r_k) so that the largest-magnitude entry of l_k is positive."""
    peak = left.gather(1, left.abs().argmax(dim=1, keepdim=True))  # (B, 1, K)
    sign = torch.where(peak < 0, -1.0, 1.0).to(left.dtype)
    return left * sign, right * sign


def canonical_form(batch: LoRABatch) -> list[Canonical]:
    """Per layer, the canonical form of every LoRA in ``batch`` (see the module docstring).

    Exact for any rank and mixed ranks: components past a LoRA's own rank (zero padding) and
    components with a zero singular value are masked. No gradient flows through it.
    """
    w = linalg_dtype(batch.dtype)
    with torch.no_grad():
        gu, gv = grams(batch.U), grams(batch.V)  # (B, L, R, R)
        lu, lv = torch.linalg.eigvalsh(gu), torch.linalg.eigvalsh(gv)
        cond = torch.maximum(gram_condition(lu, batch.ranks), gram_condition(lv, batch.ranks))
        bad = (cond > GRAM_MAX_COND).any(dim=0).tolist()
        out = []
        for i, (u, v) in enumerate(zip(batch.U, batch.V)):
            u, v = u.to(w), v.to(w)
            r = u.shape[2]
            left, s, right = _gram_route(u, v, gu[:, i, :r, :r], gv[:, i, :r, :r])
            if bad[i]:
                rows = cond[:, i] > GRAM_MAX_COND
                left, s, right = left.clone(), s.clone(), right.clone()
                left[rows], s[rows], right[rows] = _qr_route(u[rows], v[rows])
            left, right = _fix_signs(left, right)
            k = torch.arange(r, device=u.device)
            mask = (k < batch.ranks[:, i, None].to(u.device)) & (s > NULL_SVAL * s[:, :1])
            m = mask.to(w)
            out.append(Canonical(left * m[:, None], s * m, right * m[:, None], mask))
    return out
