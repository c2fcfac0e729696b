"""Model names -> builders, ``build_model`` and ``model_cost``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from loralens.lora import LayerSpec, LoRA, LoRABatch, LoRALayer, collate
from loralens.models.base import LoLModel, as_spec
from loralens.models.glnet import GLNet
from loralens.models.mlp import SVDMLP, DenseMLP, FlatMLP, OAlignMLP

_REGISTRY: dict[str, type[LoLModel]] = {
    cls.name: cls for cls in (FlatMLP, OAlignMLP, SVDMLP, DenseMLP, GLNet)
}

#: Every model name accepted by :func:`build_model` (and ``loralens train --model``).
MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)


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
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    return cls(as_spec(like), out_dim, like=like, **hparams)


def rebuild_model(
    name: str, like: LoRABatch | LoRA | LayerSpec, out_dim: int, hparams: dict[str, Any]
) -> LoLModel:
    """:func:`build_model` from saved hyperparameters: any the save predates take the value the
    code of that time used (``saved_defaults``), so older runs keep their meaning."""
    cls = _REGISTRY.get(name)
    saved = cls.saved_defaults if cls is not None else {}
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


def _custom_flops() -> dict[Any, Any]:
    aten = torch.ops.aten
    out = {}
    for name, fn in (("linalg_qr", _qr_flops), ("_linalg_svd", _svd_flops)):
        op = getattr(aten, name, None)
        if op is not None:
            out[op] = fn
    return out


def model_cost(
    model: nn.Module, like: LoRABatch | LoRA | LayerSpec | None = None
) -> dict[str, int]:
    """Parameters and FLOPs of one forward pass on one LoRA, featurization included.

    FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and friends, 2 per
    multiply-add) on one LoRA shaped like ``like`` (default: the model's own spec), with QR and
    SVD added by their textbook estimates (2 m n^2 and 14 m n^2). Runs in eval mode, no grad.
    """
    spec_like = like if like is not None else model.spec
    p = next(model.parameters())
    batch = example_batch(spec_like, batch_size=1, dtype=p.dtype, device=p.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_custom_flops()) as fc:
            model(batch)
    finally:
        model.train(was_training)
    params = sum(t.numel() for t in model.parameters())
    return {"params": int(params), "flops": int(fc.get_total_flops())}
