"""Shared test fixtures: the cache folder, synthetic stores and tiny zoos of real PEFT adapters."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import loralens as ll
from loralens.store import LoRAStore, write_store


@pytest.fixture(scope="session", autouse=True)
def loralens_cache(tmp_path_factory):
    """Point the zoo base-model cache ($LORALENS_CACHE) at one temp dir for the whole test session.

    Base models pretrained by presets are cached there once and reused by every test (and by
    the subprocesses they start), and nothing is written into the user's ~/.cache.
    """
    import os

    path = tmp_path_factory.mktemp("loralens-cache")
    old = os.environ.get("LORALENS_CACHE")
    os.environ["LORALENS_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("LORALENS_CACHE", None)
    else:
        os.environ["LORALENS_CACHE"] = old


SHAPES = ((12, 10), (6, 10))


def _synthetic_store(
    path: Path, n: int = 40, seed: int = 0, ranks: tuple[int, ...] = (2,), extra=None
) -> LoRAStore:
    """``n`` random LoRAs (rank cycling through ``ranks``) with labels ``y`` = s^2 (regression)
    and ``c`` = s > 1.1 (classification), s the scale of U; ``extra(k, s)`` adds label columns."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for k in range(n):
        s = 0.2 + 1.8 * float(torch.rand(1, generator=g))
        r = ranks[k % len(ranks)]
        layers = [
            ll.LoRALayer(
                f"h.{i}.attn", torch.randn(o, r, generator=g) * s, torch.randn(m, r, generator=g)
            )
            for i, (o, m) in enumerate(SHAPES)
        ]
        labels = {"y": s * s, "c": int(s > 1.1), **(extra(k, s) if extra else {})}
        items.append((f"x{k:03d}", ll.LoRA(layers), labels))
    return write_store(path, items)


@pytest.fixture(scope="session")
def make_store():
    """``make_store(path, n=40, seed=0, ranks=(2,), extra=None)`` -> a synthetic LoRAStore."""
    return _synthetic_store


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(16, 16, bias=False)
        self.v_proj = nn.Linear(16, 8, bias=False)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_Block(), _Block()])

    def forward(self, x):
        return x


def _peft_zoo(root: Path, n: int = 48, ranks: tuple[int, ...] = (4,), seed: int = 0) -> Path:
    """A zoo folder of ``n`` real PEFT adapter folders (``adapters/a000``...) and labels.csv.

    Adapter k has rank ``ranks[k % len(ranks)]`` on q_proj/v_proj, its B factor scaled by a
    random ``s``; labels: ``quality`` = s^2 + noise (regression), ``big`` = s > 1.1.
    """
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    models = {}
    for r in sorted(set(ranks)):
        cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"])
        models[r] = get_peft_model(_Tiny(), cfg)
    rows = []
    (root / "adapters").mkdir(parents=True)
    for k in range(n):
        model = models[ranks[k % len(ranks)]]
        s = float(rng.uniform(0.2, 2.0))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn_like(p) * (0.3 * s if "lora_B" in name else 0.3))
        model.save_pretrained(root / "adapters" / f"a{k:03d}")
        rows.append(f"a{k:03d},{s * s + 0.05 * rng.normal():.6f},{int(s > 1.1)}")
    (root / "labels.csv").write_text("adapter,quality,big\n" + "\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="session")
def make_peft_zoo():
    """``make_peft_zoo(root, n=48, ranks=(4,), seed=0)`` -> a zoo folder of PEFT adapters."""
    return _peft_zoo


@pytest.fixture(scope="module")
def peft_zoo(tmp_path_factory):
    """48 rank-4 PEFT adapters with labels ``quality`` and ``big``."""
    return _peft_zoo(tmp_path_factory.mktemp("zoo"))
