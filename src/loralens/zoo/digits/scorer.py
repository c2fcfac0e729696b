"""The CLIP analogue of the digits presets: rates how well an 8x8 image matches a prompt.

A small CNN with two heads, trained on the training pool of real and augmented digits (with
Gaussian pixel noise, so it also reads the slightly noisy images a diffusion model makes):
``class`` (10-way softmax) and ``attrs`` (one sigmoid per attribute of
:data:`loralens.zoo.digits.data.ATTRIBUTES`). The rating of an image for a prompt is

    p(prompted class | image) x mean over prompted attributes of p(attribute as prompted | image)

(the class factor alone when the prompt names no attribute, the attribute factor alone when it
names no class), a number in [0, 1] like a (rescaled) CLIP score.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from loralens.zoo.digits.data import ATTRIBUTES, DigitsData, parse_prompt


class DigitScorer(nn.Module):
    """A small CNN with a class head and an attribute head; :meth:`rate` scores image-prompt pairs."""

    def __init__(self, width: int = 16):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(2 * w * 16, 128),
            nn.ReLU(),
        )
        self.cls = nn.Linear(128, 10)
        self.attr = nn.Linear(128, len(ATTRIBUTES))
        self.width = width

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.features(x)
        return self.cls(h), self.attr(h)

    @torch.no_grad()
    def probs(self, x: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
        """(class probabilities (N, 10), attribute probabilities (N, 6))."""
        pc, pa = [], []
        for s in range(0, x.shape[0], chunk):
            c, a = self(x[s : s + chunk])
            pc.append(c.softmax(-1))
            pa.append(a.sigmoid())
        return torch.cat(pc), torch.cat(pa)

    @torch.no_grad()
    def rate(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """(N,) ratings in [0, 1] of images[i] for prompts[i]."""
        pc, pa = self.probs(images)
        out = torch.ones(len(prompts))
        for i, p in enumerate(prompts):
            label, attrs = parse_prompt(p)
            r = pc[i, label] if label is not None else torch.tensor(1.0)
            if attrs:
                vals = [pa[i, j] if v else 1 - pa[i, j] for j, v in attrs.items()]
                r = r * torch.stack(vals).mean()
            out[i] = r
        return out

    def save(self, path: Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        from safetensors.torch import save_file

        save_file(
            {k: v.contiguous() for k, v in self.state_dict().items()}, path / "scorer.safetensors"
        )
        (path / "scorer.json").write_text(json.dumps({"width": self.width}) + "\n")

    @classmethod
    def load(cls, path: Path) -> DigitScorer:
        from safetensors.torch import load_file

        path = Path(path)
        cfg = json.loads((path / "scorer.json").read_text())
        m = cls(int(cfg["width"]))
        m.load_state_dict(load_file(path / "scorer.safetensors"))
        return m.eval()


def train_scorer(
    data: DigitsData, seed: int, steps: int = 400, batch: int = 128, width: int = 16
) -> DigitScorer:
    """Train on the training pool (real + augmented, plus pixel noise); deterministic from seed."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = DigitScorer(width)
    pool = torch.nonzero(~data.heldout).flatten()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sch = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    model.train()
    for _ in range(steps):
        idx = pool[torch.randint(len(pool), (batch,), generator=gen)]
        x = data.images[idx]
        sigma = torch.rand(batch, 1, 1, 1, generator=gen) * 0.15
        x = (x + sigma * torch.randn(x.shape, generator=gen)).clamp(-1, 1)
        c, a = model(x)
        loss = F.cross_entropy(c, data.labels[idx]) + F.binary_cross_entropy_with_logits(
            a, data.attrs[idx].float()
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sch.step()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def scorer_report(scorer: DigitScorer, data: DigitsData) -> dict[str, Any]:
    """Accuracy on held-out real digits: class, each attribute, and the mean attribute accuracy."""
    sel = data.heldout & data.real
    pc, pa = scorer.probs(data.images[sel])
    cls_acc = float((pc.argmax(-1) == data.labels[sel]).float().mean())
    attr_acc = ((pa > 0.5).long() == data.attrs[sel]).float().mean(0)
    out: dict[str, Any] = {
        "heldout_real_images": int(sel.sum()),
        "class_acc": round(cls_acc, 4),
        "attr_acc_mean": round(float(attr_acc.mean()), 4),
    }
    for j, (name, _) in enumerate(ATTRIBUTES):
        out[f"attr_acc_{name}"] = round(float(attr_acc[j]), 4)
    return out


def class_accuracy(scorer: DigitScorer, images: torch.Tensor, labels: Sequence[int]) -> float:
    """The share of ``images`` whose most likely class is the one in ``labels``."""
    pc, _ = scorer.probs(images)
    return float((pc.argmax(-1) == torch.as_tensor(np.asarray(labels))).float().mean())
