"""The GL(r) symmetry of LoRA factors, random group elements, invariance checks, and the
isometric width lift (:func:`lift_width`) that a width-independent model must not notice.

A layer's delta W = U @ V.T is unchanged by (U, V) -> (U R, V R^{-T}) for any invertible r x r
matrix R, independently per layer: the group is GL(r)^L. Orthogonal Q acts as (U Q, V Q).

In a padded :class:`~loralens.lora.LoRABatch` the group elements act only on the first
``ranks[b, i]`` columns of LoRA b's layer i (block-diagonal ``diag(R, I)``): the padding stays
exactly zero, so a transformed batch is still a valid batch with the same ``ranks``.

Group elements are drawn from the seed, layer by layer and (in a batch) LoRA by LoRA, and depend
only on the ranks, never on the shapes. An equivariant map f (one that returns LoRA factors with
the same ranks) therefore satisfies ``f(gl_transform(x, s)) == gl_transform(f(x), s)``: this is
what :func:`gl_equivariance_error` checks.

The checks follow e3nn's ``assert_equivariant``: transform the input by random group elements,
run the model, compare with the untransformed output. Use them on your own models::

    import loralens as ll
    ll.assert_gl_invariant(model, batch)          # raises AssertionError with the error found
    err = ll.gl_invariance_error(model, batch)    # max relative output change, float64
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable
from typing import Any, Literal

import torch

from loralens.errors import InputError, SettingsError
from loralens.fused import linalg_dtype
from loralens.lora import LoRA, LoRABatch, LoRALayer

Group = Literal["gl", "o"]

__all__ = [
    "assert_gl_equivariant",
    "assert_gl_invariant",
    "assert_o_invariant",
    "gl_equivariance_error",
    "gl_invariance_error",
    "gl_transform",
    "lift_width",
    "o_transform",
    "random_gl",
    "random_orthogonal",
]


def _generator(seed: int | torch.Generator) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        return seed
    return torch.Generator().manual_seed(int(seed))


def random_orthogonal(r: int, generator: torch.Generator) -> torch.Tensor:
    """A Haar-random r x r orthogonal matrix (float64, CPU)."""
    a = torch.randn(r, r, generator=generator, dtype=torch.float64)
    q, rr = torch.linalg.qr(a)
    signs = torch.sign(torch.diagonal(rr))
    signs[signs == 0] = 1.0
    return q * signs


def random_gl(r: int, generator: torch.Generator, *, cond: float = 10.0) -> torch.Tensor:
    """A random invertible r x r matrix with condition number at most ``cond`` (float64, CPU).

    R = Q1 diag(s) Q2 with Haar-random Q1, Q2 and singular values s log-uniform in
    [cond^-1/2, cond^1/2], so neither R nor R^-1 blows anything up.
    """
    if cond < 1:
        raise SettingsError(f"cond must be >= 1, got {cond}")
    q1, q2 = random_orthogonal(r, generator), random_orthogonal(r, generator)
    half = 0.5 * math.log(cond)
    s = torch.exp((torch.rand(r, generator=generator, dtype=torch.float64) * 2 - 1) * half)
    return (q1 * s) @ q2


def _act(
    x: LoRA | LoRABatch,
    seed: int | torch.Generator,
    draw: Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]],
) -> LoRA | LoRABatch:
    """Apply (U, V) -> (U A, V B) with (A, B) = draw(rank, generator) per layer (and per LoRA)."""
    g = _generator(seed)
    if isinstance(x, LoRA):

        def fn(_: int, layer: Any) -> tuple[torch.Tensor, torch.Tensor]:
            a, b = draw(layer.rank, g)
            w = linalg_dtype(layer.U.dtype)
            dev = layer.U.device
            u = (layer.U.to(w) @ a.to(w).to(dev)).to(layer.U.dtype)
            v = (layer.V.to(w) @ b.to(w).to(dev)).to(layer.V.dtype)
            return u, v

        return x.map_factors(fn)
    if isinstance(x, LoRABatch):
        U, V = [], []
        ranks = x.ranks.cpu()
        for i, (u, v) in enumerate(zip(x.U, x.V)):
            nb, r = u.shape[0], u.shape[2]
            A = torch.eye(r, dtype=torch.float64).repeat(nb, 1, 1)
            B = A.clone()
            for b in range(nb):
                k = int(ranks[b, i])
                if k > 0:
                    a, bb = draw(k, g)
                    A[b, :k, :k] = a
                    B[b, :k, :k] = bb
            w = linalg_dtype(u.dtype)
            U.append((u.to(w) @ A.to(w).to(u.device)).to(u.dtype))
            V.append((v.to(w) @ B.to(w).to(v.device)).to(v.dtype))
        return LoRABatch(names=list(x.names), U=U, V=V, ranks=x.ranks.clone())
    raise TypeError(f"expected a LoRA or a LoRABatch, got {type(x).__name__}")


def gl_transform(x: LoRA | LoRABatch, seed: int | torch.Generator = 0, *, cond: float = 10.0):
    """(U, V) -> (U R, V R^{-T}) with a random well-conditioned R per layer (and per LoRA).

    Every delta W is unchanged. ``cond`` bounds the condition number of each R. In a batch, R
    acts on each LoRA's true rank only, so zero padding stays zero.
    """

    def draw(r: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        R = random_gl(r, g, cond=cond)
        return R, torch.linalg.inv(R).T

    return _act(x, seed, draw)


def o_transform(x: LoRA | LoRABatch, seed: int | torch.Generator = 0):
    """(U, V) -> (U Q, V Q) with a Haar-random orthogonal Q per layer (and per LoRA)."""

    def draw(r: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        Q = random_orthogonal(r, g)
        return Q, Q

    return _act(x, seed, draw)


@functools.lru_cache(maxsize=256)
def _isometry(rows: int, cols: int, seed: int, index: int) -> torch.Tensor:
    """A (rows x cols) float64 matrix with orthonormal columns, drawn from (seed, index)."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + index)
    return torch.linalg.qr(torch.randn(rows, cols, generator=g, dtype=torch.float64)).Q


def lift_width(lora: LoRA, factor: int, seed: int = 0) -> LoRA:
    """``lora`` with every layer embedded isometrically in one ``factor`` times wider: U' = Q_out
    U and V' = Q_in V, with Q (orthonormal columns) drawn from ``seed`` and the layer's position
    and shape alone, so LoRAs lifted with one seed share them. Inner products between updates,
    norms and singular values are unchanged: a model that learns from the updates rather than
    the width predicts the same on a zoo and on its lift (linear layers only)."""
    if factor < 1:
        raise InputError(f"lift_width: factor must be at least 1, got {factor}")
    layers = []
    for k, layer in enumerate(lora.layers):
        if layer.meta.get("kind", "linear") != "linear":
            raise InputError(f"lift_width: layer {layer.name!r} is not linear")
        o, i = layer.U.shape[0], layer.V.shape[0]
        q_out = _isometry(o * factor, o, seed, 2 * k)
        q_in = _isometry(i * factor, i, seed, 2 * k + 1)
        U = (q_out @ layer.U.double()).to(layer.U.dtype)
        V = (q_in @ layer.V.double()).to(layer.V.dtype)
        layers.append(LoRALayer(layer.name, U, V, dict(layer.meta)))
    return LoRA(layers, dict(lora.metadata))


def _transform(group: Group) -> Callable[..., Any]:
    if group == "gl":
        return gl_transform
    if group == "o":
        return o_transform
    raise SettingsError(f"group must be 'gl' or 'o', got {group!r}")


def _prepared(model: Any, dtype: torch.dtype | None) -> Any:
    """An eval-mode copy of ``model`` in ``dtype`` (the model itself is left untouched)."""
    if isinstance(model, torch.nn.Module):
        model = copy.deepcopy(model)
        if dtype is not None:
            model = model.to(dtype)
        model.eval()
    return model


def _as_float(batch: LoRABatch | LoRA, dtype: torch.dtype | None):
    return batch if dtype is None else batch.to(dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    scale = b.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    return float((a - b).abs().max() / scale)


def gl_invariance_error(
    model: Any,
    batch: LoRABatch | LoRA,
    *,
    group: Group = "gl",
    seed: int = 0,
    trials: int = 3,
    dtype: torch.dtype | None = torch.float64,
    cond: float = 10.0,
) -> float:
    """The largest relative change of ``model(batch)`` under random group elements.

    ``model`` is any callable on a batch (an ``nn.Module`` is deep-copied, cast to ``dtype`` and
    put in eval mode; pass ``dtype=None`` to keep it as is). The error of a trial is
    ``max |f(g x) - f(x)| / max |f(x)|``; the worst of ``trials`` draws is returned. ``group`` is
    ``"gl"`` (GL(r) per layer, condition number <= ``cond``) or ``"o"`` (orthogonal).
    """
    fn = _prepared(model, dtype)
    x = _as_float(batch, dtype)
    transform = _transform(group)
    kwargs = {"cond": cond} if group == "gl" else {}
    with torch.no_grad():
        ref = fn(x)
        worst = 0.0
        for t in range(trials):
            out = fn(transform(x, seed + t, **kwargs))
            worst = max(worst, _rel(out, ref))
    return worst


def assert_gl_invariant(
    model: Any, batch: LoRABatch | LoRA, tol: float = 1e-6, **kwargs: Any
) -> float:
    """Raise ``AssertionError`` unless ``model`` is GL(r)-invariant on ``batch`` to ``tol``.

    Keyword arguments go to :func:`gl_invariance_error`. Returns the error found.
    """
    err = gl_invariance_error(model, batch, group="gl", **kwargs)
    if not err < tol:
        raise AssertionError(
            f"model is not GL(r)-invariant: output changed by {err:.3g} (relative) "
            f"under random per-layer GL(r) transforms; tolerance {tol:g}"
        )
    return err


def assert_o_invariant(
    model: Any, batch: LoRABatch | LoRA, tol: float = 1e-6, **kwargs: Any
) -> float:
    """Raise ``AssertionError`` unless ``model`` is O(r)-invariant on ``batch`` to ``tol``."""
    err = gl_invariance_error(model, batch, group="o", **kwargs)
    if not err < tol:
        raise AssertionError(
            f"model is not O(r)-invariant: output changed by {err:.3g} (relative) "
            f"under random per-layer orthogonal transforms; tolerance {tol:g}"
        )
    return err


def _factors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, LoRABatch):
        return [*x.U, *x.V]
    if isinstance(x, LoRA):
        return [t for layer in x.layers for t in (layer.U, layer.V)]
    if isinstance(x, tuple) and len(x) == 2:  # (U list, V list)
        return [*x[0], *x[1]]
    raise TypeError(f"expected a LoRA, a LoRABatch or (U list, V list), got {type(x).__name__}")


def gl_equivariance_error(
    fn: Callable[[LoRABatch], LoRABatch],
    batch: LoRABatch,
    *,
    group: Group = "gl",
    seed: int = 0,
    trials: int = 3,
    dtype: torch.dtype | None = torch.float64,
) -> float:
    """How far ``fn(g x)`` is from ``g fn(x)`` for a map from LoRA batches to LoRA batches.

    ``fn`` must keep each layer's rank (the group acts on the output with the same elements).
    Returns the worst relative error over ``trials`` draws.
    """
    f = _prepared(fn, dtype)
    x = _as_float(batch, dtype)
    transform = _transform(group)
    with torch.no_grad():
        fx = f(x)
        worst = 0.0
        for t in range(trials):
            lhs = _factors(f(transform(x, seed + t)))
            rhs = _factors(transform(fx, seed + t))
            for a, b in zip(lhs, rhs):
                worst = max(worst, _rel(a, b))
    return worst


def assert_gl_equivariant(
    fn: Callable[[LoRABatch], LoRABatch], batch: LoRABatch, tol: float = 1e-6, **kwargs: Any
) -> float:
    """Raise ``AssertionError`` unless ``fn(g x) == g fn(x)`` to ``tol`` for random g in GL(r)^L."""
    err = gl_equivariance_error(fn, batch, **kwargs)
    if not err < tol:
        raise AssertionError(
            f"map is not GL(r)-equivariant: f(g x) differs from g f(x) by {err:.3g} "
            f"(relative); tolerance {tol:g}"
        )
    return err
