"""GL-net: GL(r)-equivariant layers on the LoRA factors, then a GL(r)-invariant head.

Per layer i, with U_i (out_i x r) and V_i (in_i x r):

- :class:`EquivariantLinear`: U_i -> Phi_i U_i, V_i -> Psi_i V_i. Every linear GL-equivariant
  map has this form (no bias, no mixing across layers or between U and V), and it commutes with
  U -> U R, V -> V R^{-T}.
- :class:`GLNonlinearity`: row j of U_i scaled by s((U_i V_i^T 1)_j), row j of V_i by
  s((V_i U_i^T 1)_j). The row sums are GL-invariant and are computed as U_i (V_i^T 1) and
  V_i (U_i^T 1): U_i V_i^T is never formed. s = ReLU(sign(x)) as in the paper, or a sigmoid.
- Invariant head: H_i = U_i' V_i'^T (hidden x hidden, about 32 x 32), flattened and concatenated
  over layers into an MLP, or one token per layer into a small transformer.

Nothing depends on the rank r: a GL-net takes LoRAs of any rank (rank generalization), and zero
padding changes nothing. Inputs are rescaled per layer by the RMS of delta W (an invariant
scalar, so equivariance is exact), and the log of that RMS is fed to the head.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from loralens.errors import SettingsError
from loralens.features import svals_and_norms
from loralens.fused import grams_and_projections
from loralens.lora import LayerSpec, LoRABatch, delta_weight
from loralens.models.base import (
    EPS,
    MAX_DEPTH,
    HParam,
    LoLModel,
    RunningStandardize,
    layer_rms,
    log_scale,
    mlp,
)
from loralens.models.linear_base import LOG_EPS

Factors = tuple[list[torch.Tensor], list[torch.Tensor]]


class EquivariantLinear(nn.Module):
    """U_i -> Phi_i U_i, V_i -> Psi_i V_i per layer (Phi_i: out' x out_i, Psi_i: in' x in_i)."""

    def __init__(self, in_shapes: Sequence[tuple[int, int]], out_u: int, out_v: int | None = None):
        super().__init__()
        out_v = out_u if out_v is None else out_v
        self.phi = nn.ParameterList(
            nn.Parameter(torch.randn(out_u, o).div_(math.sqrt(o))) for o, _ in in_shapes
        )
        self.psi = nn.ParameterList(
            nn.Parameter(torch.randn(out_v, i).div_(math.sqrt(i))) for _, i in in_shapes
        )

    def forward(self, Us: Sequence[torch.Tensor], Vs: Sequence[torch.Tensor]) -> Factors:
        return (
            [torch.matmul(p, u) for p, u in zip(self.phi, Us)],
            [torch.matmul(p, v) for p, v in zip(self.psi, Vs)],
        )

    def forward_with_grams(
        self, Us: Sequence[torch.Tensor], Vs: Sequence[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`forward` and the stacked Grams (U_i^T U_i, V_i^T V_i) of its inputs, from one
        read of each input factor (:func:`loralens.fused.grams_and_projections`)."""
        gu, Us = grams_and_projections(Us, list(self.phi))
        gv, Vs = grams_and_projections(Vs, list(self.psi))
        return Us, Vs, (gu, gv)


class GLNonlinearity(nn.Module):
    """Scale rows of U_i by s(row sums of U_i V_i^T), rows of V_i by s(column sums); no U V^T.

    ``kind``: ``"relu-sign"`` (s = ReLU(sign(x)): keep rows with a positive sum, as in the paper)
    or ``"sigmoid"`` (s = sigmoid(x / sqrt(n)), n the number of summed entries: smooth).
    """

    KINDS = ("relu-sign", "sigmoid")

    def __init__(self, kind: str = "relu-sign"):
        super().__init__()
        if kind not in self.KINDS:
            raise SettingsError(f"nonlinearity must be one of {self.KINDS}, got {kind!r}")
        self.kind = kind

    def gate(self, x: torch.Tensor, n: int) -> torch.Tensor:
        if self.kind == "relu-sign":
            return (x > 0).to(x.dtype)
        return torch.sigmoid(x / math.sqrt(max(n, 1)))

    def forward(self, Us: Sequence[torch.Tensor], Vs: Sequence[torch.Tensor]) -> Factors:
        outU, outV = [], []
        for u, v in zip(Us, Vs):
            rows = u @ v.sum(dim=1).unsqueeze(-1)  # (B, out, 1) = U (V^T 1)
            cols = v @ u.sum(dim=1).unsqueeze(-1)  # (B, in, 1) = V (U^T 1)
            outU.append(u * self.gate(rows, v.shape[1]))
            outV.append(v * self.gate(cols, u.shape[1]))
        return outU, outV

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"


class GLNet(LoLModel):
    """``glnet``: equivariant linear (+ ``blocks`` x [nonlinearity, equivariant linear]), then an
    invariant head on U' V'^T per layer: ``head="mlp"`` (flattened over layers) or
    ``"transformer"`` (one token per layer). GL(r)-invariant; any rank at inference.
    """

    name = "glnet"
    defaults: ClassVar[dict[str, Any]] = {
        # equivariant width; the head sees hidden x hidden per layer. The paper uses about 32;
        # 8 generalized better on synthetic tasks with 512 and 2048 LoRAs (fewer head inputs).
        "hidden": 8,
        "blocks": 0,  # [nonlinearity, equivariant linear] blocks after the first linear layer
        "nonlinearity": "relu-sign",
        "head": "mlp",
        "head_hidden": 128,
        "head_depth": 2,
        "dropout": 0.0,
        "d_model": 64,  # transformer head only
        "n_heads": 4,
        "n_layers": 2,
        # each layer's singular values and norm, and their logs, beside U' V'^T (what the
        # spectral probe reads, so the network alone has it; invariant at any width)
        "spectrum": True,
    }
    saved_defaults: ClassVar[dict[str, Any]] = {"spectrum": False}
    schema: ClassVar[dict[str, HParam]] = {
        "hidden": HParam("int", 1, 1024),  # the head sees hidden**2 features per layer
        "blocks": HParam("int", 0, MAX_DEPTH),
        "nonlinearity": HParam("choice", choices=GLNonlinearity.KINDS),
        "head": HParam("choice", choices=("mlp", "transformer")),
        "head_hidden": HParam("int", 1),
        "head_depth": HParam("int", 0, MAX_DEPTH),
        "dropout": HParam("float", 0, 1),
        "d_model": HParam("int", 1),
        "n_heads": HParam("int", 1, 1024),
        "n_layers": HParam("int", 1, MAX_DEPTH),
        "spectrum": HParam("choice", choices=(True, False)),
    }
    gl_invariant = o_invariant = True
    renamed: ClassVar[dict[str, str]] = {"embed.": "token_embed."}  # before LoLModel.embed

    def __init__(self, spec: LayerSpec, out_dim: int, *, like: Any = None, **hparams: Any):
        super().__init__(spec, out_dim, hparams)
        h = self.hparams
        if h["head"] == "transformer" and h["d_model"] % h["n_heads"]:
            raise SettingsError(
                f"d_model ({h['d_model']}) must be a multiple of n_heads ({h['n_heads']})"
            )
        d, n = int(h["hidden"]), len(spec.names)
        self.equivariant = nn.ModuleList([EquivariantLinear(self.inner.shapes, d)])
        for _ in range(int(h["blocks"])):
            self.equivariant.append(GLNonlinearity(h["nonlinearity"]))
            self.equivariant.append(EquivariantLinear([(d, d)] * n, d))
        self.scale_norm = RunningStandardize((n, 1))
        # A linear path from the per-layer log scales (and spectra) straight to the output: the
        # scale of a LoRA is often what matters most, and this keeps it from drowning in d*d
        # features.
        self.scale_skip = nn.Linear(n, self.out_dim)
        self.k = max(int(r) for r in self.inner.ranks) if h["spectrum"] else 0
        if self.k:
            self.spectrum_norm = RunningStandardize((n, 2 * self.k + 2))
            self.spectrum_skip = nn.Linear(n * (2 * self.k + 2), self.out_dim)
        token = d * d + 1 + (2 * self.k + 2 if self.k else 0)
        if h["head"] == "mlp":
            self.head = mlp(
                n * token, self.out_dim, h["head_hidden"], h["head_depth"], h["dropout"]
            )
        else:
            dm = int(h["d_model"])
            self.token_embed = nn.Linear(token, dm)
            self.position = nn.Parameter(torch.randn(n, dm) * 0.02)
            layer = nn.TransformerEncoderLayer(
                dm, int(h["n_heads"]), 2 * dm, h["dropout"], batch_first=True, norm_first=True
            )
            self.transformer = nn.TransformerEncoder(
                layer, int(h["n_layers"]), enable_nested_tensor=False
            )
            self.out = nn.Sequential(nn.LayerNorm(dm), nn.Linear(dm, self.out_dim))

    def equivariant_features(self, batch: LoRABatch) -> LoRABatch:
        """The factors (U_i', V_i') the invariant head sees, as a batch (same ranks as ``batch``).

        GL(r)-equivariant: transforming ``batch`` by R per layer transforms the output by R.
        """
        batch = self.prepare(batch)
        Us, Vs, _ = self._equivariant(batch)
        return LoRABatch(names=list(batch.names), U=Us, V=Vs, ranks=batch.ranks)

    def _first(
        self, batch: LoRABatch
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """The first equivariant linear layer on the raw factors and the (B, L) RMS of every
        delta W (an invariant), both from one read of each factor."""
        Us, Vs, grams = self.equivariant[0].forward_with_grams(batch.U, batch.V)
        return Us, Vs, layer_rms(batch, grams).to(batch.dtype)

    def _equivariant(
        self, batch: LoRABatch
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        Us, Vs, rms = self._first(batch)
        s = rms.clamp_min(EPS).sqrt()
        # The first layer is linear, Phi (U / s) = (Phi U) / s: scaling its small outputs rather
        # than the inputs saves a copy (a read and a write) of every U and V.
        Us = [u / s[:, k, None, None] for k, u in enumerate(Us)]
        Vs = [v / s[:, k, None, None] for k, v in enumerate(Vs)]
        for layer in self.equivariant[1:]:
            Us, Vs = layer(Us, Vs)
        return Us, Vs, rms

    def embed(self, batch: LoRABatch) -> torch.Tensor:
        batch = self.prepare(batch)
        if len(self.equivariant) == 1:
            # One linear layer: (Phi U / s)(Psi V / s)^T = (Phi U)(Psi V)^T / rms, so scale the
            # L small heads at once instead of 2 L factor blocks one by one.
            Us, Vs, rms = self._first(batch)
            div = rms.clamp_min(EPS)[..., None, None]
        else:
            Us, Vs, rms = self._equivariant(batch)
            div = 1.0
        heads = torch.stack([delta_weight(u, v) for u, v in zip(Us, Vs)], dim=1) / div
        parts = [heads.flatten(2), self.scale_norm(log_scale(rms)[..., None])]  # (B, L, 1)
        if self.k:
            s, norms = svals_and_norms(batch, self.k)  # (B, L, k), from the r x r Grams
            both = torch.cat([s, norms.to(s.dtype)[..., None]], dim=2)
            parts.append(self.spectrum_norm(torch.cat([both, torch.log(both + LOG_EPS)], dim=2)))
        return torch.cat(parts, dim=2).flatten(1)  # (B, L (d*d + 1 + 2k + 2))

    def skip_features(self, z: torch.Tensor) -> torch.Tensor:
        """(B, F) what the linear path to the output reads from embeddings ``z``: each layer's
        standardized log scale (and spectrum)."""
        tokens = z.reshape(len(z), len(self.spec.names), -1)  # (B, L, d*d + 1 + 2k + 2)
        d2 = int(self.hparams["hidden"]) ** 2
        return torch.cat([tokens[..., d2], tokens[..., d2 + 1 :].flatten(1)], dim=1)

    @torch.no_grad()
    def set_skip(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Start the linear path at a fit: ``weight`` (F, out_dim) on :meth:`skip_features`,
        and the head's last layer at zero, so the network starts as that fit and learns what
        it misses."""
        last = (self.head if self.hparams["head"] == "mlp" else self.out)[-1]
        last.weight.zero_()
        last.bias.zero_()
        n = len(self.spec.names)
        self.scale_skip.weight.copy_(weight[:n].T)
        self.scale_skip.bias.copy_(bias)
        if self.k:
            self.spectrum_skip.weight.copy_(weight[n:].T)
            self.spectrum_skip.bias.zero_()

    def readout(self, z: torch.Tensor) -> torch.Tensor:
        tokens = z.reshape(len(z), len(self.spec.names), -1)  # (B, L, d*d + 1 + 2k + 2)
        d2 = int(self.hparams["hidden"]) ** 2
        skip = self.scale_skip(tokens[..., d2])
        if self.k:
            skip = skip + self.spectrum_skip(tokens[..., d2 + 1 :].flatten(1))
        if self.hparams["head"] == "mlp":
            return self.head(z) + skip
        out = self.transformer(self.token_embed(tokens) + self.position)
        return self.out(out.mean(dim=1)) + skip
