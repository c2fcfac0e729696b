"""LyCORIS layers read exactly as low rank U V^T, forming delta W only where it is the smaller.

- **LoCon with a Tucker core** (``lora_down`` r x in x 1..., ``lora_mid`` r x r x kernel,
  ``lora_up`` out x r x 1...): delta W[p, q, k] = sum_ij up[p, i] mid[i, j, k] down[j, q], so
  U = up and V[(q, k), i] = sum_j mid[i, j, k] down[j, q]: rank r.
- **LoHa** (``hada_w1_a/b``, ``hada_w2_a/b``, optional Tucker cores ``hada_t1/t2``):
  delta W = (U1 V1^T) * (U2 V2^T) elementwise = (U1 . U2)(V1 . V2)^T, with ``.`` the row-wise
  Khatri-Rao (face-splitting) product: rank r1 r2.
- **LoKr** (``lokr_w1`` or ``lokr_w1_a/b``; ``lokr_w2`` or ``lokr_w2_a/b``, optional Tucker core
  ``lokr_t2``): delta W = kron(W1, W2) = kron(P1, P2) kron(Q1, Q2)^T from each half's factors
  W = P Q^T. A half stored full is factored by SVD at its rank (to float32 precision; exactly,
  as itself times an identity, where it has full rank), and ``meta["lokr_full"]`` says so (its
  shape, rank and largest dropped singular value).

Exact reduction: where a layer's exact factors would be wider than delta W can be (LoHa with
r1 r2 > min(out, in); a LoKr half factored at a rank above its own smaller side), delta W (or
that half) is smaller than the factors, so it is formed in float64 and written as itself times
an identity (rank min(out, in)): exact, never refused. ``meta["exact_reduction"]`` records the
factors' rank and the rank read.

Scales follow LyCORIS: alpha / r with r the factors' inner size (alpha 0 or missing: scale 1); a
LoKr with both halves full has scale 1 (the format's scale rule is called with rank None).
``meta["lycoris"]`` names the algorithm. A file whose exact factors would pass
:data:`MAX_EXPANDED_ELEMENTS` is refused, as is a full LoKr half too large to factor (both
sides over :data:`MAX_SVD_SIDE`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from loralens.formats.module import ModuleReader, ScaleFn, finish_layer
from loralens.lora import LoRALayer

if TYPE_CHECKING:
    from loralens.formats.layers import PendingLayer

LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
_PLAIN = ("A", "B", "eA", "eB", "B_bias")
_KIND_NAMES = {"loha": "LyCORIS LoHa", "lokr": "LyCORIS LoKr", "lora": "LoRA"}

#: The values all of one file's LyCORIS factors may hold, at most (4 GiB as float32): LoHa and
#: LoKr factors can be far larger than the file, and a crafted file must not exhaust memory.
MAX_EXPANDED_ELEMENTS = 2**30
#: A full LoKr half is factored by SVD only if one of its sides is at most this long.
MAX_SVD_SIDE = 4096


def lycoris_algorithm(mod: ModuleReader) -> str | None:
    """ "loha", "lokr", "locon" (a Tucker core) or None (a plain LoRA) for this module's keys;
    refuses a module that mixes them."""
    keys = mod.parts.keys
    found = {
        algo
        for algo, roles in (("loha", LOHA), ("lokr", LOKR), ("lora", _PLAIN))
        if any(r in keys for r in roles)
    }
    if len(found) > 1:
        kinds = " and ".join(_KIND_NAMES[a] for a in sorted(found))
        shown = ", ".join(repr(keys[r]) for r in sorted(keys))
        raise mod.fail(f"mixes keys of several adapter kinds ({kinds}): {shown}")
    if found & {"loha", "lokr"}:
        return found.pop()
    return "locon" if "mid" in keys else None


class Expansion:
    """Values of LyCORIS factors one file has asked for so far, against the file's limit."""

    def __init__(self) -> None:
        self.used = 0

    def take(self, mod: ModuleReader, n: int) -> None:
        self.used += n
        if self.used > MAX_EXPANDED_ELEMENTS:
            raise mod.fail(
                f"its exact low-rank factors would take the file's LyCORIS layers past "
                f"{MAX_EXPANDED_ELEMENTS:,} values ({self.used:,}); refused to protect memory"
            )


def plan_lycoris(mod: ModuleReader, algo: str, scale_for: ScaleFn) -> PendingLayer:
    """The planned exact layer of a LoCon-Tucker, LoHa or LoKr module: shapes checked and
    scale found from the header; its factors read, widened and scaled when it is read."""
    from loralens.formats.layers import PendingLayer

    planner = {"locon": _locon, "loha": _loha, "lokr": _lokr}[algo]
    out, inp, meta, rank_role, values = planner(mod)
    rank = None if rank_role is None else mod.shape(rank_role)[0]  # None: LoKr, both halves full
    scale = mod.scale_for(scale_for, rank, rank_role)
    dtype = _dtype_name(mod)

    def read(expansion: Expansion) -> LoRALayer:
        U, V, found = values(expansion)
        U, V = (U * scale).float(), V.float()
        mod.check_finite(U, f"U (its factors times the scale {scale:g}, as float32)")
        mod.check_finite(V, "V (its factors, as float32)")
        layer_meta = {**meta, **found, "scale": scale, "lycoris": algo, "dtype": dtype}
        return finish_layer(mod, U.contiguous(), V.contiguous(), layer_meta)

    convention = mod.magnitude_convention(out, int(meta.get("in_channels", inp)))
    return PendingLayer(mod.name, (out, inp), algo, convention, read)


def _dtype_name(mod: ModuleReader) -> str:
    role = next(r for r in mod.parts.keys if r not in ("alpha", "mag"))
    return str(mod.floating(role)).removeprefix("torch.")


def _require(mod: ModuleReader, roles: tuple[str, ...], what: str) -> None:
    missing = [r for r in roles if r not in mod.parts.keys]
    if missing:
        present = ", ".join(repr(mod.parts.keys[r]) for r in sorted(mod.parts.keys))
        raise mod.fail(f"{what} needs {', '.join(missing)} (has {present})")


def _fit(mod: ModuleReader, ok: bool, expected: str, **shapes: tuple[int, ...]) -> None:
    if not ok or any(0 in s for s in shapes.values()):
        got = ", ".join(f"{k} {v}" for k, v in shapes.items())
        raise mod.fail(f"factors do not fit (expected {expected}): {got}")


def _tucker_v(core: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """V[(q, k), i] = sum_j core[i, j, k] down[j, q] (in*kernel x r), for a Tucker chain."""
    r = core.shape[0]
    core = core.reshape(r, core.shape[1], -1)
    return torch.einsum("ijk,jq->qki", core, down).reshape(-1, r)


def _as_factors(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact factors of the matrix ``w`` at rank min(rows, cols): ``w`` times an identity."""
    rows, cols = w.shape
    if rows <= cols:
        return torch.eye(rows, dtype=w.dtype), w.T
    return w, torch.eye(cols, dtype=w.dtype)


def _conv_meta(kernel: tuple[int, ...], in_channels: int) -> dict[str, Any]:
    if kernel:
        return {"kind": "conv", "kernel_size": list(kernel), "in_channels": in_channels}
    return {"kind": "linear", "fan_in_fan_out": False}


# ----------------------------------------------------------------------------- LoCon (Tucker)


def _locon(mod: ModuleReader):
    _require(mod, ("A", "B", "mid"), "a LoCon layer with a Tucker core (lora_mid)")
    down, mid, up = mod.shape("A"), mod.shape("mid"), mod.shape("B")
    n = len(mid)
    ok = (
        n >= 3
        and len(down) == n
        and len(up) == n
        and mid[1] == down[0]
        and up[1] == mid[0]
        and all(s == 1 for s in down[2:] + up[2:])
    )
    _fit(
        mod,
        ok,
        "lora_down r x in x 1..., lora_mid r x r x kernel..., lora_up out x r x 1...",
        down=down,
        mid=mid,
        up=up,
    )
    out, inn, kernel = up[0], down[1], mid[2:]

    def values(expansion: Expansion):
        expansion.take(mod, (out + inn * math.prod(kernel)) * mid[0])
        U = mod.read64("B").reshape(out, mid[0])
        V = _tucker_v(mod.read64("mid"), mod.read64("A").reshape(down[0], inn))
        return U, V, {}

    return out, inn * math.prod(kernel), _conv_meta(kernel, inn), "A", values


# ----------------------------------------------------------------------------- LoHa


def _loha_half(mod: ModuleReader, i: int):
    """(out, in*kernel, rank, kernel, in_channels, read) of one Hadamard factor."""
    a, b, t = f"hada_w{i}_a", f"hada_w{i}_b", f"hada_t{i}"
    if t in mod.parts.keys:
        _require(mod, (a, b), f"a LoHa Tucker half ({t})")
        sa, sb, st = mod.shape(a), mod.shape(b), mod.shape(t)
        ok = len(st) >= 2 and len(sa) == 2 and len(sb) == 2 and sa[0] == st[0] and sb[0] == st[1]
        _fit(mod, ok, f"{t} r x r x kernel..., {a} r x out, {b} r x in", **{t: st, a: sa, b: sb})
        kernel = st[2:]

        def read():
            return mod.read64(a).T, _tucker_v(mod.read64(t), mod.read64(b))

        return sa[1], sb[1] * math.prod(kernel), st[0], kernel, sb[1], read
    sa, sb = mod.shape(a), mod.shape(b)
    ok = len(sa) == 2 and len(sb) >= 2 and sa[1] == sb[0]
    _fit(mod, ok, f"{a} out x r, {b} r x in...", **{a: sa, b: sb})

    def read():
        return mod.read64(a), mod.read64(b).reshape(sb[0], -1).T

    return sa[0], math.prod(sb[1:]), sa[1], sb[2:], sb[1], read


def _face_split(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Row-wise Khatri-Rao product: row p is kron(x[p], y[p]), so that
    (x1 . x2)(y1 . y2)^T = (x1 y1^T) * (x2 y2^T) elementwise."""
    return (x[:, :, None] * y[:, None, :]).reshape(x.shape[0], -1)


def _loha(mod: ModuleReader):
    _require(mod, ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), "a LoHa layer")
    if ("hada_t1" in mod.parts.keys) != ("hada_t2" in mod.parts.keys):
        raise mod.fail("a LoHa Tucker layer needs both hada_t1 and hada_t2")
    out1, in1, r1, k1, c1, read1 = _loha_half(mod, 1)
    out2, in2, r2, k2, c2, read2 = _loha_half(mod, 2)
    if (out1, in1) != (out2, in2):
        raise mod.fail(
            f"its two Hadamard factors have different shapes: {out1} x {in1} and {out2} x {in2}"
        )
    rank = min(r1 * r2, out1, in1)

    def values(expansion: Expansion):
        expansion.take(mod, (out1 + in1) * rank)
        (u1, v1), (u2, v2) = read1(), read2()
        if rank == r1 * r2:
            return _face_split(u1, u2), _face_split(v1, v2), {}
        # the r1 r2 face-splitting factors would be wider than delta W itself, so form delta W
        U, V = _as_factors((u1 @ v1.T).mul_(u2 @ v2.T))
        return U, V, {"exact_reduction": {"factor_rank": r1 * r2, "rank": rank}}

    return out1, in1, _conv_meta(k1 or k2, c1 if k1 else c2), "hada_w1_b", values


# ----------------------------------------------------------------------------- LoKr


def _lokr_half(mod: ModuleReader, i: int):
    """(rows, cols, kernel, in_channels, factors) of one Kronecker half W = P Q^T; ``factors()``
    returns (P, Q, what meta should say about a full or reduced half, or None)."""
    full, a, b = f"lokr_w{i}", f"lokr_w{i}_a", f"lokr_w{i}_b"
    t = f"lokr_t{i}"
    keys = mod.parts.keys
    if full in keys:
        if a in keys or b in keys:
            raise mod.fail(f"has both {full} and {a}/{b}")
        s = mod.shape(full)
        _fit(
            mod,
            len(s) >= 2 and (i == 2 or len(s) == 2),
            f"{full} rows x cols x kernel...",
            **{full: s},
        )
        return s[0], math.prod(s[1:]), s[2:], s[1], lambda: _svd_factors(mod, full)
    _require(mod, (a, b), f"a LoKr half (lokr_w{i} or {a}/{b})")
    sa, sb = mod.shape(a), mod.shape(b)
    if t in keys:
        st = mod.shape(t)
        ok = len(st) >= 2 and len(sa) == 2 and len(sb) == 2 and sa[0] == st[0] and sb[0] == st[1]
        _fit(mod, ok, f"{t} r x r x kernel..., {a} r x rows, {b} r x cols", **{t: st, a: sa, b: sb})
        kernel = st[2:]
        return (
            sa[1],
            sb[1] * math.prod(kernel),
            kernel,
            sb[1],
            lambda: _factored(mod.read64(a).T, _tucker_v(mod.read64(t), mod.read64(b))),
        )
    ok = len(sa) == 2 and len(sb) >= 2 and sa[1] == sb[0] and (i == 2 or len(sb) == 2)
    _fit(mod, ok, f"{a} rows x r, {b} r x cols...", **{a: sa, b: sb})
    return (
        sa[0],
        math.prod(sb[1:]),
        sb[2:],
        sb[1],
        lambda: _factored(mod.read64(a), mod.read64(b).reshape(sb[0], -1).T),
    )


def _factored(P: torch.Tensor, Q: torch.Tensor):
    """(P, Q, None) of a factored LoKr half W = P Q^T; where its rank exceeds its smaller side,
    the exact factors of the (smaller) W itself at that side, and what meta should say."""
    rank = P.shape[1]
    if rank <= min(P.shape[0], Q.shape[0]):
        return P, Q, None
    P, Q = _as_factors(P @ Q.T)
    return P, Q, {"factor_rank": rank, "rank": P.shape[1]}


def _svd_factors(mod: ModuleReader, role: str):
    """(P, Q, meta) with P Q^T = the full matrix in ``role`` at its rank: a float64 SVD keeping
    the singular values above numpy's ``matrix_rank`` tolerance for float32 (sigma_max *
    max(rows, cols) * eps32), or the matrix itself times an identity (exact) where that rank is
    its smaller side; meta records the rank and the largest singular value dropped (0 when
    none), so the approximation is never hidden."""
    s = mod.shape(role)
    rows, cols = s[0], math.prod(s[1:])
    if min(rows, cols) > MAX_SVD_SIDE:
        raise mod.fail(
            f"full LoKr factor {mod.parts.keys[role]!r} ({rows} x {cols}) is too large to "
            f"factor (both sides over {MAX_SVD_SIDE})"
        )
    w = mod.read64(role).reshape(rows, cols)
    if not bool(torch.isfinite(w).all()):
        raise mod.fail(f"full LoKr factor {mod.parts.keys[role]!r} holds NaN/inf: cannot factor it")
    u, sv, vh = torch.linalg.svd(w, full_matrices=False)
    tol = float(sv[0]) * max(rows, cols) * torch.finfo(torch.float32).eps
    k = max(1, int((sv > tol).sum()))
    dropped = float(sv[k]) if k < sv.numel() else 0.0
    info = {"shape": [rows, cols], "rank": k, "max_dropped_singular_value": dropped}
    if k == min(rows, cols):
        return *_as_factors(w), info
    return u[:, :k] * sv[:k], vh[:k].T, info


def _lokr(mod: ModuleReader):
    keys = mod.parts.keys
    if "lokr_t1" in keys:
        raise mod.fail("has lokr_t1; LyCORIS writes a Tucker core for the second half only")
    rows1, cols1, _, _, half1 = _lokr_half(mod, 1)
    rows2, cols2, k2, c2, half2 = _lokr_half(mod, 2)

    def values(expansion: Expansion):
        # each half's rank is at most its smaller side (the file holds each half's values or
        # more), so the Kronecker factors' rank is at most min(out, in): counted before they
        # are formed
        p1, q1, info1 = half1()
        p2, q2, info2 = half2()
        expansion.take(mod, (rows1 * rows2 + cols1 * cols2) * p1.shape[1] * p2.shape[1])
        found = {}
        for what, full in (("lokr_full", True), ("exact_reduction", False)):
            infos = {
                f"lokr_w{i}": info
                for i, info in ((1, info1), (2, info2))
                if info and (f"lokr_w{i}" in keys) == full
            }
            if infos:
                found[what] = infos
        return _kron(p1, p2), _kron(q1, q2), found

    rank_role = "lokr_w1_b" if "lokr_w1_b" in keys else "lokr_w2_b" if "lokr_w2_b" in keys else None
    meta = _conv_meta(k2, cols1 * c2)
    return rows1 * rows2, cols1 * cols2, meta, rank_role, values


def _kron(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Kronecker product of two matrices (any strides)."""
    rows, cols = x.shape[0] * y.shape[0], x.shape[1] * y.shape[1]
    return (x[:, None, :, None] * y[None, :, None, :]).reshape(rows, cols)
