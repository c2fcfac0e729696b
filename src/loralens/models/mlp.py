"""MLPs on featurized LoRAs: ``mlp`` (flatten), ``mlp-oalign``, ``mlp-svd``, ``mlp-dense``.

Raw LoRA factors are tiny (1e-3 .. 1e-1) and their scales vary over orders of magnitude between
adapters, so every model feeds its MLP scale-free features (each block divided by its own RMS)
plus the log of that RMS, standardized by running statistics. For the invariant models every
scale is itself invariant (a norm of delta W), so normalization keeps the invariance exact.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from loralens import features
from loralens.errors import SettingsError
from loralens.lora import LayerSpec, LoRA, LoRABatch, delta_weight
from loralens.models.base import (
    EPS,
    MAX_DEPTH,
    HParam,
    LoLModel,
    ModelSizeError,
    RunningStandardize,
    available_bytes,
    layer_rms,
    log_scale,
    mlp,
)
from loralens.models.basis import UpdateBasis

_HEAD = {"hidden": 128, "depth": 2, "dropout": 0.0}
_HEAD_SCHEMA = {
    "hidden": HParam("int", 1),
    "depth": HParam("int", 0, MAX_DEPTH),
    "dropout": HParam("float", 0, 1),
}


def _rms(t: torch.Tensor) -> torch.Tensor:
    """(B,) RMS of each sample's (n, r) block (no copy of a strided block)."""
    n = t.shape[1] * t.shape[2]
    norm = torch.linalg.vector_norm(
        t, dim=(1, 2), dtype=torch.promote_types(t.dtype, torch.float32)
    )
    return norm.to(t.dtype) / math.sqrt(max(n, 1))


class FlatMLP(LoLModel):
    """``mlp``: every U_i and V_i flattened (rank axis padded/truncated to ``ranks``). Not invariant.

    ``layout`` is the order of the flattened entries: ``"rank-major"`` (column by column, the
    order factors are stored in, so flattening is free) or ``"row-major"`` (runs saved before
    rank-major storage; a transposing copy of every factor).
    """

    name = "mlp"
    defaults: ClassVar[dict[str, Any]] = {**_HEAD, "ranks": None, "layout": "rank-major"}
    saved_defaults: ClassVar[dict[str, Any]] = {"layout": "row-major"}
    LAYOUTS = ("rank-major", "row-major")
    schema: ClassVar[dict[str, HParam]] = {
        **_HEAD_SCHEMA,
        "ranks": HParam("ints", nullable=True),
        "layout": HParam("choice", choices=LAYOUTS),
    }

    def __init__(self, spec: LayerSpec, out_dim: int, *, like: Any = None, **hparams: Any):
        super().__init__(spec, out_dim, hparams)
        if self.hparams["ranks"] is None:
            self.hparams["ranks"] = list(spec.ranks)
        self.hparams["ranks"] = [int(r) for r in self.hparams["ranks"]]
        if len(self.hparams["ranks"]) != len(spec.names):
            raise SettingsError(
                f"ranks: {len(self.hparams['ranks'])} widths for {len(spec.names)} layers"
            )
        dim = sum((o + i) * r for (o, i), r in zip(self.inner.shapes, self.hparams["ranks"]))
        self.build_head(dim + 2 * len(spec.names))

    def build_head(self, dim: int) -> None:
        h = self.hparams
        self.norm = RunningStandardize(dim)
        self.head = mlp(dim, self.out_dim, h["hidden"], h["depth"], h["dropout"])
        # linear path from the log scales to the output (see GLNet.scale_skip)
        self.scale_skip = nn.Linear(2 * len(self.spec.names), self.out_dim)

    def factors(self, batch: LoRABatch) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        widths = self.hparams["ranks"]
        return (
            [features.pad_rank(u, r) for u, r in zip(batch.U, widths)],
            [features.pad_rank(v, r) for v, r in zip(batch.V, widths)],
        )

    def _flat(self, f: torch.Tensor) -> torch.Tensor:
        """(B, n, r) -> (B, n r) in the model's ``layout`` (a view for rank-major factors)."""
        return f.mT.flatten(1) if self.hparams["layout"] == "rank-major" else f.flatten(1)

    def embed(self, batch: LoRABatch) -> torch.Tensor:
        batch = self.prepare(batch)
        Us, Vs = self.factors(batch)
        parts, scales = [], []
        for u, v in zip(Us, Vs):
            ru, rv = _rms(u), _rms(v)
            parts += [self._flat(u / ru.clamp_min(EPS)[:, None, None])]
            parts += [self._flat(v / rv.clamp_min(EPS)[:, None, None])]
            scales += [log_scale(ru), log_scale(rv)]
        return self.norm(torch.cat([*parts, torch.stack(scales, dim=1)], dim=1))

    def readout(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(z) + self.scale_skip(z[:, -self.scale_skip.in_features :])


class OAlignMLP(FlatMLP):
    """``mlp-oalign``: factors aligned to a template LoRA by orthogonal Procrustes. O(r)-invariant.

    The template lives in buffers (``template_U_<i>`` / ``template_V_<i>``), so it is saved in the
    state_dict. It is ``template=`` when given, else picked from ``like`` when that is a batch
    (:func:`loralens.features.pick_template`), else zeros until ``load_state_dict`` or
    :meth:`set_template`. ``ranks`` are the template's ranks (the aligned widths).
    """

    name = "mlp-oalign"
    o_invariant = True

    def __init__(
        self,
        spec: LayerSpec,
        out_dim: int,
        *,
        like: Any = None,
        template: LoRA | LoRABatch | None = None,
        **hparams: Any,
    ):
        if template is None and isinstance(like, LoRABatch):
            fitted = hparams.get("basis")
            template = features.pick_template(
                fitted.project(like) if isinstance(fitted, UpdateBasis) else like
            )
        if template is not None:
            tU, _ = features.template_factors(template)
            hparams["ranks"] = [int(u.shape[1]) for u in tU]
        super().__init__(spec, out_dim, **hparams)
        for k, ((o, i), r) in enumerate(zip(self.inner.shapes, self.hparams["ranks"])):
            self.register_buffer(f"template_U_{k}", torch.zeros(o, r))
            self.register_buffer(f"template_V_{k}", torch.zeros(i, r))
        if template is not None:
            self.set_template(template)

    @property
    def template(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(U list, V list) of the template."""
        n = len(self.spec.names)
        return (
            [getattr(self, f"template_U_{k}") for k in range(n)],
            [getattr(self, f"template_V_{k}") for k in range(n)],
        )

    def set_template(self, template: LoRA | LoRABatch) -> None:
        """Use ``template`` (one LoRA with the model's layers and the model's ``ranks``)."""
        tU, tV = features.template_factors(template)
        mU, mV = self.template
        if len(tU) != len(mU):
            raise ValueError(f"template has {len(tU)} layers, the model {len(mU)}")
        with torch.no_grad():
            for k, (u, v) in enumerate(zip(tU, tV)):
                if u.shape != mU[k].shape or v.shape != mV[k].shape:
                    raise ValueError(
                        f"template layer {k}: U {tuple(u.shape)}, V {tuple(v.shape)}; the model "
                        f"holds {tuple(mU[k].shape)}, {tuple(mV[k].shape)}"
                    )
                mU[k].copy_(u)
                mV[k].copy_(v)

    def factors(self, batch: LoRABatch) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        tU, tV = self.template
        if not any(bool(t.any()) for t in (*tU, *tV)):
            raise RuntimeError(
                "mlp-oalign has no template yet: build it with like=<a batch of training "
                "LoRAs> or template=<a LoRA>, call set_template(), or load_state_dict()"
            )
        return features.oalign(batch, (tU, tV))


class SVDMLP(LoLModel):
    """``mlp-svd``: top-k singular values of every delta W (never formed). GL(r)-invariant."""

    name = "mlp-svd"
    defaults: ClassVar[dict[str, Any]] = {**_HEAD, "k": None}
    schema: ClassVar[dict[str, HParam]] = {**_HEAD_SCHEMA, "k": HParam("int", 1, nullable=True)}
    gl_invariant = o_invariant = True

    def __init__(self, spec: LayerSpec, out_dim: int, *, like: Any = None, **hparams: Any):
        super().__init__(spec, out_dim, hparams)
        if self.hparams["k"] is None:
            self.hparams["k"] = max(spec.ranks)
        self.hparams["k"] = int(self.hparams["k"])
        n = len(spec.names)
        dim = n * (self.hparams["k"] + 1)
        h = self.hparams
        self.norm = RunningStandardize(dim)
        self.head = mlp(dim, self.out_dim, h["hidden"], h["depth"], h["dropout"])

    def embed(self, batch: LoRABatch) -> torch.Tensor:
        batch = self.prepare(batch)
        s, norm = features.svals_and_norms(batch, self.hparams["k"])  # (B, L, k), (B, L)
        norm = norm.to(s.dtype)  # |sigma| over all r, not just top-k
        x = torch.cat([(s / norm.clamp_min(EPS)[..., None]).flatten(1), log_scale(norm)], dim=1)
        return self.norm(x)

    def readout(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(z)


class DenseMLP(LoLModel):
    """``mlp-dense``: every delta W = U V^T in full. GL(r)-invariant; O(sum out*in) per LoRA.

    The first layer holds ``hidden`` x sum_i out_i * in_i weights (one block per layer, so the
    features are never concatenated); building refuses, with the memory it would need, when
    those weights do not fit in ``max_gib`` (default: half the memory available now, so that
    weights and gradients fit).
    """

    name = "mlp-dense"
    defaults: ClassVar[dict[str, Any]] = {**_HEAD, "hidden": 64, "max_gib": None}
    schema: ClassVar[dict[str, HParam]] = {
        **_HEAD_SCHEMA,
        "max_gib": HParam("float", 0, 2**20, nullable=True),
    }
    gl_invariant = o_invariant = True

    def __init__(self, spec: LayerSpec, out_dim: int, *, like: Any = None, **hparams: Any):
        super().__init__(spec, out_dim, hparams)
        h = self.hparams
        sizes = [o * i for o, i in self.inner.shapes]
        total = sum(sizes)
        need = 4 * total * (h["hidden"] + 2)  # float32 weights + running mean/square
        # Weights and their gradients must fit: the least any training needs (Adam needs 4x).
        limit = (
            int(float(h["max_gib"]) * 2**30) if h["max_gib"] is not None else available_bytes() // 2
        )
        if need > limit:
            raise ModelSizeError(
                f"mlp-dense does not fit: its first layer maps {total:,} dense inputs (sum of "
                f"out x in over {len(sizes)} layers) to {h['hidden']} units, "
                f"{need / 2**30:.1f} GiB in float32 (about {4 * need / 2**30:.1f} GiB to train "
                f"with Adam), over the limit of {limit / 2**30:.1f} GiB (half the memory "
                "available now, or max_gib=). Use glnet or mlp-svd, which scale to any width, "
                "or a smaller hidden="
            )
        hid, bound = h["hidden"], 1 / math.sqrt(total)
        self.norms = nn.ModuleList(RunningStandardize(s) for s in sizes)
        self.first = nn.ParameterList(
            nn.Parameter(torch.empty(hid, s).uniform_(-bound, bound)) for s in sizes
        )
        n = len(sizes)
        self.scale_norm = RunningStandardize(n)
        self.first_scale = nn.Linear(n, hid)
        self.scale_skip = nn.Linear(n, self.out_dim)  # see GLNet.scale_skip
        rest = mlp(hid, self.out_dim, hid, max(h["depth"] - 1, 0), h["dropout"])
        self.head = nn.Sequential(
            nn.GELU(), *([nn.Dropout(h["dropout"])] if h["dropout"] else []), rest
        )

    def embed(self, batch: LoRABatch) -> torch.Tensor:
        batch = self.prepare(batch)
        rms = layer_rms(batch).to(batch.dtype)  # (B, L)
        scales = self.scale_norm(log_scale(rms))
        z = self.first_scale(scales)
        for k, (u, v) in enumerate(zip(batch.U, batch.V)):
            d = delta_weight(u, v).flatten(1) / rms[:, k, None].clamp_min(EPS)
            z = z + self.norms[k](d) @ self.first[k].T
        return torch.cat([z, scales], dim=1)

    def readout(self, z: torch.Tensor) -> torch.Tensor:
        cut = z.shape[1] - self.scale_skip.in_features
        return self.head(z[:, :cut]) + self.scale_skip(z[:, cut:])
