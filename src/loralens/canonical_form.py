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

import hashlib
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


def _gram_maps(gu: torch.Tensor, gv: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """For stacked Grams (..., R, R): the maps P_U, P_V with left vectors U P_U and right
    vectors V P_V (Q = F (F^T F)^+1/2 times the core's singular vectors), and the values."""
    hu, pu = _half_and_pinv(gu)
    hv, pv = _half_and_pinv(gv)
    a, s, bh = torch.linalg.svd(hu @ hv)
    return pu @ a, s, pv @ bh.mT


def _qr_route(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same from Householder QR of U and V (accurate at any conditioning), padded to r."""
    qu, ru = torch.linalg.qr(u)
    qv, rv = torch.linalg.qr(v)
    a, s, bh = torch.linalg.svd(ru @ rv.mT, full_matrices=False)
    r = u.shape[2]
    return pad_rank(qu @ a, r), pad_rank(s, r), pad_rank(qv @ bh.mT, r)


def _signs(left: torch.Tensor) -> torch.Tensor:
    """(B, K) signs making the largest-magnitude entry of each left vector positive (one
    min/max pass over the vectors, which are contiguous in the rank-major layout)."""
    lo, hi = torch.aminmax(left.mT, dim=2)
    return torch.where(hi >= -lo, 1.0, -1.0).to(left.dtype)


def canonical_form(batch: LoRABatch) -> list[Canonical]:
    """Per layer, the canonical form of every LoRA in ``batch`` (see the module docstring).

    Exact for any rank and mixed ranks: components past a LoRA's own rank (zero padding) and
    components with a zero singular value are masked. No gradient flows through it.
    """
    w = linalg_dtype(batch.dtype)
    with torch.no_grad():
        gu, gv = grams(batch.U), grams(batch.V)  # (B, L, R, R), every layer's r x r work at once
        lu, lv = torch.linalg.eigvalsh(gu), torch.linalg.eigvalsh(gv)
        cond = torch.maximum(gram_condition(lu, batch.ranks), gram_condition(lv, batch.ranks))
        bad = (cond > GRAM_MAX_COND).any(dim=0).tolist()
        pu, s_all, pv = _gram_maps(gu, gv)
        out = []
        for i, (u, v) in enumerate(zip(batch.U, batch.V)):
            u, v = u.to(w), v.to(w)
            r = u.shape[2]
            # P^T U^T: factors are stored rank-major, so this is the cheap product
            left = (pu[:, i, :r, :r].to(w).mT @ u.mT).mT
            s = s_all[:, i, :r].to(w)
            rows = cond[:, i] > GRAM_MAX_COND if bad[i] else None
            if rows is not None:
                left[rows], s[rows], qr_right = _qr_route(u[rows], v[rows])
            k = torch.arange(r, device=u.device)
            mask = (k < batch.ranks[:, i, None].to(u.device)) & (s > NULL_SVAL * s[:, :1])
            keep = _signs(left) * mask.to(w)  # (B, K): the sign rule and the mask in one
            left.mul_(keep[:, None])
            right = ((pv[:, i, :r, :r].to(w) * keep[:, None]).mT @ v.mT).mT
            if rows is not None:
                right[rows] = qr_right * keep[rows, None]
            out.append(Canonical(left, s * mask.to(w), right, mask))
    return out


class CanonicalCache:
    """:func:`canonical_form` that computes each LoRA's form once and then reuses it.

    A training run sees the same LoRAs every epoch (shuffled into other batches) and at every
    validation; the form is a deterministic function of the factors, so it is kept per LoRA,
    keyed by a hash of the LoRA's content (factor bytes, true ranks) and of the batch's layout
    (shapes, padded widths, dtype, device): a key can never name another row, and a LoRA in any
    batch, order or padding gets its own form. Forms past ``max_bytes`` in all are computed,
    not kept. A batch's form is the same as :func:`canonical_form`'s up to float rounding.
    """

    def __init__(self, max_bytes: int = 1 << 30):
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self._forms: dict[bytes, list[Canonical]] = {}

    def __len__(self) -> int:
        return len(self._forms)

    def __call__(self, batch: LoRABatch) -> list[Canonical]:
        if len(batch) == 0:
            return canonical_form(batch)
        keys = _content_keys(batch)
        first: dict[bytes, int] = {}  # each LoRA not yet kept -> its first row in the batch
        for b, key in enumerate(keys):
            if key not in self._forms:
                first.setdefault(key, b)
        new: dict[bytes, list[Canonical]] = {}
        if first:
            form = canonical_form(batch.select(list(first.values())))
            for j, key in enumerate(first):
                new[key] = [Canonical(*(t[j] for t in c)) for c in form]
                size = sum(t.nbytes for c in new[key] for t in c)
                if self.nbytes + size <= self.max_bytes:
                    self._forms[key] = new[key]
                    self.nbytes += size
        per_lora = [new[k] if k in new else self._forms[k] for k in keys]
        # stacked along the rank-major layout the form is computed in (left.mT contiguous)
        return [
            Canonical(
                torch.stack([f[i].left.mT for f in per_lora]).mT,
                torch.stack([f[i].s for f in per_lora]),
                torch.stack([f[i].right.mT for f in per_lora]).mT,
                torch.stack([f[i].mask for f in per_lora]),
            )
            for i in range(batch.num_layers)
        ]


def _content_keys(batch: LoRABatch) -> list[bytes]:
    """One digest per LoRA of its factor bytes and true ranks, prefixed by the batch layout."""
    layout = repr((batch.shapes, [int(u.shape[2]) for u in batch.U], batch.dtype, batch.device))
    hashes = [hashlib.blake2b(layout.encode(), digest_size=20) for _ in range(len(batch))]
    ranks = batch.ranks.to(device="cpu", dtype=torch.int64).contiguous().numpy()
    for h, r in zip(hashes, ranks):
        h.update(r)
    for factors in (batch.U, batch.V):
        for f in factors:
            # rank-major bytes: a copy-free view in the layout collate and the store use
            arr = f.detach().mT.contiguous().cpu().view(torch.uint8).numpy()
            for h, a in zip(hashes, arr):
                h.update(a)
    return [h.digest() for h in hashes]
