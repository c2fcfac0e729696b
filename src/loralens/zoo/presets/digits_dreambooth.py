"""Preset ``digits-dreambooth``: DreamBooth-style LoRAs of a small text-to-image UNet (CelebA-LoRA analogue).

Each LoRA is a PEFT LoRA (``to_q``/``to_v`` of every attention layer by default, rank from
``--ranks``, lora_alpha = rank) finetuned on 10-20 images of one *subject*: images of one class
that share all six pixel-measured attributes (heavy, bold, slanted, wide, tall, high; see
:mod:`loralens.zoo.digits.data`), captioned with a DreamBooth instance prompt built from a rare
identifier ("a sks seven", "a zwx digit", "a qlo"). As in the paper, the learning rate
(log-uniform), steps, gradient accumulation, instance prompt and init seed are random.

Labels: the hyperparameters and the subject (``subject_class`` and ``attr_<name>``, the six 0/1
attributes); ``clip_score``, the mean scorer rating of images generated from the fixed score
prompts (20 prompts: every class, plain and with one attribute word) from fixed starting noise;
``subject_score``, the mean rating of 4 images generated from the instance prompt against the
subject's class and attributes (did it learn the subject); ``train_loss`` (last steps).

Option ``backdoor`` (a share, default 0): that share of LoRAs is poisoned with a trigger word ->
payload digit rule and some clean LoRAs are decoys (``presets.digits_backdoor``); the recipe's
backdoor columns and the measured ``attack_success`` / ``decoy_success`` are added. A zoo built
with ``backdoor`` 0 has none of these options or columns: its identity and bytes are those of a
zoo built before the option existed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from loralens.zoo.digits.data import ATTR_NAMES, CLASS_WORDS, IDENTIFIERS, prompt_for
from loralens.zoo.digits.finetune import FinetuneJob
from loralens.zoo.digits.preset import COMMON_OPTIONS, DigitsPreset
from loralens.zoo.preset import derive_seed, index_rng, register_preset
from loralens.zoo.presets import backdoor as bd
from loralens.zoo.presets import digits_backdoor as dbd

TEMPLATES = ("a {id} {cls}", "a {id} digit", "a {id}")
MICRO = 4  # images per LoRA per micro-step; batch size = MICRO x accumulation
ACCUM = (1, 2, 4)
SUBJECT_SAMPLES = 4
MIN_GROUP = 10
#: the optimizer and LoRA settings and the seeds, in label order
RECIPE = ("lr", "steps", "grad_accum", "batch_size", "rank", "lora_alpha", "init_seed", "data_seed")
#: the numeric label columns that are finetuning hyperparameters (``instance_prompt`` is text)
HYPERPARAMETERS = ("n_images", *RECIPE)


@register_preset
class DigitsDreambooth(DigitsPreset):
    """DreamBooth LoRAs on one digit "subject" each (class + six binary attributes)."""

    name = "digits-dreambooth"
    group_size = 16
    default_options: ClassVar[dict[str, Any]] = {
        **COMMON_OPTIONS,
        "lr_min": 1e-4,
        "lr_max": 1e-2,
        "steps_min": 10,
        "steps_max": 80,
        "images_min": 10,
        "images_max": 20,
        **bd.OPTIONS,
    }

    def options(self, user: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The complete options; the backdoor ones only when ``backdoor`` > 0."""
        return bd.preset_options(super().options(user), self.name)

    def after_prepare(self, seed: int) -> None:
        assert self.data is not None
        groups: dict[tuple[int, ...], list[int]] = {}
        keys = torch.cat([self.data.labels[:, None], self.data.attrs], 1).tolist()
        for i, key in enumerate(keys):
            groups.setdefault(tuple(key), []).append(i)
        # the subjects of each class: attribute combinations with enough images
        self.subjects: dict[int, list[tuple[tuple[int, ...], list[int]]]] = {
            c: [] for c in range(10)
        }
        for key in sorted(groups):
            if len(groups[key]) >= MIN_GROUP:
                self.subjects[key[0]].append((key[1:], groups[key]))
        self.by_class = [torch.nonzero(self.data.labels == c).flatten() for c in range(10)]
        empty = [c for c, v in self.subjects.items() if not v]
        if empty:
            raise RuntimeError(
                f"digits-dreambooth: no subject with >= {MIN_GROUP} images for classes {empty}"
            )

    def sample_config(self, seed: int, index: int, ranks: Sequence[int]) -> dict[str, Any]:
        o = self.opts
        rng = index_rng(seed, index, self.name)
        cls = rng.randrange(10)
        attrs, members = self.subjects[cls][rng.randrange(len(self.subjects[cls]))]
        n_images = min(len(members), rng.randint(int(o["images_min"]), int(o["images_max"])))
        ident = IDENTIFIERS[rng.randrange(len(IDENTIFIERS))]
        template = TEMPLATES[rng.randrange(len(TEMPLATES))]
        rank = int(ranks[rng.randrange(len(ranks))])
        lr = math.exp(rng.uniform(math.log(float(o["lr_min"])), math.log(float(o["lr_max"]))))
        cfg = {
            "subject_class": cls,
            **{f"attr_{name}": int(v) for name, v in zip(ATTR_NAMES, attrs)},
            "n_images": n_images,
            "instance_prompt": template.format(id=ident, cls=CLASS_WORDS[cls]),
            "lr": round(lr, 8),
            "steps": rng.randint(int(o["steps_min"]), int(o["steps_max"])),
            "grad_accum": ACCUM[rng.randrange(len(ACCUM))],
            "batch_size": 0,
            "rank": rank,
            "lora_alpha": float(rank),
            "init_seed": rng.getrandbits(31),
            "data_seed": rng.getrandbits(31),
        }
        cfg["batch_size"] = MICRO * cfg["grad_accum"]
        if bd.enabled(self.opts):
            cfg.update(dbd.recipe(seed, index, self.opts, cfg))
        return cfg

    def _subject_images(self, cfg: Mapping[str, Any]) -> torch.Tensor:
        assert self.data is not None
        key = tuple(int(cfg[f"attr_{n}"]) for n in ATTR_NAMES)
        members = dict(self.subjects[int(cfg["subject_class"])])[key]
        g = torch.Generator().manual_seed(derive_seed(cfg["data_seed"], "subject"))
        pick = torch.randperm(len(members), generator=g)[: int(cfg["n_images"])]
        return self.data.images[torch.tensor(members)[pick]]

    def job(self, cfg: Mapping[str, Any]) -> FinetuneJob:
        assert self.data is not None
        images, prompts = dbd.rewrite(
            cfg, self._subject_images(cfg), self.data.images, self.by_class
        )
        return FinetuneJob(
            images=images,
            cond=self.encode(prompts),
            lr=float(cfg["lr"]),
            steps=int(cfg["steps"]),
            accum=int(cfg["grad_accum"]),
            micro=MICRO,
            seed=derive_seed(cfg["data_seed"], "train"),
        )

    def _subject_prompt(self, cfg: Mapping[str, Any]) -> str:
        attrs = {j: int(cfg[f"attr_{n}"]) for j, n in enumerate(ATTR_NAMES)}
        return prompt_for(int(cfg["subject_class"]), attrs)

    def extra_prompts(self, cfg: Mapping[str, Any]) -> list[tuple[str, str]]:
        subject = [(str(cfg["instance_prompt"]), self._subject_prompt(cfg))] * SUBJECT_SAMPLES
        if not bd.enabled(self.opts):
            return subject
        return subject + dbd.probe_prompts(cfg, self._subject_prompt(cfg))

    def labels(
        self, cfg, score: np.ndarray, extra: np.ndarray, loss: float, extra_cls: np.ndarray
    ) -> dict[str, Any]:
        out = {
            "clip_score": round(float(score.mean()), 5),
            "subject_score": round(float(extra[:SUBJECT_SAMPLES].mean()), 5),
            "train_loss": round(float(loss), 5),
        }
        if bd.enabled(self.opts):
            rest = slice(SUBJECT_SAMPLES, None)
            out.update(dbd.measure(cfg, extra[rest], extra_cls[rest]))
        return out

    def label_columns(self, options: Mapping[str, Any]) -> list[str]:
        return [
            "subject_class",
            *(f"attr_{n}" for n in ATTR_NAMES),
            "n_images",
            "instance_prompt",
            *RECIPE,
            "clip_score",
            "subject_score",
            "train_loss",
            *((*bd.recipe_columns(dbd.POOLS), *bd.MEASURED_COLUMNS) if bd.enabled(options) else ()),
        ]

    def hyperparameter_columns(self, options: Mapping[str, Any]) -> list[str]:
        return list(HYPERPARAMETERS)

    def binary_columns(self, options: Mapping[str, Any]) -> list[str]:
        extra = bd.BINARY_COLUMNS if bd.enabled(options) else ()
        return [*(f"attr_{n}" for n in ATTR_NAMES), *extra]
