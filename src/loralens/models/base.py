"""What every LoL model shares: the layer spec, complete hparams, input checks, normalization, heads."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

from loralens.lora import LayerSpec, LoRA, LoRABatch, collate, spec_of

#: Smallest scale used before dividing or taking a log (a zero LoRA stays finite).
EPS = 1e-12


def as_spec(like: Any) -> LayerSpec:
    """The LayerSpec of a LoRABatch, a LoRA, a LayerSpec or its ``to_dict()`` form."""
    if isinstance(like, LayerSpec):
        return like
    if isinstance(like, LoRABatch):
        return like.spec
    if isinstance(like, LoRA):
        return spec_of(like)
    if isinstance(like, dict):
        return LayerSpec.from_dict(like)
    raise TypeError(f"`like` must be a LoRABatch, a LoRA or a LayerSpec, got {type(like).__name__}")


class RunningStandardize(nn.Module):
    """Per-feature standardization with statistics kept in buffers (saved in the state_dict).

    In training mode each batch updates the running mean and mean square (a plain average over
    the first ``1/momentum`` batches, then an exponential average) and the *running* statistics
    normalize the output, so an output never depends on the rest of its batch and a batch of one
    works. Before any training the map is the identity. It only ever sees invariant features, so
    it keeps every invariance of the model.
    """

    def __init__(self, shape: int | tuple[int, ...], momentum: float = 0.05, eps: float = 1e-5):
        super().__init__()
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        self.momentum, self.eps = momentum, eps
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("sq", torch.ones(shape))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                m = max(1.0 / (int(self.count) + 1), self.momentum)
                xd = x.detach().to(self.mean.dtype)
                self.mean.lerp_(xd.mean(dim=0), m)
                self.sq.lerp_((xd * xd).mean(dim=0), m)
                self.count += 1
        var = (self.sq - self.mean * self.mean).clamp_min(0)
        return (x - self.mean.to(x.dtype)) * torch.rsqrt(var + self.eps).to(x.dtype)


def mlp(in_dim: int, out_dim: int, hidden: int, depth: int, dropout: float) -> nn.Sequential:
    """``depth`` hidden layers of width ``hidden`` (GELU, optional dropout), then a linear output."""
    layers: list[nn.Module] = []
    d = in_dim
    for _ in range(depth):
        layers += [nn.Linear(d, hidden), nn.GELU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        d = hidden
    layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)


def log_scale(x: torch.Tensor) -> torch.Tensor:
    """log of a non-negative scale, finite at zero."""
    return torch.log(x.clamp_min(EPS))


class LoLModel(nn.Module):
    """Base of every model: ``model(batch) -> (B, out_dim)``.

    ``.name``, ``.spec`` and ``.hparams`` (complete and JSON-serializable) rebuild the model:
    ``build_model(m.name, like=m.spec, out_dim=m.out_dim, **m.hparams)``; then
    ``load_state_dict`` restores everything learned or chosen from data.
    """

    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    #: Hyperparameters added after runs were saved, with the value older code used: a saved
    #: config that lacks one rebuilds with this, not with today's default.
    saved_defaults: ClassVar[dict[str, Any]] = {}
    #: True where the output is provably unchanged by per-layer GL(r) / O(r) transforms.
    gl_invariant: ClassVar[bool] = False
    o_invariant: ClassVar[bool] = False

    def __init__(self, spec: LayerSpec, out_dim: int, hparams: dict[str, Any]):
        super().__init__()
        unknown = sorted(set(hparams) - set(self.defaults))
        if unknown:
            raise ValueError(
                f"model {self.name!r} has no hyperparameter(s) {unknown}; "
                f"it takes {sorted(self.defaults)}"
            )
        if int(out_dim) < 1:
            raise ValueError(f"out_dim must be >= 1, got {out_dim}")
        self.spec = spec
        self.out_dim = int(out_dim)
        self.hparams = {**self.defaults, **hparams}

    def extra_repr(self) -> str:
        return f"name={self.name!r}, layers={len(self.spec.names)}, out_dim={self.out_dim}"

    def _param(self) -> torch.Tensor:
        return next(self.parameters())

    def prepare(self, batch: LoRABatch | LoRA) -> LoRABatch:
        """Check ``batch`` against the model's layers; cast it to the model's device and dtype."""
        if isinstance(batch, LoRA):
            batch = collate([batch])
        if not isinstance(batch, LoRABatch):
            raise TypeError(f"{self.name}: expected a LoRABatch, got {type(batch).__name__}")
        problem = self.spec.describe_mismatch(batch.spec)
        if problem:
            raise ValueError(
                f"model {self.name!r} was built for {len(self.spec.names)} other layers; "
                f"this batch does not fit: {problem}"
            )
        p = self._param()
        if batch.device != p.device or batch.dtype != p.dtype:
            batch = batch.to(device=p.device, dtype=p.dtype)
        return batch


def layer_rms(
    batch: LoRABatch, grams: tuple[torch.Tensor, torch.Tensor] | None = None
) -> torch.Tensor:
    """(B, L) RMS entry of every delta W, |U V^T|_F / sqrt(out * in), from the small factors
    (or from their stacked Grams U^T U, V^T V where the caller has them already)."""
    from loralens.features import delta_norms, norms_from_grams

    n = torch.tensor(
        [math.sqrt(o * i) for o, i in batch.shapes], dtype=torch.float64, device=batch.device
    )
    norms = delta_norms(batch) if grams is None else norms_from_grams(*grams)
    return norms / n.to(norms.dtype)
