"""What the two digits presets share: the cached base model, scorer and data, and the LoRA loop.

``DigitsPreset.prepare`` builds (once per seed and size, cached under the builder's cache dir)
the image pool (:mod:`~loralens.zoo.digits.data`), the scorer (:mod:`~loralens.zoo.digits.scorer`)
and the base diffusion model (:mod:`~loralens.zoo.digits.model`), and measures the base model's
own labels. ``DigitsPreset.train`` finetunes a group of LoRAs at once, samples every LoRA's
images for the fixed score prompts from the same starting noise, rates them with the scorer,
checks each LoRA against PEFT and saves it with PEFT's ``save_pretrained``.
Subclasses say what each LoRA is trained on (:meth:`DigitsPreset.job`) and which labels it gets
(:meth:`DigitsPreset.labels`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loralens.cache import cache_entry
from loralens.zoo.batched_lora import PeftSaver, target_names, wrap_targets
from loralens.zoo.digits.data import (
    ATTRIBUTES,
    CLASS_WORDS,
    IDENTIFIERS,
    IMAGE,
    DigitsData,
    load_digits_data,
    prompt_for,
    score_prompts,
)
from loralens.zoo.digits.finetune import FinetuneJob, finetune
from loralens.zoo.digits.model import SIZES, DiffusionBase, pretrain_base
from loralens.zoo.digits.sampling import fixed_noise, sample
from loralens.zoo.digits.scorer import DigitScorer, class_accuracy, scorer_report, train_scorer
from loralens.zoo.preset import OnDone, Preset, cache_path

#: sampling seed of the score prompts' starting noise (the same for every LoRA and the base)
SCORE_SEED = 1234
COMMON_OPTIONS: dict[str, Any] = {
    "size": "small",  # base model size: small (default) or tiny (tests)
    "base_steps": 0,  # pretraining steps of the base model (0: the size's default)
    "targets": "to_q,to_v",  # adapted linear layers (last name part), as in SD LoRAs
    "group": 16,  # LoRAs finetuned at once ("slots" in code; the key is part of zoo identity)
    "sample_steps": 8,  # DDIM steps when sampling for the score
    "guidance": 3.0,  # classifier-free guidance scale when sampling
}


class DigitsPreset(Preset):
    """Base of ``digits-dreambooth`` and ``digits-subsets`` (not registered itself)."""

    def __init__(self) -> None:
        self.opts: dict[str, Any] = {}
        self.base: DiffusionBase | None = None
        self.scorer: DigitScorer | None = None
        self.data: DigitsData | None = None
        self.info: dict[str, Any] = {}
        self.slots = 1  # LoRAs finetuned at once (option ``group``)
        self._saver: PeftSaver | None = None
        self._prompt_cache: dict[str, torch.Tensor] = {}

    # -- preparation ---------------------------------------------------------------------------

    def targets(self) -> list[str]:
        """The adapted linear layers' last name parts (option ``targets``)."""
        return [t.strip() for t in str(self.opts["targets"]).split(",") if t.strip()]

    def prepare(self, cache_dir: Path, seed: int, options: Mapping[str, Any]) -> None:
        self.opts = dict(options)
        size = str(self.opts["size"])
        if size not in SIZES:
            raise ValueError(f"option size: unknown size {size!r}; known: {', '.join(SIZES)}")
        self.slots = max(1, int(self.opts["group"]))
        self.group_size = self.slots  # the builder hands over one batch of LoRAs per train call
        steps = int(self.opts["base_steps"]) or int(SIZES[size]["steps"])
        # the key (and so the path) is unchanged since entries held a pickled data.pt: such an
        # old entry has no manifest and is refused (the error says which folder to delete),
        # and the adapters keep the same base_model_name_or_path as before
        key = {"size": size, "base_steps": steps, "version": 1}
        entry = cache_entry(
            cache_path(cache_dir, "digits-base", seed, key),
            lambda tmp: build_base_entry(tmp, seed, size, steps, log=self.log),
        )
        self.base = DiffusionBase.load(entry / "base")
        self.scorer = DigitScorer.load(entry / "scorer")
        self.data = DigitsData.load(entry / "data.safetensors")
        self.info = json.loads((entry / "info.json").read_text())
        self._saver = PeftSaver(self.base.unet, self.targets(), base_name="base/unet")
        self.after_prepare(seed)

    def after_prepare(self, seed: int) -> None:
        """Hook for subclasses (index structures over the data)."""

    def save_base(self, out_dir: Path) -> None:
        assert self.base is not None and self.scorer is not None
        self.base.save(out_dir)
        self.scorer.save(out_dir / "scorer")
        (out_dir / "digits.json").write_text(
            json.dumps(
                {
                    "attributes": [list(a) for a in ATTRIBUTES],
                    "classes": list(CLASS_WORDS),
                    "identifiers": list(IDENTIFIERS),
                    "score_prompts": score_prompts(),
                    "score_seed": SCORE_SEED,
                    "thresholds": self.data.thresholds.tolist() if self.data is not None else None,
                },
                indent=2,
            )
            + "\n"
        )

    def base_labels(self) -> dict[str, Any]:
        return dict(self.info.get("base_labels", {}))

    def manifest_info(self) -> dict[str, Any]:
        return {
            "data": "sklearn.datasets.load_digits (8x8), augmented; attributes measured from pixels",
            "attributes": [a[0] for a in ATTRIBUTES],
            "unet": self.info.get("unet"),
            "base_pretrain_s": self.info.get("pretrain_s"),
            "scorer": self.info.get("scorer"),
            "base_sample_class_acc": self.info.get("base_sample_class_acc"),
            "score_prompts": score_prompts(),
        }

    # -- prompts -------------------------------------------------------------------------------

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        assert self.base is not None
        missing = [p for p in dict.fromkeys(prompts) if p not in self._prompt_cache]
        if missing:
            emb = self.base.encode(missing)
            for p, e in zip(missing, emb):
                self._prompt_cache[p] = e
        return torch.stack([self._prompt_cache[p] for p in prompts])

    # -- what subclasses provide -----------------------------------------------------------------

    def job(self, cfg: Mapping[str, Any]) -> FinetuneJob:
        raise NotImplementedError

    def extra_prompts(self, cfg: Mapping[str, Any]) -> list[tuple[str, str]]:
        """(prompt to sample from, prompt to rate against) pairs sampled beside the score prompts."""
        return []

    def labels(
        self,
        cfg: Mapping[str, Any],
        score: np.ndarray,
        extra: np.ndarray,
        loss: float,
        extra_cls: np.ndarray,
    ) -> dict[str, Any]:
        """Measured labels of one LoRA from its score-prompt ratings, its extra ratings and the
        scorer's class of each extra image."""
        raise NotImplementedError

    # -- training ------------------------------------------------------------------------------

    def train(self, configs, out_dirs, on_done: OnDone | None = None) -> list[dict[str, Any]]:
        assert self.base is not None and self.scorer is not None and self._saver is not None
        K = len(configs)
        ranks = [int(c["rank"]) for c in configs]
        alphas = [float(c["lora_alpha"]) for c in configs]
        model, mods = wrap_targets(
            self.base.unet, self.targets(), ranks, alphas, [int(c["init_seed"]) for c in configs]
        )
        jobs = [self.job(c) for c in configs]
        losses = finetune(model, mods, self.base.scheduler, jobs)

        prompts = score_prompts()
        extras = [self.extra_prompts(c) for c in configs]
        n_extra = max((len(e) for e in extras), default=0)
        n = len(prompts) + n_extra
        noise = fixed_noise(n, SCORE_SEED)
        gen_prompts, rate_prompts = [], []
        for e in extras:
            e = e + [(prompts[0], prompts[0])] * (n_extra - len(e))
            gen_prompts += prompts + [g for g, _ in e]
            rate_prompts += prompts + [r for _, r in e]
        cond = self.encode(gen_prompts)
        images = sample(
            model,
            self.base.scheduler,
            cond,
            noise.repeat(K, 1, 1, 1),
            uncond=self.encode([""]),
            groups=K,
            steps=int(self.opts["sample_steps"]),
            guidance=float(self.opts["guidance"]),
        )
        ratings = self.scorer.rate(images, rate_prompts).view(K, n).numpy()
        classes = self.scorer.probs(images)[0].argmax(-1).view(K, n).numpy()

        # a PEFT check input: a few noisy images and prompts, the batched output of every LoRA
        g = torch.Generator().manual_seed(7)
        cx = torch.randn(2, 1, IMAGE, IMAGE, generator=g)
        ccond = self.encode(prompts[:2])
        with torch.no_grad():
            want = model(
                cx.repeat(K, 1, 1, 1), 500, encoder_hidden_states=ccond.repeat(K, 1, 1)
            ).sample
        want = want.view(K, 2, 1, IMAGE, IMAGE)

        results = []
        for k, cfg in enumerate(configs):
            lab = self.labels(
                cfg,
                ratings[k, : len(prompts)],
                ratings[k, len(prompts) : len(prompts) + len(extras[k])],
                losses[k],
                classes[k, len(prompts) : len(prompts) + len(extras[k])],
            )
            self._saver.save(
                mods,
                k,
                ranks[k],
                alphas[k],
                Path(out_dirs[k]),
                forward=lambda pm: pm(cx, 500, encoder_hidden_states=ccond).sample,
                want=want[k],
            )
            results.append(lab)
            if on_done:
                on_done(k, lab)
        return results


def build_base_entry(
    out: Path, seed: int, size: str, steps: int, *, log: Callable[[str], None]
) -> None:
    """Data, scorer, base model and the base model's own labels into the cache entry ``out``."""
    t0 = time.time()
    s = SIZES[size]
    data = load_digits_data(int(s["variants"]), seed=0)
    t_data = time.time() - t0
    data.save(out / "data.safetensors")
    t1 = time.time()
    scorer = train_scorer(data, seed, steps=int(s["scorer_steps"]))
    t_scorer = time.time() - t1
    scorer.save(out / "scorer")
    log(f"digits: data in {t_data:.0f}s, scorer in {t_scorer:.0f}s: {scorer_report(scorer, data)}")
    t2 = time.time()
    base = pretrain_base(data, size, seed, steps, log=log)
    t_base = time.time() - t2
    base.save(out / "base")
    # the base model's own score and how often its samples show the prompted class
    prompts = score_prompts()
    noise = fixed_noise(len(prompts), SCORE_SEED)
    images = sample(
        base.unet,
        base.scheduler,
        base.encode(prompts),
        noise,
        uncond=base.encode([""]),
        steps=COMMON_OPTIONS["sample_steps"],
        guidance=COMMON_OPTIONS["guidance"],
    )
    ratings = scorer.rate(images, prompts).numpy()
    # a larger check of prompt following: 100 class prompts
    cls_prompts = [prompt_for(c) for c in range(10) for _ in range(10)]
    imgs2 = sample(
        base.unet,
        base.scheduler,
        base.encode(cls_prompts),
        fixed_noise(len(cls_prompts), SCORE_SEED + 1),
        uncond=base.encode([""]),
        steps=COMMON_OPTIONS["sample_steps"],
        guidance=COMMON_OPTIONS["guidance"],
    )
    acc = class_accuracy(scorer, imgs2, [c for c in range(10) for _ in range(10)])
    info = {
        "seed": seed,
        "size": size,
        "steps": steps,
        "unet": {
            "params": sum(p.numel() for p in base.unet.parameters()),
            "block_out_channels": list(s["channels"]),
            "lora_targets_to_q_to_v": len(target_names(base.unet, ["to_q", "to_v"])),
        },
        "data_s": round(t_data, 1),
        "scorer_s": round(t_scorer, 1),
        "pretrain_s": round(t_base, 1),
        "scorer": scorer_report(scorer, data),
        "base_sample_class_acc": round(acc, 4),
        "base_labels": {"clip_score": round(float(ratings.mean()), 5)},
    }
    (out / "info.json").write_text(json.dumps(info, indent=2) + "\n")
    log(f"digits: base pretrained in {t_base:.0f}s; {json.dumps(info)}")
