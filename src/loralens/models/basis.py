"""Per layer, bases of the output and input directions a set of LoRA updates use, fitted from
the factors (ΔW is never formed), and the projection of a LoRA onto them: U -> P U, V -> R V.

Every model ``train`` makes reads LoRAs through a basis fitted on its training LoRAs:
(P U)(R V)^T is ΔW seen in the directions the training updates use. Inside their span the
projection is an isometry (the inner product of two updates, their norms and singular values
are kept), so a ridge on the projected ΔW is the ridge on the flattened ΔW, exactly, and its
size and cost are set by the training updates and a budget, not by the layer's width: a layer
16 times wider with the same updates gives the same features. It commutes with GL(r)
(P (U R) = (P U) R), so every invariance of a model is kept.

The output basis of a layer holds the leading eigenvectors of sum_i ΔW_i ΔW_i^T over the
training updates (each scaled to unit norm, so every LoRA counts alike), computed from the
stacked factors U_i (V_i^T V_i)^(1/2) in whichever side is smaller, or by a seeded randomized
range finder where both sides are large; the input basis likewise. Directions are kept down to
rounding (``EIG_FLOOR``), as many as ``BASIS_FEATURES`` and ``BASIS_BYTES`` allow.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from loralens.lora import LoRABatch

#: Most projected ΔW entries, sum over layers of k_out * k_in (the linear base's features).
BASIS_FEATURES = 2**18
#: Most bytes of the bases themselves (float32), whatever the width and number of layers.
BASIS_BYTES = 512 * 2**20
#: Eigenvalues below this share of a layer's largest are rounding, not a direction.
EIG_FLOOR = 1e-10
#: Above this many rows and columns, a side's basis comes from a randomized range finder.
EXACT_BELOW = 4096
#: Extra directions and power iterations of the randomized range finder.
OVERSAMPLE, POWER_ITERATIONS = 16, 2


@torch.no_grad()
def side_factors(batches: Iterable[LoRABatch]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, (F_in (in, N r), F_out (out, N r)) in float64: each LoRA's unit-norm update as
    F_in F_in^T = V (U^T U) V^T / |ΔW|^2 (and F_out likewise), its r columns in LoRA order."""
    parts = [[layer_sides(u, v) for u, v in zip(b.U, b.V)] for b in batches]
    return [
        (torch.cat([p[i][0] for p in parts], 1), torch.cat([p[i][1] for p in parts], 1))
        for i in range(len(parts[0]))
    ]


@torch.no_grad()
def layer_sides(u: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(F_in, F_out) of one layer's stacked factors (B, out, r), (B, in, r): see
    :func:`side_factors`."""
    u, v = u.detach().cpu().double(), v.detach().cpu().double()
    gu, gv = u.mT @ u, v.mT @ v
    total = (gu * gv).sum(dim=(1, 2))
    w = torch.where(total > 0, total.clamp(min=1e-300).rsqrt(), 0.0)[:, None, None]
    return _columns(v @ _sqrt_psd(gu) * w), _columns(u @ _sqrt_psd(gv) * w)


def _sqrt_psd(g: torch.Tensor) -> torch.Tensor:
    """Batched symmetric square root of positive semi-definite r x r matrices."""
    lam, q = torch.linalg.eigh(g)
    return (q * lam.clamp(min=0).sqrt()[:, None, :]) @ q.mT


def _columns(f: torch.Tensor) -> torch.Tensor:
    """(N, d, r) -> (d, N r), each LoRA's r columns side by side."""
    return f.permute(1, 0, 2).reshape(f.shape[1], -1)


@torch.no_grad()
def leading_directions(
    f: torch.Tensor, max_rank: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(directions (k, d) orthonormal rows, eigenvalues (k,) descending) of f f^T for the
    stacked side factors ``f`` (d, m): at most ``max_rank``, none below ``EIG_FLOOR`` of the
    largest. Each direction's sign makes its largest coefficient on f's columns positive (a
    rule that a rotation of the d-space, such as embedding the layer in a wider one, keeps)."""
    d, m = f.shape
    if min(d, m) <= EXACT_BELOW or max_rank + OVERSAMPLE >= min(d, m):
        if d <= m:
            lam, p = torch.linalg.eigh(f @ f.mT)
        else:
            lam, e = torch.linalg.eigh(f.mT @ f)
            p = f @ e / lam.clamp(min=1e-300).sqrt()
        lam, p = lam.flip(0), p.flip(1)
    else:
        lam, p = _randomized(f, max_rank + OVERSAMPLE, seed)
    keep = int((lam > EIG_FLOOR * lam[:1].clamp(min=1e-300)).sum()) if len(lam) else 0
    keep = min(keep, max_rank)
    lam, p = lam[:keep], p[:, :keep]
    coef = f.mT @ p  # (m, k): each direction on the stacked columns
    at = coef.abs().argmax(dim=0)
    sign = torch.sign(coef[at, torch.arange(keep)])
    return (p * torch.where(sign == 0, 1.0, sign)).mT.contiguous(), lam


def _randomized(f: torch.Tensor, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs of f f^T in the range of (f f^T)^q f f^T Omega, Omega seeded Gaussian."""
    g = torch.Generator().manual_seed(seed)
    y = f @ (f.mT @ torch.randn(f.shape[0], width, generator=g, dtype=f.dtype))
    for _ in range(POWER_ITERATIONS):
        y = f @ (f.mT @ torch.linalg.qr(y).Q)
    q = torch.linalg.qr(y).Q
    small = q.mT @ f
    lam, e = torch.linalg.eigh(small @ small.mT)
    return lam.flip(0), q @ e.flip(1)


def side_limit(shapes: Sequence[tuple[int, int]], available: Sequence[tuple[int, int]]) -> int:
    """The largest number k of directions per layer and side such that the projected layers
    (min(k, available) on each side) stay within ``BASIS_FEATURES`` entries and the bases
    within ``BASIS_BYTES``."""

    def cost(k: int) -> tuple[int, int]:
        sides = [(min(k, a), min(k, b)) for a, b in available]
        feats = sum(a * b for a, b in sides)
        size = 4 * sum(a * o + b * i for (a, b), (o, i) in zip(sides, shapes))
        return feats, size

    lo, hi = 1, max(max(a, b) for a, b in available)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        feats, size = cost(mid)
        if feats <= BASIS_FEATURES and size <= BASIS_BYTES:
            lo = mid
        else:
            hi = mid - 1
    return lo


class UpdateBasis(nn.Module):
    """Per layer, ``out_k`` (k_out, out) and ``in_k`` (k_in, in) orthonormal rows, and the
    share of the fitted updates' energy each side keeps (``kept``, L x 2)."""

    def __init__(
        self,
        shapes: Sequence[tuple[int, int]],
        sizes: Sequence[tuple[int, int]],
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.shapes = [(int(o), int(i)) for o, i in shapes]
        self.sizes = [(int(a), int(b)) for a, b in sizes]
        for k, ((o, i), (a, b)) in enumerate(zip(self.shapes, self.sizes)):
            self.register_buffer(f"out_{k}", torch.zeros(a, o, dtype=dtype))
            self.register_buffer(f"in_{k}", torch.zeros(b, i, dtype=dtype))
        self.register_buffer("kept", torch.zeros(len(self.shapes), 2, dtype=torch.float64))

    @staticmethod
    def flat(sizes: Sequence[tuple[int, int]]) -> list[int]:
        """``sizes`` as the flat list a model's hyperparameters hold."""
        return [int(x) for pair in sizes for x in pair]

    @staticmethod
    def pairs(flat: Sequence[int]) -> list[tuple[int, int]]:
        """The (k_out, k_in) per layer of a flat list (:meth:`flat`)."""
        return [(int(flat[j]), int(flat[j + 1])) for j in range(0, len(flat), 2)]

    @classmethod
    @torch.no_grad()
    def fit(cls, batch: LoRABatch, seed: int = 0) -> UpdateBasis:
        """The bases of the updates of ``batch`` (the training LoRAs, or a sample of them), in
        the batch's dtype (float32 from a store)."""
        shapes = batch.shapes
        columns = [int(u.shape[0]) * int(u.shape[2]) for u in batch.U]
        available = [(min(o, m), min(i, m)) for (o, i), m in zip(shapes, columns)]
        limit = side_limit(shapes, available)
        outs, ins, kept = [], [], []
        for k, (u, v) in enumerate(zip(batch.U, batch.V)):  # one layer's float64 sides at a time
            per_side = []
            for f in reversed(layer_sides(u, v)):  # (F_out, F_in)
                rows, lam = leading_directions(f, limit, seed + k)
                if len(rows) == 0:  # a layer no update touches: one axis, so shapes stay valid
                    rows = torch.eye(1, f.shape[0], dtype=f.dtype)
                total = float((f * f).sum())
                per_side.append((rows, float(lam.sum()) / total if total > 0 else 1.0))
            (p, kept_out), (r, kept_in) = per_side
            outs.append(p)
            ins.append(r)
            kept.append((min(kept_out, 1.0), min(kept_in, 1.0)))
        basis = cls(shapes, [(len(p), len(r)) for p, r in zip(outs, ins)], batch.dtype)
        for k, (p, r) in enumerate(zip(outs, ins)):
            getattr(basis, f"out_{k}").copy_(p)
            getattr(basis, f"in_{k}").copy_(r)
        basis.kept.copy_(torch.tensor(kept, dtype=torch.float64))
        return basis

    def project(self, batch: LoRABatch) -> LoRABatch:
        """``batch`` with every layer's factors on the bases: (P U, R V), rank-major like the
        store's, same ranks."""
        us, vs = [], []
        for k, (u, v) in enumerate(zip(batch.U, batch.V)):
            p = getattr(self, f"out_{k}").to(u.dtype)
            r = getattr(self, f"in_{k}").to(v.dtype)
            us.append((u.mT @ p.mT).mT)  # (B, r, k) in memory: rank-major
            vs.append((v.mT @ r.mT).mT)
        return LoRABatch(names=list(batch.names), U=us, V=vs, ranks=batch.ranks)

    def energy(self) -> float:
        """The share of the fitted updates' energy the bases keep, over layers and both sides."""
        return float(self.kept.prod(dim=1).mean()) if len(self.kept) else 1.0

    def extra_repr(self) -> str:
        feats = sum(a * b for a, b in self.sizes)
        return f"layers={len(self.sizes)}, features={feats}, energy={self.energy():.4f}"


def bases_bytes(basis: UpdateBasis) -> int:
    """Bytes of a basis's directions (float32)."""
    return 4 * sum(a * o + b * i for (a, b), (o, i) in zip(basis.sizes, basis.shapes))


__all__ = [
    "BASIS_BYTES",
    "BASIS_FEATURES",
    "EIG_FLOOR",
    "UpdateBasis",
    "bases_bytes",
    "leading_directions",
    "side_factors",
    "side_limit",
]
