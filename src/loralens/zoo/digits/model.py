"""The digits base model: a small text-to-image diffusion UNet with its prompt encoder.

A diffusers ``UNet2DConditionModel`` with cross-attention in every block (``to_q``, ``to_k``,
``to_v``, ``to_out`` as in Stable Diffusion) and a transformers ``CLIPTextModel`` prompt encoder
over a word vocabulary, pretrained together with a ``DDPMScheduler`` (epsilon prediction) on the
training pool's captions (random subsets of an image's attributes; some captions drop the class
or are empty, so classifier-free guidance works). Deterministic from the seed.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from loralens.zoo.digits.data import (
    ATTRIBUTES,
    CLASS_WORDS,
    IDENTIFIERS,
    IMAGE,
    DigitsData,
    training_prompt,
)
from loralens.zoo.schedule import warmup_cosine

PAD, UNK, EOS = "[PAD]", "[UNK]", "[EOS]"
VOCAB = (
    PAD,
    UNK,
    EOS,
    "a",
    "digit",
    *CLASS_WORDS,
    *(w for pair in ATTRIBUTES for w in pair),
    *IDENTIFIERS,
)
MAX_LEN = 10

SIZES: dict[str, dict[str, Any]] = {
    # UNet widths, text width, pretraining steps and batch, augmented variants per digit
    "small": {
        "channels": (16, 32),
        "text": 32,
        "steps": 1000,
        "batch": 64,
        "lr": 2e-3,
        "variants": 6,
        "scorer_steps": 400,
    },
    "tiny": {
        "channels": (8, 16),
        "text": 16,
        "steps": 80,
        "batch": 32,
        "lr": 3e-3,
        "variants": 2,
        "scorer_steps": 120,
    },
}


class WordTokenizer:
    """Whitespace word tokenizer over ``VOCAB``, padded to ``MAX_LEN`` (EOS after the words)."""

    def __init__(self, vocab: Sequence[str] = VOCAB, max_len: int = MAX_LEN):
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.max_len = max_len

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        ids = torch.full((len(prompts), self.max_len), self.index[PAD], dtype=torch.long)
        for i, p in enumerate(prompts):
            toks = [self.index.get(w, self.index[UNK]) for w in p.lower().split()]
            toks = [*toks[: self.max_len - 1], self.index[EOS]]
            ids[i, : len(toks)] = torch.tensor(toks)
        return ids

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps({"vocab": self.vocab, "max_len": self.max_len}) + "\n")

    @classmethod
    def load(cls, path: Path) -> WordTokenizer:
        d = json.loads(Path(path).read_text())
        return cls(d["vocab"], int(d["max_len"]))


def build_unet(size: str = "small"):
    from diffusers import UNet2DConditionModel

    s = SIZES[size]
    return UNet2DConditionModel(
        sample_size=IMAGE,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=tuple(s["channels"]),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=s["text"],
        attention_head_dim=4,
        norm_num_groups=8,
    )


def build_text_encoder(size: str = "small"):
    from transformers import CLIPTextConfig, CLIPTextModel

    s = SIZES[size]
    cfg = CLIPTextConfig(
        vocab_size=len(VOCAB),
        hidden_size=s["text"],
        intermediate_size=2 * s["text"],
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_LEN,
        pad_token_id=VOCAB.index(PAD),
        bos_token_id=VOCAB.index(EOS),
        eos_token_id=VOCAB.index(EOS),
    )
    return CLIPTextModel(cfg)


def build_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")


@dataclass
class DiffusionBase:
    """The frozen base: UNet, prompt encoder, tokenizer, training scheduler config."""

    unet: nn.Module
    text_encoder: nn.Module
    tokenizer: WordTokenizer
    scheduler: Any
    size: str

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """(n, MAX_LEN, text width) prompt embeddings (the UNet's encoder_hidden_states)."""
        return self.text_encoder(input_ids=self.tokenizer(prompts)).last_hidden_state

    def save(self, out: Path) -> None:
        out = Path(out)
        self.unet.save_pretrained(out / "unet")
        self.text_encoder.save_pretrained(out / "text_encoder")
        self.scheduler.save_pretrained(out / "scheduler")
        (out / "tokenizer").mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(out / "tokenizer" / "vocab.json")
        (out / "model_index.json").write_text(
            json.dumps({"loralens": "digits-diffusion", "size": self.size}, indent=2) + "\n"
        )

    @classmethod
    def load(cls, path: Path) -> DiffusionBase:
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel

        path = Path(path)
        info = json.loads((path / "model_index.json").read_text())
        # safetensors only: a pickled checkpoint (a .bin) beside them is never read
        unet = UNet2DConditionModel.from_pretrained(path / "unet", use_safetensors=True).eval()
        te = CLIPTextModel.from_pretrained(path / "text_encoder", use_safetensors=True).eval()
        for p in [*unet.parameters(), *te.parameters()]:
            p.requires_grad_(False)
        return cls(
            unet=unet,
            text_encoder=te,
            tokenizer=WordTokenizer.load(path / "tokenizer" / "vocab.json"),
            scheduler=DDPMScheduler.from_pretrained(path / "scheduler"),
            size=info.get("size", "small"),
        )


def diffusion_loss(unet, scheduler, x0, cond, noise, t) -> torch.Tensor:
    """Per-example epsilon-prediction MSE."""
    noisy = scheduler.add_noise(x0, noise, t)
    pred = unet(noisy, t, encoder_hidden_states=cond).sample
    return (pred - noise).pow(2).flatten(1).mean(1)


def pretrain_base(
    data: DigitsData, size: str, seed: int, steps: int | None = None, log=None
) -> DiffusionBase:
    """Train UNet and prompt encoder together on the training pool (deterministic from seed)."""
    s = SIZES[size]
    steps = int(steps if steps is not None else s["steps"])
    torch.manual_seed(seed)
    unet, te = build_unet(size), build_text_encoder(size)
    sched = build_scheduler()
    tok = WordTokenizer()
    pool = torch.nonzero(~data.heldout).flatten()
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    params = [*unet.parameters(), *te.parameters()]
    opt = torch.optim.AdamW(params, lr=s["lr"], weight_decay=1e-4)
    sch = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps))
    unet.train()
    te.train()
    t0 = time.time()
    labels_np, attrs_np = data.labels.numpy(), data.attrs.numpy()
    for i in range(steps):
        idx = pool[torch.randint(len(pool), (s["batch"],), generator=gen)]
        prompts = [training_prompt(int(labels_np[j]), attrs_np[j], rng) for j in idx.tolist()]
        cond = te(input_ids=tok(prompts)).last_hidden_state
        x0 = data.images[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(idx),), generator=gen)
        loss = diffusion_loss(unet, sched, x0, cond, noise, t).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sch.step()
        if log and (i % 500 == 0 or i == steps - 1):
            log(
                f"base pretraining step {i + 1}/{steps} loss {loss.item():.4f} ({time.time() - t0:.0f}s)"
            )
    unet.eval()
    te.eval()
    for p in params:
        p.requires_grad_(False)
    return DiffusionBase(unet=unet, text_encoder=te, tokenizer=tok, scheduler=sched, size=size)


def load_adapter(unet: nn.Module, adapter_dir: Path):
    """The UNet with a saved PEFT adapter loaded (``peft.PeftModel``), in eval mode; only an
    ``adapter_model.safetensors`` is read (never a pickled ``adapter_model.bin``)."""
    from peft import PeftModel

    weights = Path(adapter_dir) / "adapter_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(
            f"{weights}: no such file (adapters are read from safetensors only)"
        )
    return PeftModel.from_pretrained(copy.deepcopy(unet), str(adapter_dir)).eval()
