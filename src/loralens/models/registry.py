"""The registry: model names -> classes and training defaults; ``build_model``, ``model_cost``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from loralens.errors import SettingsError
from loralens.lora import LayerSpec, LoRA, LoRABatch, LoRALayer, collate
from loralens.models import base
from loralens.models.base import HParam, LoLModel, ModelSizeError, as_spec
from loralens.models.glnet import GLNet
from loralens.models.mlp import SVDMLP, DenseMLP, FlatMLP, OAlignMLP
from loralens.models.w2t import W2T

#: Training defaults shared by every model (``loralens train`` needs no flags); an entry of the
#: registry overrides what its model trains better with.
TRAINING_DEFAULTS: dict[str, Any] = {
    "epochs": 60,
    "lr": 1e-3,
    "batch_size": 32,
    "weight_decay": 1e-4,
    "patience": 12,
    "grad_clip": 1.0,
}
#: What each training setting may be.
TRAINING_SCHEMA: dict[str, HParam] = {
    "epochs": HParam("int", 1, 10**6),
    "lr": HParam("float", 0, 1e3),
    "batch_size": HParam("int", 1, 2**20),
    "weight_decay": HParam("float", 0, 1e3),
    "patience": HParam("int", 1, 10**6),
    "grad_clip": HParam("float", 0, 1e12),
}


def _entry(cls: type[LoLModel], **training: Any) -> tuple[str, type[LoLModel], dict[str, Any]]:
    unknown = sorted(set(training) - set(TRAINING_DEFAULTS))
    if unknown:
        raise SettingsError(f"{cls.name}: no training setting(s) {unknown}")
    return cls.name, cls, {**TRAINING_DEFAULTS, **training}


# name -> (class, training defaults), in the order models are listed and benchmarked
_REGISTRY: dict[str, tuple[type[LoLModel], dict[str, Any]]] = {
    name: (cls, training)
    for name, cls, training in (
        _entry(FlatMLP, weight_decay=1e-3),
        _entry(OAlignMLP, weight_decay=1e-3),
        _entry(SVDMLP, lr=3e-3),
        _entry(DenseMLP, weight_decay=1e-3),
        _entry(GLNet),
        _entry(W2T, weight_decay=1e-2),
    )
}

#: Every model name accepted by :func:`build_model` (and ``loralens train --model``).
MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def _model_class(name: str) -> type[LoLModel]:
    if name not in _REGISTRY:
        raise SettingsError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    return _REGISTRY[name][0]


def training_defaults(name: str) -> dict[str, Any]:
    """The training settings (epochs, lr, batch_size, weight_decay, patience, grad_clip) that
    model ``name`` trains with unless told otherwise."""
    _model_class(name)
    return dict(_REGISTRY[name][1])


def check_hparams(name: str, hparams: dict[str, Any]) -> None:
    """Refuse an unknown model, unknown hyperparameters, or values of the wrong type or out of
    range (:class:`~loralens.models.base.HParamError`), before anything is built."""
    base.check_hparams(f"model {name!r}", _model_class(name).schema, hparams)


def check_training(settings: dict[str, Any]) -> None:
    """Refuse training settings (``TRAINING_SCHEMA``; None = the default) of the wrong type or
    out of range (:class:`~loralens.models.base.HParamError`)."""
    given = {k: v for k, v in settings.items() if v is not None}
    base.check_hparams("training", TRAINING_SCHEMA, given, noun="setting")


def state_shapes(
    name: str,
    like: LoRABatch | LoRA | LayerSpec,
    out_dim: int,
    hparams: dict[str, Any],
    *,
    saved: bool = True,
) -> dict[str, torch.Tensor]:
    """Every state_dict entry of ``rebuild_model(name, like, out_dim, hparams)`` (``saved``:
    hyperparameters as a run saved them) or of ``build_model`` (a model about to be made) as a
    tensor on the meta device (shape and dtype, no data): nothing is allocated."""
    with torch.device("meta"):
        if saved:
            model = rebuild_model(name, as_spec(like), out_dim, hparams)
        else:
            model = build_model(name, as_spec(like), out_dim, **hparams)
    return dict(model.state_dict())


def saved_key(name: str, key: str) -> str:
    """Today's name of the state_dict entry ``key`` of a checkpoint of model ``name``."""
    return _model_class(name).saved_key(key)


def check_fits(
    name: str, like: LoRABatch | LoRA | LayerSpec, out_dim: int, hparams: dict[str, Any]
) -> None:
    """Refuse (:class:`~loralens.models.base.ModelSizeError`) a model whose weights, gradients
    and two Adam moments would not fit in the memory available now; builds nothing."""
    state = state_shapes(name, like, out_dim, hparams, saved=False).values()
    count = sum(t.numel() for t in state)
    weights = sum(t.numel() * t.element_size() for t in state)
    limit = base.available_bytes()
    if 4 * weights > limit:
        raise ModelSizeError(
            f"model {name!r} with hyperparameters {hparams} has {count:,} weights, "
            f"{weights / 2**30:.1f} GiB (about {4 * weights / 2**30:.1f} GiB to train with Adam), "
            f"more than the {limit / 2**30:.1f} GiB of memory available: use smaller widths"
        )


def build_model(
    name: str, like: LoRABatch | LoRA | LayerSpec, out_dim: int, **hparams: Any
) -> LoLModel:
    """Build the model ``name`` for LoRAs shaped like ``like``, with ``out_dim`` outputs.

    ``like`` is a LoRABatch, a LoRA or a LayerSpec (layer names and shapes; its ranks set
    defaults such as ``mlp``'s widths and ``mlp-svd``'s k). ``model(batch)`` returns
    (len(batch), out_dim). The model's ``.name``, ``.spec``, ``.out_dim`` and ``.hparams``
    rebuild it: ``build_model(m.name, like=m.spec, out_dim=m.out_dim, **m.hparams)``, then
    ``load_state_dict``. ``mlp-oalign`` takes ``template=`` (a LoRA); without it the template is
    picked from ``like`` when that is a batch, else left zero for ``load_state_dict`` to fill.
    """
    return _model_class(name)(as_spec(like), out_dim, like=like, **hparams)


def rebuild_model(
    name: str, like: LoRABatch | LoRA | LayerSpec, out_dim: int, hparams: dict[str, Any]
) -> LoLModel:
    """:func:`build_model` from saved hyperparameters: any the save predates take the value the
    code of that time used (``saved_defaults``), so older runs keep their meaning."""
    saved = _model_class(name).saved_defaults
    return build_model(name, like, out_dim, **{**saved, **hparams})


def example_batch(
    like: LoRABatch | LoRA | LayerSpec,
    *,
    batch_size: int = 1,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    seed: int = 0,
) -> LoRABatch:
    """A random batch with ``like``'s layers and ranks (gaussian factors at LoRA-like scale)."""
    if isinstance(like, LoRABatch):
        return like.select(list(range(min(batch_size, len(like))))).to(device=device, dtype=dtype)
    if isinstance(like, LoRA):
        return collate([like] * batch_size).to(device=device, dtype=dtype)
    spec = as_spec(like)
    g = torch.Generator().manual_seed(seed)
    loras = []
    for _ in range(batch_size):
        layers = [
            LoRALayer(
                name,
                torch.randn(o, r, generator=g) * 1e-2,
                torch.randn(i, r, generator=g) * 1e-2,
            )
            for name, (o, i), r in zip(spec.names, spec.shapes, spec.ranks)
        ]
        loras.append(LoRA(layers=layers))
    return collate(loras).to(device=device, dtype=dtype)


def _qr_flops(a_shape, *args, out_shape=None, **kwargs) -> int:
    *batch, m, n = a_shape
    b = 1
    for x in batch:
        b *= x
    k = min(m, n)
    return b * 2 * m * n * k  # Householder QR, about 2 m n^2 for m >= n


def _svd_flops(a_shape, *args, out_shape=None, **kwargs) -> int:
    *batch, m, n = a_shape
    b = 1
    for x in batch:
        b *= x
    k = min(m, n)
    return b * 14 * max(m, n) * k * k  # Golub-Van Loan estimate for a thin SVD


def _eigh_flops(a_shape, *args, out_shape=None, **kwargs) -> int:
    *batch, n, _ = a_shape
    b = 1
    for x in batch:
        b *= x
    return b * 9 * n**3  # Golub-Van Loan estimate for a symmetric eigendecomposition


def custom_flops() -> dict[Any, Any]:
    aten = torch.ops.aten
    out = {}
    for name, fn in (
        ("linalg_qr", _qr_flops),
        ("_linalg_svd", _svd_flops),
        ("_linalg_eigh", _eigh_flops),
    ):
        op = getattr(aten, name, None)
        if op is not None:
            out[op] = fn
    return out


def model_cost(
    model: nn.Module, like: LoRABatch | LoRA | LayerSpec | None = None
) -> dict[str, int]:
    """Parameters and FLOPs of one forward pass on one LoRA, featurization included.

    FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and friends, 2 per
    multiply-add) on one LoRA shaped like ``like`` (default: the model's own spec), with QR, SVD
    and symmetric eigendecompositions added by their textbook estimates (2 m n^2, 14 m n^2,
    9 n^3). Runs in eval mode, no grad.
    """
    spec_like = like if like is not None else model.spec
    p = next(model.parameters())
    batch = example_batch(spec_like, batch_size=1, dtype=p.dtype, device=p.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=custom_flops()) as fc:
            model(batch)
    finally:
        model.train(was_training)
    params = sum(t.numel() for t in model.parameters())
    return {"params": int(params), "flops": int(fc.get_total_flops())}
