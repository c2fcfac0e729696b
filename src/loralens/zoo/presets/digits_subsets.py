"""Preset ``digits-subsets``: LoRAs finetuned on random subsets of the ten digit classes (Imagenette-LoRA analogue).

Each LoRA is a PEFT LoRA (``to_q``/``to_v`` by default, rank from ``--ranks``) of the digits UNet
finetuned on ``dataset_size`` images drawn from a random non-empty subset of the classes (each
class present with probability 1/2), captioned with their class ("a seven"). The images come
from the held-out digits, which the base model never saw. Hyperparameters are fixed (learning
rate, steps, batch); only the classes, the dataset size (16, 32, 64 or 128 images), the data
and the init seed vary, as in the paper.

Labels: ``class_<d>`` (1 = class d was in the finetuning data), ``n_classes``, ``dataset_size``;
measured: ``clip_score`` (mean scorer rating of the fixed score prompts' images),
``present_score`` and ``absent_score`` (the same, over prompts of present / absent classes;
empty when there are none), ``train_loss``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from loralens.zoo.digits.data import parse_prompt, prompt_for, score_prompts
from loralens.zoo.digits.finetune import FinetuneJob
from loralens.zoo.digits.preset import COMMON_OPTIONS, DigitsPreset
from loralens.zoo.preset import derive_seed, index_rng, register_preset

SIZES = (16, 32, 64, 128)
#: the label columns that are finetuning hyperparameters (``dataset_size`` is a label the
#: benchmarks predict, as the paper's Imagenette-LoRA does, so it is not among them)
HYPERPARAMETERS = ("rank", "lora_alpha", "lr", "steps", "batch_size", "init_seed", "data_seed")


@register_preset
class DigitsSubsets(DigitsPreset):
    """LoRAs finetuned on random subsets of the digit classes."""

    name = "digits-subsets"
    group_size = 16
    default_options: ClassVar[dict[str, Any]] = {
        **COMMON_OPTIONS,
        "lr": 2e-3,
        "steps": 40,
        "micro": 8,
    }

    def after_prepare(self, seed: int) -> None:
        assert self.data is not None
        self.by_class = {
            c: torch.nonzero(self.data.heldout & (self.data.labels == c)).flatten()
            for c in range(10)
        }

    def sample_config(self, seed: int, index: int, ranks: Sequence[int]) -> dict[str, Any]:
        rng = index_rng(seed, index, self.name)
        present = [0] * 10
        while not any(present):
            present = [int(rng.random() < 0.5) for _ in range(10)]
        rank = int(ranks[rng.randrange(len(ranks))])
        return {
            **{f"class_{c}": present[c] for c in range(10)},
            "n_classes": sum(present),
            "dataset_size": SIZES[rng.randrange(len(SIZES))],
            "rank": rank,
            "lora_alpha": float(rank),
            "lr": float(self.opts["lr"]),
            "steps": int(self.opts["steps"]),
            "batch_size": int(self.opts["micro"]),
            "init_seed": rng.getrandbits(31),
            "data_seed": rng.getrandbits(31),
        }

    def job(self, cfg: Mapping[str, Any]) -> FinetuneJob:
        assert self.data is not None
        classes = [c for c in range(10) if int(cfg[f"class_{c}"])]
        pool = torch.cat([self.by_class[c] for c in classes])
        g = torch.Generator().manual_seed(derive_seed(cfg["data_seed"], "subset"))
        idx = pool[torch.randperm(len(pool), generator=g)[: int(cfg["dataset_size"])]]
        labels = self.data.labels[idx].tolist()
        cond = self.encode([prompt_for(c) for c in labels])
        return FinetuneJob(
            images=self.data.images[idx],
            cond=cond,
            lr=float(cfg["lr"]),
            steps=int(cfg["steps"]),
            accum=1,
            micro=int(cfg["batch_size"]),
            seed=derive_seed(cfg["data_seed"], "train"),
        )

    def labels(
        self, cfg, score: np.ndarray, extra: np.ndarray, loss: float, extra_cls: np.ndarray
    ) -> dict[str, Any]:
        prompts = score_prompts()
        cls = np.array([parse_prompt(p)[0] for p in prompts])
        present = np.array([int(cfg[f"class_{c}"]) for c in cls], dtype=bool)
        return {
            "clip_score": round(float(score.mean()), 5),
            "present_score": round(float(score[present].mean()), 5) if present.any() else None,
            "absent_score": round(float(score[~present].mean()), 5) if (~present).any() else None,
            "train_loss": round(float(loss), 5),
        }

    def label_columns(self, options: Mapping[str, Any]) -> list[str]:
        return [
            *(f"class_{c}" for c in range(10)),
            "n_classes",
            "dataset_size",
            *HYPERPARAMETERS,
            "clip_score",
            "present_score",
            "absent_score",
            "train_loss",
        ]

    def hyperparameter_columns(self, options: Mapping[str, Any]) -> list[str]:
        return list(HYPERPARAMETERS)

    def binary_columns(self, options: Mapping[str, Any]) -> list[str]:
        return [f"class_{c}" for c in range(10)]
