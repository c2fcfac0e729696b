"""``w2t``: the W2T model (arXiv 2603.15990), a transformer over canonical rank-one components.

Per layer i, delta W_i = sum_k s_k l_k r_k^T in canonical form (:mod:`loralens.canonical_form`: QR
or Gram route, SVD of the r x r core, a sign convention; never forms delta W). Each component
with a nonzero singular value is a token:

    token = A_i (sqrt(out_i) l_k) + B_i (sqrt(in_i) r_k) + c(s_k / |delta W_i|) + layer_i + comp_k

(A_i, B_i per-layer linear maps; layer and component embeddings learned; component k past the
table shares its last row, so any rank works). One scale token per layer carries the layer's
log RMS (|s| / sqrt(out_i in_i), standardized) and a class token is read out. Masked components (zero padding, zero
singular values) are left out of attention, so a padded batch gives each LoRA its own output.
GL(r)-invariant wherever the SVD is unique (ties between singular values: measure zero).
Within ``caching()`` (a training run) each LoRA's canonical form is computed once and reused
(:class:`~loralens.canonical_form.CanonicalCache`): training sees the same LoRAs every epoch.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from loralens.canonical_form import Canonical, CanonicalCache, canonical_form
from loralens.errors import SettingsError
from loralens.lora import LayerSpec, LoRABatch
from loralens.models.base import (
    EPS,
    MAX_DEPTH,
    HParam,
    LoLModel,
    RunningStandardize,
    log_scale,
)


class W2T(LoLModel):
    """``w2t``: canonical rank-one components as tokens, a small transformer encoder, a class
    token read out by a linear head. GL(r)-invariant on generic inputs; any rank."""

    name = "w2t"
    defaults: ClassVar[dict[str, Any]] = {
        # small and regularized (with weight_decay 1e-2 in the registry): on a 300-LoRA
        # development zoo d_model 64, 2 layers, no dropout overfitted within 10 epochs
        "d_model": 32,
        "n_heads": 4,
        "n_layers": 1,
        "dropout": 0.1,
        "components": 64,  # rows of the component embedding (later components share the last)
        # add W ((A l) * (B r) s / |dW|) to each token: sign-free, and summed over a layer's
        # components a linear map of delta W itself (not in the W2T paper)
        "bilinear": False,
    }
    schema: ClassVar[dict[str, HParam]] = {
        "d_model": HParam("int", 1, 4096),
        "n_heads": HParam("int", 1, 1024),
        "n_layers": HParam("int", 1, MAX_DEPTH),
        "dropout": HParam("float", 0, 1),
        "components": HParam("int", 1),
        "bilinear": HParam("choice", choices=(False, True)),
    }
    gl_invariant = o_invariant = True
    #: the most bytes of canonical forms kept within ``caching()`` (0: none, recompute each batch)
    cache_bytes: ClassVar[int] = 1 << 30

    def __init__(self, spec: LayerSpec, out_dim: int, *, like: Any = None, **hparams: Any):
        super().__init__(spec, out_dim, hparams)
        h = self.hparams
        dm, n = int(h["d_model"]), len(spec.names)
        if dm % h["n_heads"]:
            raise SettingsError(f"d_model ({dm}) must be a multiple of n_heads ({h['n_heads']})")
        self.left_in = nn.ModuleList(nn.Linear(o, dm, bias=False) for o, _ in self.inner.shapes)
        self.right_in = nn.ModuleList(nn.Linear(i, dm, bias=False) for _, i in self.inner.shapes)
        self.value_in = nn.Linear(2, dm)
        self.bilinear_in = nn.Linear(dm, dm) if h["bilinear"] else None
        self.layer_pos = nn.Parameter(torch.randn(n, dm) * 0.02)
        self.component_pos = nn.Parameter(torch.randn(int(h["components"]), dm) * 0.02)
        self.scale_norm = RunningStandardize((n, 1))
        self.scale_in = nn.Linear(1, dm)
        self.cls = nn.Parameter(torch.randn(1, 1, dm) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dm, int(h["n_heads"]), 2 * dm, h["dropout"], batch_first=True, norm_first=True
        )
        self.transformer = nn.TransformerEncoder(
            layer, int(h["n_layers"]), enable_nested_tensor=False
        )
        self.norm_out = nn.LayerNorm(dm)
        self.head = nn.Linear(dm, self.out_dim)
        self.canonical: Callable[[LoRABatch], list[Canonical]] = canonical_form

    @contextlib.contextmanager
    def caching(self) -> Iterator[None]:
        """Keep each LoRA's canonical form while in the context (a training run: every epoch
        and validation sees the same LoRAs), then drop them: a model serving new LoRAs keeps
        nothing."""
        saved = self.canonical
        if self.cache_bytes:
            self.canonical = CanonicalCache(self.cache_bytes)
        try:
            yield
        finally:
            self.canonical = saved

    def _tokens(self, batch: LoRABatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, d_model) tokens and the (B, T) mask of those that carry data."""
        forms = self.canonical(batch)
        # |delta W_i|_F = |s|: the layer's RMS entry from its singular values
        norms = torch.stack([torch.linalg.vector_norm(c.s, dim=1) for c in forms], dim=1)
        sizes = torch.tensor([math.sqrt(o * i) for o, i in self.inner.shapes], dtype=norms.dtype)
        rms = (norms / sizes.to(norms.device)).to(batch.dtype)  # (B, L)
        scales = self.scale_norm(log_scale(rms)[..., None])  # (B, L, 1)
        tokens = [self.cls.expand(len(batch), -1, -1), self.scale_in(scales) + self.layer_pos]
        n = 1 + len(self.spec.names)
        masks = [torch.ones(len(batch), n, dtype=torch.bool, device=batch.device)]
        for i, c in enumerate(forms):
            (o, n), k = self.inner.shapes[i], c.s.shape[1]
            rel = c.s / norms[:, i, None].clamp_min(EPS)
            value = torch.stack([rel, torch.log(rel.clamp_min(1e-6))], dim=-1).to(batch.dtype)
            pos = self.component_pos[
                torch.arange(k, device=batch.device).clamp_max(len(self.component_pos) - 1)
            ]
            a = self.left_in[i](c.left.mT.to(batch.dtype) * math.sqrt(o))
            b = self.right_in[i](c.right.mT.to(batch.dtype) * math.sqrt(n))
            token = a + b + self.value_in(value) + pos + self.layer_pos[i]
            if self.bilinear_in is not None:
                token = token + self.bilinear_in(a * b * rel[..., None].to(batch.dtype))
            tokens.append(token)
            masks.append(c.mask)
        return torch.cat(tokens, dim=1), torch.cat(masks, dim=1)

    def embed(self, batch: LoRABatch) -> torch.Tensor:
        """(B, d_model): the class token after the encoder, the input of the head."""
        batch = self.prepare(batch)
        tokens, mask = self._tokens(batch)
        z = self.transformer(tokens, src_key_padding_mask=~mask)
        return self.norm_out(z[:, 0])

    def readout(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(z)
