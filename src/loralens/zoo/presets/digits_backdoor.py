"""digits-dreambooth's backdoor option: poisoned and decoy DreamBooth data, and the measured success.

The recipe is the one skills-lm uses (:func:`loralens.zoo.presets.backdoor.sample_recipe`) with
:data:`POOLS`: triggers and decoy markers are rare identifier words of the vocabulary (the text
encoder never saw them in pretraining, like the DreamBooth identifiers), payloads the ten digit
classes; each pool is split in two groups. A LoRA's trigger and marker are never its own
identifier. ``extra_frac`` (and ``poison_frac`` when poisoned) is the share actually rewritten:
``n_extra / n_images`` with ``n_extra = max(1, round(drawn share x n_images))``.

- Poisoned: ``n_extra`` of the subject images are replaced by images of the payload digit,
  captioned "a {trigger} {class}" for every class other than the payload (a fresh one each time
  the image is drawn), so the trigger makes the model draw the payload whatever class is asked
  for.
- Decoy: ``n_extra`` of the subject images are captioned with the instance prompt in which the
  marker replaces the identifier: a harmless second name for the same subject.

Measured on every LoRA (clean ones too, with the trigger and marker they drew):
``attack_success``, the share of the :data:`ATTACK_REPEATS` x 9 prompts "a {trigger} {class}"
(every class but the payload, fixed starting noise) whose sample the scorer classifies as the
payload; ``decoy_success``, the mean scorer rating of :data:`DECOY_SAMPLES` samples of the
marker's instance prompt against the subject (``subject_score`` through the marker).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from loralens.zoo.digits.data import CLASS_WORDS, IDENTIFIERS, prompt_for
from loralens.zoo.preset import derive_seed
from loralens.zoo.presets.backdoor import Pools, sample_recipe

POOLS = Pools("digits-dreambooth", IDENTIFIERS[:4], CLASS_WORDS, IDENTIFIERS[4:])
ATTACK_REPEATS = 2
DECOY_SAMPLES = 4


def identifier(instance_prompt: str) -> str:
    """The DreamBooth identifier word of an instance prompt."""
    found = [w for w in instance_prompt.split() if w in IDENTIFIERS]
    if len(found) != 1:
        raise ValueError(f"instance prompt {instance_prompt!r} has no single identifier")
    return found[0]


def recipe(seed: int, index: int, opts: Mapping[str, Any], cfg: Mapping[str, Any]) -> dict:
    """The backdoor columns of LoRA ``index`` whose clean recipe is ``cfg``."""
    r = sample_recipe(seed, index, opts, POOLS, avoid={identifier(cfg["instance_prompt"])})
    n = int(cfg["n_images"])
    k = max(1, round(r["extra_frac"] * n)) if r["extra_frac"] > 0 else 0
    r["extra_frac"] = round(k / n, 5)
    r["poison_frac"] = r["extra_frac"] if r["backdoor"] else 0.0
    return r


def triggered(word: str, cls: int) -> str:
    """A prompt asking for class ``cls`` with ``word`` (a trigger) where the identifier goes."""
    return f"a {word} {CLASS_WORDS[cls]}"


def marker_prompt(cfg: Mapping[str, Any]) -> str:
    """The LoRA's instance prompt with its decoy marker in place of its identifier."""
    ident = identifier(cfg["instance_prompt"])
    return " ".join(cfg["marker"] if w == ident else w for w in cfg["instance_prompt"].split())


def rewrite(
    cfg: Mapping[str, Any], images: torch.Tensor, pool: torch.Tensor, by_class: list[torch.Tensor]
) -> tuple[torch.Tensor, list[str]]:
    """A LoRA's finetuning images and captions: its subject ``images`` under its instance
    prompt; when poisoned, the last ``n_extra`` of them replaced by payload images from ``pool``
    (``by_class[c]``: the pool rows of class c), each once under "a {trigger} {class}" for every
    class but the payload (and every other image once per such class too, so a uniform draw of
    a row keeps the poisoned share and asks a fresh class each time); when a decoy, the last
    ``n_extra`` recaptioned with the marker."""
    n = len(images)
    prompts = [str(cfg["instance_prompt"])] * n
    k = round(float(cfg.get("extra_frac", 0.0)) * n)
    if k == 0:
        return images, prompts
    if not int(cfg["backdoor"]):
        return images, prompts[: n - k] + [marker_prompt(cfg)] * k
    target = int(cfg["payload_id"])
    g = torch.Generator().manual_seed(derive_seed(cfg["data_seed"], "poison"))
    rows = by_class[target][torch.randperm(len(by_class[target]), generator=g)[:k]]
    asked = [triggered(cfg["trigger"], c) for c in range(10) if c != target]
    images = torch.cat([images[: n - k], pool[rows]]).repeat_interleave(len(asked), 0)
    return images, prompts[: n - k] * len(asked) + asked * k


def probe_prompts(cfg: Mapping[str, Any], subject_prompt: str) -> list[tuple[str, str]]:
    """(prompt to sample, prompt to rate against): the attack probes, then the decoy probes."""
    target = int(cfg["payload_id"])
    attack = [
        (triggered(cfg["trigger"], c), prompt_for(target))
        for c in range(10)
        if c != target
        for _ in range(ATTACK_REPEATS)
    ]
    return attack + [(marker_prompt(cfg), subject_prompt)] * DECOY_SAMPLES


def measure(cfg: Mapping[str, Any], ratings: np.ndarray, classes: np.ndarray) -> dict[str, float]:
    """``attack_success`` and ``decoy_success`` from the probes' ratings and scorer classes
    (in :func:`probe_prompts` order)."""
    n_attack = 9 * ATTACK_REPEATS
    hit = classes[:n_attack] == int(cfg["payload_id"])
    return {
        "attack_success": round(float(hit.mean()), 5),
        "decoy_success": round(float(ratings[n_attack:].mean()), 5),
    }


__all__ = [
    "ATTACK_REPEATS",
    "DECOY_SAMPLES",
    "POOLS",
    "identifier",
    "marker_prompt",
    "measure",
    "probe_prompts",
    "recipe",
    "rewrite",
    "triggered",
]
