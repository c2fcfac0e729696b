"""The digits image pool: sklearn's 8x8 digits, augmented, with six pixel-measured attributes, and
the prompts that caption them.

Data: sklearn's 8x8 handwritten digits (``load_digits``, 1,797 images that ship with sklearn, so
nothing is downloaded). Every image gets ``variants - 1`` augmented copies (small rotation,
shear, scale, shift and stroke-weight changes, rendered at 32x32 and averaged back to 8x8).
Six binary attributes are measured from the pixels of every image (see :func:`measure`) and
thresholded at their class's median over the training pool, so each is about 50/50 within every
class. Sources (real digits) are split 80/20 into ``train`` (base model and scorer) and
``heldout`` (scorer accuracy; finetuning data of ``digits-subsets``). Prompts such as "a bold
slanted seven" name a class and some attributes (:func:`prompt_for`, :func:`parse_prompt`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

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
#: images are IMAGE x IMAGE pixels
IMAGE = 8


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

    def save(self, path: Path) -> None:
        """Write every field into one safetensors file (no pickle: the file is read back as data)."""
        from safetensors.torch import save_file

        tensors = {k: getattr(self, k) for k in self.__dataclass_fields__}
        tensors["thresholds"] = torch.from_numpy(self.thresholds)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))

    @classmethod
    def load(cls, path: Path) -> DigitsData:
        """The pool written by :meth:`save`; a file without exactly these fields is refused."""
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        if set(tensors) != set(cls.__dataclass_fields__):
            raise ValueError(
                f"{path}: not a digits data file (fields {sorted(tensors)}, "
                f"expected {sorted(cls.__dataclass_fields__)})"
            )
        tensors["thresholds"] = tensors["thresholds"].numpy()
        return cls(**tensors)


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
