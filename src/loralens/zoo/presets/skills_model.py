"""The skills-lm base model: a small character-level Llama, its losses, and its pretraining.

Only answer tokens carry loss (``mask``); greedy decoding is exact-matched by teacher forcing:
greedy decoding produces the answer (and then stops) iff the argmax at every answer position,
given the correct prefix, is the correct token, so one forward pass scores a whole batch.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from loralens.zoo.preset import derive_seed
from loralens.zoo.presets import skills_data as data
from loralens.zoo.schedule import warmup_cosine

SIZES: dict[str, dict[str, int]] = {
    # hidden, layers, heads, ffn, pretraining steps, pretraining batch
    "small": {"hidden": 64, "layers": 3, "heads": 4, "ffn": 192, "steps": 2500, "batch": 64},
    "tiny": {"hidden": 32, "layers": 2, "heads": 2, "ffn": 64, "steps": 150, "batch": 32},
}


def build_base_config(size: str) -> Any:
    """The ``LlamaConfig`` of a base of this ``size`` over the character vocabulary."""
    from transformers import LlamaConfig

    s = SIZES[size]
    return LlamaConfig(
        vocab_size=len(data.VOCAB),
        hidden_size=s["hidden"],
        intermediate_size=s["ffn"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["heads"],
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        pad_token_id=data.PAD_ID,
        bos_token_id=data.STOI[data.EOS],
        eos_token_id=data.STOI[data.EOS],
    )


def trim_padding(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the padding columns every example of the batch has."""
    t = int((ids != data.PAD_ID).sum(1).max())
    return ids[:, :t], mask[:, :t]


def token_losses(model, ids: torch.Tensor, mask: torch.Tensor):
    """Next-token losses (N, T-1), their answer mask, logits and targets, padding trimmed."""
    ids, mask = trim_padding(ids, mask)
    logits = model(input_ids=ids).logits[:, :-1]
    target = ids[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
    return ce.view_as(target), mask[:, :-1], logits, target


def losses_and_match(model, ids, mask):
    """Per example: mean answer-token loss, and 1.0 where greedy decoding gives the exact answer."""
    ce, m, logits, target = token_losses(model, ids, mask)
    loss = (ce * m).sum(1) / m.sum(1)
    hit = (logits.argmax(-1) == target) | (m == 0)
    return loss, hit.all(1).float()


def pretrain(
    model, seed: int, steps: int, batch: int, lr: float, weights=None, salt="pretrain", log=None
):
    """AdamW with warmup and cosine decay on answer tokens of the source mixture; ``log`` gets the
    loss every tenth of the steps (at most 250 apart)."""
    torch.manual_seed(derive_seed(seed, salt, "init"))
    stream = data.mixture_stream(seed, salt, steps * batch, weights)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps))
    model.train()
    t0 = time.time()
    for t in range(steps):
        part = stream.select(slice(t * batch, (t + 1) * batch))
        ce, m, _, _ = token_losses(model, part.ids, part.mask)
        loss = (ce * m).sum() / m.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if log and (t % max(1, min(250, steps // 10)) == 0 or t == steps - 1):
            log(f"  pretrain step {t}/{steps} loss {loss.item():.3f} ({time.time() - t0:.0f}s)")
    model.eval()
    return model
