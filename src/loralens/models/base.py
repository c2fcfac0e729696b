"""What every LoL model shares: the layer spec, complete hparams, input checks, normalization, heads."""

from __future__ import annotations

import contextlib
import math
import numbers
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from loralens.errors import InputError, LoRALensError, SettingsError
from loralens.lora import LayerSpec, LoRA, LoRABatch, collate, spec_of
from loralens.models.basis import UpdateBasis
from loralens.models.linear_base import KINDS, LinearBase

#: Smallest scale used before dividing or taking a log (a zero LoRA stays finite).
EPS = 1e-12

#: Largest width (hidden units, rank, k, ...) a hyperparameter may ask for.
MAX_WIDTH = 65536
#: Most layers (depth, blocks, transformer layers) a hyperparameter may ask for.
MAX_DEPTH = 64


class HParamError(SettingsError):
    """A model hyperparameter of the wrong type or out of its range (or an unknown one)."""


class ModelSizeError(LoRALensError, MemoryError, ValueError):
    """A model too large for the memory available, refused before anything is allocated (a
    ValueError too: the request, not the machine, is what to change)."""


@dataclass(frozen=True)
class HParam:
    """What one hyperparameter may be: ``kind`` "int", "float", "choice" or "ints" (a list of
    ints), within [lo, hi] (each entry for "ints") or one of ``choices``; None if ``nullable``."""

    kind: str
    lo: float = 0
    hi: float = MAX_WIDTH
    choices: tuple[str, ...] = ()
    nullable: bool = False

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not allowed, or None."""
        if value is None:
            return None if self.nullable else "must be given (not null)"
        if self.kind == "choice":
            return None if value in self.choices else f"must be one of {list(self.choices)}"
        if self.kind == "ints":
            if not isinstance(value, (list, tuple)):
                return f"must be a list of integers in [{self.lo:g}, {self.hi:g}]"
            bad = [v for v in value if self._number_problem(v, int)]
            return (
                f"has entries {bad[:5]} outside integers in [{self.lo:g}, {self.hi:g}]"
                if bad
                else None
            )
        return self._number_problem(value, int if self.kind == "int" else float)

    def _number_problem(self, value: Any, kind: type) -> str | None:
        ok = isinstance(value, numbers.Integral if kind is int else numbers.Real)
        if ok and not isinstance(value, bool) and self.lo <= value <= self.hi:  # NaN: False
            return None
        what = "an integer" if kind is int else "a number"
        return f"must be {what} in [{self.lo:g}, {self.hi:g}]"


def check_hparams(
    owner: str, schema: dict[str, HParam], values: dict[str, Any], noun: str = "hyperparameter"
) -> None:
    """Refuse (:class:`HParamError`) ``values`` that ``schema`` does not know, or whose type or
    range is wrong: a width of 1e7 must fail here, not allocate. ``owner`` starts the message."""
    if not isinstance(values, dict):
        raise HParamError(f"{owner}: {noun}s must be a mapping, got {values!r:.80}")
    unknown = sorted(set(values) - set(schema), key=str)
    if unknown:
        raise HParamError(f"{owner} has no {noun}(s) {unknown}; it takes {sorted(schema)}")
    for key, value in values.items():
        problem = schema[key].problem(value)
        if problem:
            raise HParamError(f"{owner}: {noun} {key} {problem}, got {value!r:.80}")


def available_bytes() -> int:
    """Memory available now (MemAvailable), else the machine's physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


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


#: Hyperparameters of every model: name -> (what it may be, default, value for runs saved
#: before it existed). ``linear_base``: see :mod:`loralens.models.linear_base` (training fits
#: it; ``loralens train --linear-base``).
#: ``basis``: the (k_out, k_in) of every layer's :class:`~loralens.models.basis.UpdateBasis`,
#: flattened, or None for a model that reads the factors as they are.
COMMON: dict[str, tuple[HParam, Any, Any]] = {
    "linear_base": (HParam("choice", choices=KINDS), "none", "none"),
    "basis": (HParam("ints", nullable=True), None, None),
}


class LoLModel(nn.Module):
    """Base of every model: ``model(batch) -> (B, out_dim)``.

    ``.name``, ``.spec`` and ``.hparams`` (complete and JSON-serializable) rebuild the model:
    ``build_model(m.name, like=m.spec, out_dim=m.out_dim, **m.hparams)``; then
    ``load_state_dict`` restores everything learned or chosen from data.
    """

    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    #: What each hyperparameter may be (the keys of ``defaults``): checked on every build.
    schema: ClassVar[dict[str, HParam]] = {}
    #: Hyperparameters added after runs were saved, with the value older code used: a saved
    #: config that lacks one rebuilds with this, not with today's default.
    saved_defaults: ClassVar[dict[str, Any]] = {}
    #: State-dict prefixes renamed since runs were saved (old -> new): checkpoints load either.
    renamed: ClassVar[dict[str, str]] = {}
    #: True where the output is provably unchanged by per-layer GL(r) / O(r) transforms.
    gl_invariant: ClassVar[bool] = False
    o_invariant: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every model takes the hyperparameters all models share (``COMMON``)."""
        super().__init_subclass__(**kwargs)
        cls.schema = {**cls.schema, **{k: s for k, (s, _, _) in COMMON.items()}}
        cls.defaults = {**cls.defaults, **{k: d for k, (_, d, _) in COMMON.items()}}
        cls.saved_defaults = {**{k: o for k, (_, _, o) in COMMON.items()}, **cls.saved_defaults}

    def __init__(self, spec: LayerSpec, out_dim: int, hparams: dict[str, Any]):
        super().__init__()
        fitted = hparams.get("basis")
        if isinstance(fitted, UpdateBasis):  # a basis fitted on the training LoRAs
            hparams = {**hparams, "basis": UpdateBasis.flat(fitted.sizes)}
        check_hparams(f"model {self.name!r}", self.schema, hparams)
        if int(out_dim) < 1:
            raise SettingsError(f"out_dim must be >= 1, got {out_dim}")
        self.spec = spec
        self.out_dim = int(out_dim)
        self.hparams = {**self.defaults, **hparams}
        self.basis: UpdateBasis | None = None
        #: the layout the network reads: the projected layers (k_out, k_in) with a basis
        self.inner = spec
        self._projected = False
        if self.hparams["basis"] is not None:
            pairs = UpdateBasis.pairs(self.hparams["basis"])
            if len(pairs) != len(spec.names) or len(self.hparams["basis"]) % 2:
                raise SettingsError(
                    f"basis: {len(self.hparams['basis'])} sizes for {len(spec.names)} layers "
                    "(a k_out and a k_in per layer)"
                )
            if isinstance(fitted, UpdateBasis):
                self.basis = fitted
            else:
                self.basis = UpdateBasis(spec.shapes, pairs)
            self.inner = LayerSpec(spec.names, tuple(pairs), spec.ranks)
        if self.hparams["linear_base"] != "none":
            self.linear_base = LinearBase(self.hparams["linear_base"], self.inner, self.out_dim)
            self.gate = nn.Parameter(torch.ones(()))

    def extra_repr(self) -> str:
        return f"name={self.name!r}, layers={len(self.spec.names)}, out_dim={self.out_dim}"

    def forward(self, batch: LoRABatch) -> torch.Tensor:
        inner = self.prepare(batch)  # projected once for the network and the linear base
        with self.given_prepared():
            return self.output(inner, self.embed(inner))

    @contextlib.contextmanager
    def given_prepared(self) -> Iterator[None]:
        """A context in which batches handed to the model are already :meth:`prepare`'d
        (projected onto its basis): a caller that projects once, or keeps projected LoRAs."""
        before, self._projected = self._projected, True
        try:
            yield
        finally:
            self._projected = before

    def output(self, batch: LoRABatch, z: torch.Tensor) -> torch.Tensor:
        """The (B, out_dim) output for ``batch`` whose embeddings are ``z``: the head's readout,
        or with a linear base, base(ΔW) + gate * readout (``embed`` checks the batch; the base
        reads it cast like the model)."""
        out = self.readout(z)
        if self.hparams["linear_base"] == "none":
            return out
        return self.linear_base(self.prepare(batch)).to(out.dtype) + self.gate.to(out.dtype) * out

    def caching(self) -> contextlib.AbstractContextManager:
        """A context in which the model may keep what it derives from each LoRA alone, for
        reuse (a training run sees the same LoRAs every epoch); dropped on exit. Nothing here;
        ``w2t`` keeps canonical forms."""
        return contextlib.nullcontext()

    def embed(self, batch: LoRABatch) -> torch.Tensor:
        """(B, D) features each LoRA is represented by when the head reads them (GL-net: every
        layer's invariant U' V'^T and log scale; the MLPs: their normalized inputs), invariant
        wherever the model is; ``output(batch, embed(batch))`` is the output."""
        raise NotImplementedError

    def readout(self, z: torch.Tensor) -> torch.Tensor:
        """The head: (B, D) embeddings -> (B, out_dim) outputs."""
        raise NotImplementedError

    @classmethod
    def saved_key(cls, key: str) -> str:
        """Today's name of a state_dict entry saved under ``key`` (see ``renamed``)."""
        for old, new in cls.renamed.items():
            if key.startswith(old):
                return new + key[len(old) :]
        return key

    def _param(self) -> torch.Tensor:
        return next(self.parameters())

    def check(self, batch: LoRABatch | LoRA) -> LoRABatch:
        """``batch`` checked against the model's layers and cast to its device and dtype (the
        factors as they are, not projected)."""
        return self._fit(batch, self.spec)

    def prepare(self, batch: LoRABatch | LoRA) -> LoRABatch:
        """What the network reads: :meth:`check`, then the factors on the model's basis (where
        it has one; inside :meth:`given_prepared` the batch is taken as projected already)."""
        if self._projected:
            return self._fit(batch, self.inner)
        batch = self.check(batch)
        return batch if self.basis is None else self.basis.project(batch)

    def _fit(self, batch: LoRABatch | LoRA, spec: LayerSpec) -> LoRABatch:
        if isinstance(batch, LoRA):
            batch = collate([batch])
        if not isinstance(batch, LoRABatch):
            raise TypeError(f"{self.name}: expected a LoRABatch, got {type(batch).__name__}")
        problem = spec.describe_mismatch(batch.spec)
        if problem:
            raise InputError(
                f"model {self.name!r} was built for {len(spec.names)} other layers; "
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
