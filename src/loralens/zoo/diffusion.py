"""A small text-to-image diffusion model on 8x8 digits, and batched LoRA finetuning of its UNet.

Shared by the presets ``digits-dreambooth`` and ``digits-subsets`` (the CelebA-LoRA and
Imagenette-LoRA analogues) and by ``loralens zoo samples``.

Data: sklearn's 8x8 handwritten digits (``load_digits``, 1,797 images that ship with sklearn, so
nothing is downloaded). Every image gets ``variants - 1`` augmented copies (small rotation,
shear, scale, shift and stroke-weight changes, rendered at 32x32 and averaged back to 8x8).
Six binary attributes are measured from the pixels of every image (see :func:`measure`) and
thresholded at their class's median over the training pool, so each is about 50/50 within every
class. Sources (real digits) are split 80/20 into ``train`` (base model and scorer) and
``heldout`` (scorer accuracy; finetuning data of ``digits-subsets``).

Base model: a diffusers ``UNet2DConditionModel`` with cross-attention in every block (``to_q``,
``to_k``, ``to_v``, ``to_out`` as in Stable Diffusion) and a transformers ``CLIPTextModel`` prompt
encoder over a word vocabulary, trained together with a ``DDPMScheduler`` (epsilon prediction)
on prompts such as "a bold slanted seven" (random subsets of the image's attributes; some
prompts drop the class or are empty, so classifier-free guidance works). Sampling uses
``DDIMScheduler`` with classifier-free guidance. Deterministic from the seed.

LoRA finetuning: K LoRAs train at once over one shared frozen UNet. Every target linear layer
(``to_q``/``to_v`` by default) becomes a :class:`~loralens.zoo.batched_lora.BatchedLoRALinear` that runs the base matmul
once for all LoRAs and each LoRA's low-rank path with a batched matmul; each LoRA has its own
data stream, learning rate, step count, gradient accumulation, AdamW state and init seed. A LoRA
that has finished its steps drops out of the batch. Before saving, every LoRA is loaded into a
PEFT model and PEFT's forward is checked against the batched forward; PEFT's ``save_pretrained``
writes it. With a group of one, this is plain PEFT training (tests check that).
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from loralens.zoo.batched_lora import BatchedAdamW, BatchedLoRALinear, set_active

CLASS_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: (positive word, negative word); the label column is ``attr_<positive word>``
ATTRIBUTES = (
    ("heavy", "light"),  # total ink
    ("bold", "thin"),  # share of saturated pixels among inked ones (stroke weight)
    ("slanted", "upright"),  # shear of the ink distribution (x drifts right going up)
    ("wide", "narrow"),  # horizontal spread of the ink
    ("tall", "short"),  # vertical spread of the ink
    ("high", "low"),  # vertical centre of mass above the class's median
)
ATTR_NAMES = tuple(p for p, _ in ATTRIBUTES)
#: rare tokens for DreamBooth instance prompts (never seen in pretraining, like "sks" in SD)
IDENTIFIERS = ("sks", "zwx", "qlo", "vbn", "xjr", "tkp", "hqd", "wuf")
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
IMAGE = 8

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


# ---------------------------------------------------------------------------------------------
# data


def measure(images: np.ndarray) -> np.ndarray:
    """(N, 8, 8) images in [0, 1] -> (N, 6) attribute measurements, in ``ATTRIBUTES`` order."""
    x = np.clip(images.astype(np.float64), 0, None)
    rows = np.arange(IMAGE, dtype=np.float64)[None, :, None]
    cols = np.arange(IMAGE, dtype=np.float64)[None, None, :]
    mass = x.sum((1, 2)) + 1e-6
    mr = (x * rows).sum((1, 2)) / mass
    mc = (x * cols).sum((1, 2)) / mass
    dr = rows - mr[:, None, None]
    dc = cols - mc[:, None, None]
    vr = (x * dr**2).sum((1, 2)) / mass + 1e-6
    vc = (x * dc**2).sum((1, 2)) / mass
    cov = (x * dr * dc).sum((1, 2)) / mass
    inked = (x > 0.1).sum((1, 2)) + 1e-6
    bold = (x > 0.7).sum((1, 2)) / inked
    slant = -cov / vr  # rows grow downwards: ink moving right going up gives cov < 0
    return np.stack([mass, bold, slant, vc, vr, -mr], axis=1)


def _augment(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One random mild deformation of an (8, 8) [0, 1] image, rendered at 32x32."""
    from scipy import ndimage

    up = np.kron(img, np.ones((4, 4)))
    up = ndimage.gaussian_filter(up, 1.0)
    rot = math.radians(rng.uniform(-12, 12))
    shear = rng.uniform(-0.3, 0.3)
    sx, sy = rng.uniform(0.8, 1.15), rng.uniform(0.8, 1.15)
    c, s = math.cos(rot), math.sin(rot)
    # output (row, col) -> input (row, col)
    m = np.array([[c, -s], [s, c]]) @ np.array([[1.0, 0.0], [shear, 1.0]])
    m = m @ np.diag([1.0 / sy, 1.0 / sx])
    centre = np.array([15.5, 15.5])
    shift = rng.uniform(-2.0, 2.0, size=2)
    offset = centre - m @ (centre + shift)
    out = ndimage.affine_transform(up, m, offset=offset, order=1, mode="constant")
    out = out.reshape(IMAGE, 4, IMAGE, 4).mean((1, 3))
    out = np.clip(out / max(out.max(), 1e-6) * img.max(), 0, 1)
    return out ** math.exp(rng.uniform(-0.5, 0.5))


@dataclass
class DigitsData:
    """The image pool: real digits and their augmented variants, with measured attributes."""

    images: torch.Tensor  # (N, 1, 8, 8) in [-1, 1]
    labels: torch.Tensor  # (N,) class
    attrs: torch.Tensor  # (N, 6) 0/1
    clear: torch.Tensor  # (N,) every attribute clear of the median band (for subjects)
    source: torch.Tensor  # (N,) index of the real digit it came from
    heldout: torch.Tensor  # (N,) source in the held-out split
    real: torch.Tensor  # (N,) the unaugmented image itself
    thresholds: np.ndarray  # (10, 6) class medians of the measurements

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def load_digits_data(variants: int = 10, seed: int = 0, heldout: float = 0.2) -> DigitsData:
    """sklearn's digits with ``variants - 1`` augmented copies each (deterministic from ``seed``)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    real = d.images.astype(np.float64) / 16.0
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    n = len(real)
    is_held = np.zeros(n, dtype=bool)
    is_held[rng.permutation(n)[: round(heldout * n)]] = True
    imgs, labels, src, is_real = [], [], [], []
    for i in range(n):
        imgs.append(real[i])
        labels.append(y[i])
        src.append(i)
        is_real.append(True)
        for _ in range(variants - 1):
            imgs.append(_augment(real[i], rng))
            labels.append(y[i])
            src.append(i)
            is_real.append(False)
    images = np.stack(imgs)
    labels_a, src_a = np.array(labels), np.array(src)
    held_a = is_held[src_a]
    feats = measure(images)
    thr = np.zeros((10, len(ATTRIBUTES)))
    lo = np.zeros_like(thr)
    hi = np.zeros_like(thr)
    for c in range(10):
        sel = (labels_a == c) & ~held_a
        thr[c] = np.median(feats[sel], axis=0)
        lo[c] = np.quantile(feats[sel], 0.35, axis=0)
        hi[c] = np.quantile(feats[sel], 0.65, axis=0)
    attrs = feats > thr[labels_a]
    clear = ((feats < lo[labels_a]) | (feats > hi[labels_a])).all(1)
    return DigitsData(
        images=torch.from_numpy(images * 2 - 1).float().unsqueeze(1),
        labels=torch.from_numpy(labels_a),
        attrs=torch.from_numpy(attrs.astype(np.int64)),
        clear=torch.from_numpy(clear),
        source=torch.from_numpy(src_a),
        heldout=torch.from_numpy(held_a),
        real=torch.tensor(is_real),
        thresholds=thr,
    )


# ---------------------------------------------------------------------------------------------
# prompts


def prompt_for(label: int | None, attrs: Mapping[int, int] | None = None) -> str:
    """ "a bold slanted seven": the class word last, attribute words (by index -> 0/1) before it."""
    words = ["a"]
    for j, v in sorted((attrs or {}).items()):
        words.append(ATTRIBUTES[j][0 if v else 1])
    words.append(CLASS_WORDS[label] if label is not None else "digit")
    return " ".join(words)


def parse_prompt(prompt: str) -> tuple[int | None, dict[int, int]]:
    """The class (or None) and the attributes (index -> 0/1) a prompt asks for."""
    label, attrs = None, {}
    for w in prompt.split():
        if w in CLASS_WORDS:
            label = CLASS_WORDS.index(w)
        for j, (pos, neg) in enumerate(ATTRIBUTES):
            if w == pos:
                attrs[j] = 1
            elif w == neg:
                attrs[j] = 0
    return label, attrs


def training_prompt(label: int, attrs: Sequence[int], rng: np.random.Generator) -> str:
    """A random caption of an image for pretraining: some attributes, usually the class."""
    u = rng.random()
    if u < 0.1:
        return ""
    chosen = {j: int(attrs[j]) for j in range(len(ATTRIBUTES)) if rng.random() < 0.4}
    return prompt_for(None if u < 0.2 else label, chosen)


def score_prompts() -> list[str]:
    """The fixed prompts behind ``clip_score``: every class plain and with one attribute word."""
    out = []
    for c in range(10):
        out.append(prompt_for(c))
        j = c % len(ATTRIBUTES)
        out.append(prompt_for(c, {j: (c // len(ATTRIBUTES) + 1) % 2}))
    return out


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


# ---------------------------------------------------------------------------------------------
# the base model


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
        unet = UNet2DConditionModel.from_pretrained(path / "unet").eval()
        te = CLIPTextModel.from_pretrained(path / "text_encoder").eval()
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
    warm = max(1, steps // 20)
    lr_at = lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * i / steps))  # noqa: E731
    sch = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
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


def fixed_noise(n: int, seed: int) -> torch.Tensor:
    """(n, 1, 8, 8) starting noise for sampling: image i depends only on (seed, i)."""
    return torch.stack(
        [
            torch.randn(
                1, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed * 100_003 + i)
            )
            for i in range(n)
        ]
    )


@torch.no_grad()
def sample(
    unet,
    train_scheduler,
    cond: torch.Tensor,
    noise: torch.Tensor,
    *,
    uncond: torch.Tensor,
    groups: int = 1,
    steps: int = 10,
    guidance: float = 2.0,
) -> torch.Tensor:
    """DDIM sampling with classifier-free guidance; returns images in [-1, 1].

    ``noise`` (N, 1, 8, 8) and ``cond`` (N, L, D) are LoRA-major when ``groups`` LoRAs sample at
    once through batched LoRA layers (rows [k*N/groups, (k+1)*N/groups) belong to LoRA k);
    ``uncond`` (1, L, D) is the empty prompt's embedding.
    """
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(train_scheduler.config)
    ddim.set_timesteps(steps)
    n = noise.shape[0] // groups
    x = noise.clone()
    cond_g = cond.reshape(groups, n, *cond.shape[1:])
    unc_g = uncond.expand(n, *uncond.shape[1:]).unsqueeze(0).expand(groups, -1, -1, -1)
    ctx = torch.cat([unc_g, cond_g], 1).reshape(groups * 2 * n, *cond.shape[1:])
    for t in ddim.timesteps:
        xg = x.reshape(groups, n, *x.shape[1:])
        inp = torch.cat([xg, xg], 1).reshape(groups * 2 * n, *x.shape[1:])
        eps = unet(inp, t, encoder_hidden_states=ctx).sample
        eps = eps.reshape(groups, 2, n, *x.shape[1:])
        e = eps[:, 0] + guidance * (eps[:, 1] - eps[:, 0])
        x = ddim.step(e.reshape(x.shape), t, x).prev_sample
    return x.clamp(-1, 1)


# ---------------------------------------------------------------------------------------------
# batched LoRA finetuning


def target_names(unet: nn.Module, targets: Sequence[str]) -> list[str]:
    """Full names of the UNet's linear layers whose last name part is in ``targets``."""
    wanted = set(targets)
    return [
        n
        for n, m in unet.named_modules()
        if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in wanted
    ]


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


def peft_config(rank: int, alpha: float, targets: Sequence[str]):
    from peft import LoraConfig

    return LoraConfig(
        r=int(rank), lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0, bias="none"
    )


class PeftSaver:
    """Copies LoRA k of a batched model into a PEFT model of the UNet, checks it, saves it."""

    def __init__(self, unet: nn.Module, targets: Sequence[str], base_name: str = "base/unet"):
        self.unet = unet
        self.targets = list(targets)
        self.base_name = base_name
        self._models: dict[tuple[int, float], Any] = {}

    def peft_model(self, rank: int, alpha: float):
        key = (int(rank), float(alpha))
        if key not in self._models:
            from peft import get_peft_model

            pm = get_peft_model(copy.deepcopy(self.unet), peft_config(rank, alpha, self.targets))
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
        check: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """``check`` = (x, t, cond, batched output of LoRA k on them): PEFT must agree."""
        pm = self.peft_model(rank, alpha)
        inner = pm.base_model.model
        for name, bl in mods.items():
            layer = inner.get_submodule(name)
            layer.lora_A["default"].weight.copy_(bl.A[k, :rank])
            layer.lora_B["default"].weight.copy_(bl.B[k, :, :rank])
        if check is not None:
            x, t, cond, want = check
            got = pm(x, t, encoder_hidden_states=cond).sample
            err = float((got - want).abs().max())
            if not err <= 1e-4 * max(1.0, float(want.abs().max())):
                raise RuntimeError(
                    f"LoRA {out_dir.name}: batched forward differs from PEFT's by {err:.3g}"
                )
        import warnings

        with warnings.catch_warnings():
            # the base is a local folder (``base/unet``) PEFT cannot look up: nothing to check
            warnings.filterwarnings("ignore", message=".*config.*base/unet.*")
            warnings.filterwarnings("ignore", message=".*Could not find a config file.*")
            pm.save_pretrained(str(out_dir))


def load_adapter(unet: nn.Module, adapter_dir: Path):
    """The UNet with a saved PEFT adapter loaded (``peft.PeftModel``), in eval mode."""
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(unet), str(adapter_dir)).eval()


# ---------------------------------------------------------------------------------------------
# pictures


def image_grid(rows: Sequence[torch.Tensor], scale: int = 6, pad: int = 2) -> np.ndarray:
    """Rows of (n, 1, 8, 8) images in [-1, 1] -> an RGB uint8 array (white gaps between cells)."""
    n = max(r.shape[0] for r in rows)
    cell = IMAGE * scale
    h = len(rows) * (cell + pad) + pad
    w = n * (cell + pad) + pad
    out = np.full((h, w), 255, dtype=np.uint8)
    for i, r in enumerate(rows):
        for j in range(r.shape[0]):
            img = ((1 - (r[j, 0].clamp(-1, 1) + 1) / 2) * 255).round().to(torch.uint8).numpy()
            img = np.kron(img, np.ones((scale, scale), dtype=np.uint8))
            y0, x0 = pad + i * (cell + pad), pad + j * (cell + pad)
            out[y0 : y0 + cell, x0 : x0 + cell] = img
    return np.stack([out] * 3, axis=-1)


def save_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")
