"""Batched LoRA finetuning of the digits UNet: K LoRAs train at once over one shared frozen UNet.

Every target linear layer (``to_q``/``to_v`` by default) is a
:class:`~loralens.zoo.batched_lora.BatchedLoRALinear` that runs the base matmul once for all
LoRAs and each LoRA's low-rank path with a batched matmul; each LoRA has its own data stream,
learning rate, step count, gradient accumulation, AdamW state and init seed. A LoRA that has
finished its steps drops out of the batch. With a group of one, this is plain PEFT training
(tests check that).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from loralens.zoo.batched_lora import BatchedAdamW, BatchedLoRALinear, set_active
from loralens.zoo.digits.model import diffusion_loss


@dataclass
class FinetuneJob:
    """One LoRA's finetuning: its images, their prompt embeddings and its hyperparameters."""

    images: torch.Tensor  # (n, 1, 8, 8)
    cond: torch.Tensor  # (n, L, D) prompt embedding per image
    lr: float
    steps: int
    accum: int
    micro: int  # images per micro-step
    seed: int  # data order, noise and timesteps
    weight_decay: float = 1e-2


def finetune(
    model: nn.Module, mods: Mapping[str, BatchedLoRALinear], scheduler, jobs: Sequence[FinetuneJob]
) -> list[float]:
    """Finetune the K LoRAs of ``model`` together; returns each LoRA's mean loss of its last steps.

    LoRA k makes ``steps * accum`` micro-steps of ``micro`` images (sampled with replacement from
    its images by its own generator), AdamW-updates every ``accum`` micro-steps with a constant
    learning rate, and leaves the batch when done.
    """
    K = len(jobs)
    gens = [torch.Generator().manual_seed(j.seed) for j in jobs]
    total = torch.tensor([j.steps * j.accum for j in jobs])
    accum = torch.tensor([j.accum for j in jobs])
    lr = torch.tensor([j.lr for j in jobs], dtype=torch.float32)
    wd = torch.tensor([j.weight_decay for j in jobs], dtype=torch.float32)
    params = [p for m in mods.values() for p in (m.A, m.B)]
    opt = BatchedAdamW(params)
    count = torch.zeros(K, dtype=torch.long)
    tail: list[list[float]] = [[] for _ in jobs]
    T = scheduler.config.num_train_timesteps
    model.train()
    for t in range(int(total.max())):
        live = torch.nonzero(t < total).flatten()
        xs, cs, ns, ts = [], [], [], []
        for k in live.tolist():
            j, g = jobs[k], gens[k]
            idx = torch.randint(len(j.images), (j.micro,), generator=g)
            xs.append(j.images[idx])
            cs.append(j.cond[idx])
            ns.append(torch.randn(xs[-1].shape, generator=g))
            ts.append(torch.randint(0, T, (j.micro,), generator=g))
        set_active(mods, live)
        per = diffusion_loss(
            model, scheduler, torch.cat(xs), torch.cat(cs), torch.cat(ns), torch.cat(ts)
        )
        per_lora = per.view(len(live), -1).mean(1)
        (per_lora / accum[live]).sum().backward()
        vals = per_lora.detach().tolist()
        for i, k in enumerate(live.tolist()):
            if t >= total[k] - max(10, int(total[k]) // 5):
                tail[k].append(vals[i])
        update = torch.zeros(K, dtype=torch.bool)
        update[live] = ((t + 1) % accum[live]) == 0
        if bool(update.any()):
            count = count + update.long()
            opt.step(update, lr, wd, count)
    set_active(mods, None)
    model.eval()
    return [float(np.mean(x)) if x else float("nan") for x in tail]
