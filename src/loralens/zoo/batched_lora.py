"""Finetune K LoRAs at once over one shared frozen base model (every preset's fast path).

Each target ``nn.Linear`` is wrapped in a :class:`BatchedLoRALinear` holding K stacked LoRAs;
the input's batch axis carries the K LoRAs' examples, LoRA-major, so one forward and backward
pass trains all of them. :class:`BatchedAdamW` gives each LoRA its own AdamW state, learning
rate, weight decay and step count. :class:`PeftSaver` copies each trained LoRA into a PEFT
model, checks PEFT's forward against the batched one and saves it with PEFT's ``save_pretrained``.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loralens.errors import SettingsError
from loralens.zoo.preset import derive_seed


class BatchedLoRALinear(nn.Module):
    """K LoRAs on one frozen ``nn.Linear``: y_k = W x_k + s_k B_k A_k dropout_k(x_k).

    ``A`` is (K, r, in) and ``B`` (K, out, r), as PEFT's lora_A/lora_B weights; ranks below r
    are zero-padded (zero rows of A and zero columns of B stay zero under training, exactly).
    The input's batch axis holds the examples of the LoRAs in ``active`` (all K when None),
    LoRA-major. Dropout masks come from one generator per LoRA, drawn at ``mask_len`` positions
    and cut to the input's length, so a LoRA's masks depend on nothing but its own seed.
    """

    def __init__(self, base: nn.Linear, K: int, r: int):
        super().__init__()
        self.base = base
        self.A = nn.Parameter(torch.zeros(K, r, base.in_features))
        self.B = nn.Parameter(torch.zeros(K, base.out_features, r))
        self.register_buffer("scale", torch.ones(K))
        self.register_buffer("dropout", torch.zeros(K))
        self.generators: list[torch.Generator] = []
        self.mask_len: int | None = None
        self.active: torch.Tensor | None = None

    def _dropout_masks(self, shape: torch.Size, ks: list[int]) -> torch.Tensor:
        """(G, b*T, in) inverted-dropout masks for the LoRAs ``ks``."""
        G = len(ks)
        b, t, n = shape[0] // G, shape[1], shape[2]
        masks = []
        for k in ks:
            p = float(self.dropout[k])
            noise = torch.rand(b, self.mask_len or t, n, generator=self.generators[k])[:, :t]
            masks.append((noise >= p).float() / (1 - p))
        return torch.stack(masks).reshape(G, b * t, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        idx = self.active
        if idx is None:
            A, B, s, ks = self.A, self.B, self.scale, list(range(self.A.shape[0]))
        else:
            A, B, s, ks = self.A[idx], self.B[idx], self.scale[idx], idx.tolist()
        G = A.shape[0]
        xk = x.reshape(G, -1, x.shape[-1])
        if self.training and self.generators and bool((self.dropout[ks] > 0).any()):
            xk = xk * self._dropout_masks(x.shape, ks)
        d = torch.bmm(torch.bmm(xk, A.transpose(1, 2)), B.transpose(1, 2)) * s.view(G, 1, 1)
        return y + d.reshape(y.shape)


def target_names(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """Full names of the linear layers of ``model`` whose last name part is in ``targets``."""
    wanted = set(targets)
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in wanted
    ]


def wrap_targets(
    model: nn.Module,
    targets: Sequence[str],
    ranks: Sequence[int],
    alphas: Sequence[float],
    init_seeds: Sequence[int],
    dropouts: Sequence[float] | None = None,
    mask_len: int | None = None,
) -> tuple[nn.Module, dict[str, BatchedLoRALinear]]:
    """A copy of ``model`` sharing its frozen weights, with K LoRAs on every target linear.

    Targets are the linear layers whose last name part is in ``targets``. A is initialized as
    PEFT does (kaiming-uniform with a=sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in))) from each LoRA's
    init seed and the layer name; B is zero; scale is alpha / rank.
    """
    K, r = len(ranks), max(ranks)
    memo = {id(p): p for p in model.parameters()}  # deep-copy the module tree, not the weights
    model = copy.deepcopy(model, memo)
    mods: dict[str, BatchedLoRALinear] = {}
    for name in target_names(model, targets):
        mod = model.get_submodule(name)
        bl = BatchedLoRALinear(mod, K, r)
        bound = 1.0 / math.sqrt(mod.in_features)
        for k in range(K):
            g = torch.Generator().manual_seed(derive_seed(init_seeds[k], name))
            bl.A.data[k, : ranks[k]] = (
                torch.rand(ranks[k], mod.in_features, generator=g) * 2 - 1
            ) * bound
            bl.scale[k] = alphas[k] / ranks[k]
        if dropouts is not None:
            bl.dropout.copy_(torch.tensor(dropouts, dtype=bl.dropout.dtype))
            bl.generators = [
                torch.Generator().manual_seed(derive_seed(s, name, "dropout")) for s in init_seeds
            ]
            bl.mask_len = mask_len
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, bl)
        mods[name] = bl
    if not mods:
        raise SettingsError(f"no linear layer named {sorted(set(targets))} in the base model")
    return model, mods


def set_active(mods: Mapping[str, BatchedLoRALinear], active: torch.Tensor | None) -> None:
    """Route the next inputs to the LoRAs in ``active`` (all when None)."""
    for m in mods.values():
        m.active = active


class BatchedAdamW:
    """AdamW (as ``torch.optim.AdamW``) over K-stacked LoRA factors: per-LoRA lr, weight decay
    and step count."""

    def __init__(self, params: list[nn.Parameter], betas=(0.9, 0.999), eps=1e-8):
        self.params = params
        self.b1, self.b2, self.eps = betas[0], betas[1], eps
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self, update: torch.Tensor, lr: torch.Tensor, wd: torch.Tensor, count: torch.Tensor):
        """Update the LoRAs where ``update`` (K,) is true; ``count`` is their new step count."""
        K = update.shape[0]
        c1 = (1 - self.b1 ** count.clamp(min=1)).view(K, 1, 1)
        c2 = (1 - self.b2 ** count.clamp(min=1)).view(K, 1, 1)
        sel = update.view(K, 1, 1)
        for p, m, v in zip(self.params, self.m, self.v):
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            m.copy_(torch.where(sel, self.b1 * m + (1 - self.b1) * g, m))
            v.copy_(torch.where(sel, self.b2 * v + (1 - self.b2) * g * g, v))
            step = (m / c1) / ((v / c2).sqrt() + self.eps)
            new = p * (1 - (lr * wd).view(K, 1, 1)) - lr.view(K, 1, 1) * step
            p.copy_(torch.where(sel, new, p))
            if p.grad is not None:
                p.grad.masked_fill_(sel, 0.0)


def peft_config(rank: int, alpha: float, targets: Sequence[str]) -> Any:
    """The ``peft.LoraConfig`` of one zoo LoRA (no dropout: it is set on the saved config only)."""
    from peft import LoraConfig

    return LoraConfig(
        r=int(rank), lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, bias="none"
    )


@contextlib.contextmanager
def _quiet_peft():
    """Silence PEFT's warnings that say nothing about our adapters."""
    with warnings.catch_warnings():
        # PEFT reads a deprecated transformers attribute
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        # a base saved in a local folder (e.g. ``base/unet``) PEFT cannot look up: nothing to check
        warnings.filterwarnings("ignore", message=".*config.*base/unet.*")
        warnings.filterwarnings("ignore", message=".*Could not find a config file.*")
        yield


class PeftSaver:
    """Saves LoRA ``k`` of a batched model as a PEFT adapter, after checking that PEFT's forward
    equals the batched one (so the saved file is the LoRA that was trained and labelled).

    One PEFT model of ``base`` is kept per (rank, alpha); ``base_name``, when given, is written as
    the adapter's ``base_model_name_or_path``.
    """

    def __init__(self, base: nn.Module, targets: Sequence[str], base_name: str | None = None):
        self.base = base
        self.targets = list(targets)
        self.base_name = base_name
        self._models: dict[tuple[int, float], Any] = {}

    def peft_model(self, rank: int, alpha: float) -> Any:
        """The cached PEFT model of the base for LoRAs of this rank and alpha."""
        key = (int(rank), float(alpha))
        if key not in self._models:
            from peft import get_peft_model

            with _quiet_peft():
                pm = get_peft_model(
                    copy.deepcopy(self.base), peft_config(rank, alpha, self.targets)
                )
            if self.base_name is not None:
                pm.peft_config["default"].base_model_name_or_path = self.base_name
            self._models[key] = pm.eval()
        return self._models[key]

    @torch.no_grad()
    def save(
        self,
        mods: Mapping[str, BatchedLoRALinear],
        k: int,
        rank: int,
        alpha: float,
        out_dir: Path,
        forward: Callable[[nn.Module], torch.Tensor],
        want: torch.Tensor,
        dropout: float = 0.0,
    ) -> None:
        """Copy LoRA ``k`` of ``mods`` into PEFT, require ``forward(peft_model)`` to equal ``want``
        (LoRA k's batched output on the same input), then ``save_pretrained(out_dir)``."""
        pm = self.peft_model(rank, alpha)
        pm.peft_config["default"].lora_dropout = float(dropout)
        inner = pm.base_model.model
        for name, bl in mods.items():
            layer = inner.get_submodule(name)
            layer.lora_A["default"].weight.copy_(bl.A[k, :rank])
            layer.lora_B["default"].weight.copy_(bl.B[k, :, :rank])
        err = float((forward(pm) - want).abs().max())
        if not err <= 1e-4 * max(1.0, float(want.abs().max())):
            raise RuntimeError(
                f"LoRA {Path(out_dir).name}: batched forward differs from PEFT's by {err:.3g}"
            )
        with _quiet_peft():
            pm.save_pretrained(str(out_dir))
