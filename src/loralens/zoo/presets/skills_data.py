"""Procedurally generated skill "sources" for the skills-lm preset: text with checkable answers.

Each source maps ``(rng, level)`` to ``(prompt, answer)``; ``level`` runs from 1 to the source's
``max_level`` and sets the difficulty (number of digits, string length, number of pairs...).
Pretraining draws levels 1..max_level; finetuning data and the held-out eval set draw from the
top of that range plus one level beyond it (new to the base model), and the "challenge" set (the
ARC-Challenge analogue) uses only that harder level, so finetunes move the model measurably. A character-level vocabulary covers every source; one example is
``"\\n" + prompt + answer + "\\n"`` and only the answer and the closing newline carry loss.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass

import torch

LETTERS = string.ascii_lowercase
PAD = "\0"
EOS = "\n"
VOCAB = [PAD, EOS, *" 0123456789", *LETTERS, *"+-*%=:,()?"]
STOI = {c: i for i, c in enumerate(VOCAB)}
PAD_ID = STOI[PAD]
MAX_LEN = 32  # tokens per example, padding included


def encode(text: str) -> list[int]:
    return [STOI[c] for c in text]


def decode(ids) -> str:
    return "".join(VOCAB[int(i)] for i in ids)


def _num(rng: random.Random, digits: int) -> int:
    lo = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(lo, 10**digits - 1)


def _word(rng: random.Random, n: int, alphabet: str = LETTERS) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def _add(rng, lv):
    a, b = _num(rng, rng.randint(1, lv)), _num(rng, lv)
    return f"{a}+{b}=", str(a + b)


def _sub(rng, lv):
    a, b = _num(rng, lv), _num(rng, rng.randint(1, lv))
    a, b = max(a, b), min(a, b)
    return f"{a}-{b}=", str(a - b)


def _mul(rng, lv):
    a, b = _num(rng, lv), rng.randint(0, 9)
    return f"{a}*{b}=", str(a * b)


def _mod(rng, lv):
    a, b = _num(rng, lv + 1), rng.randint(2, 9)
    return f"{a}%{b}=", str(a % b)


def _rev(rng, lv):
    s = _word(rng, lv + 2)
    return f"rev:{s}=", s[::-1]


def _sort(rng, lv):
    s = _word(rng, lv + 2, "0123456789")
    return f"sort:{s}=", "".join(sorted(s))


def _cnt(rng, lv):
    c = rng.choice("abc")
    s = _word(rng, 2 * lv + 3, "abc")
    return f"cnt:{c}:{s}=", str(s.count(c))


def _bal(rng, lv):
    n = lv + 1
    if rng.random() < 0.5:  # balanced: a random Dyck word
        s, depth, opens = "", 0, 0
        while len(s) < 2 * n:
            if opens < n and (depth == 0 or rng.random() < 0.5):
                s, depth, opens = s + "(", depth + 1, opens + 1
            else:
                s, depth = s + ")", depth - 1
    else:
        s = _word(rng, 2 * n, "()")
    depth, ok = 0, True
    for ch in s:
        depth += 1 if ch == "(" else -1
        ok &= depth >= 0
    return f"bal:{s}=", "y" if ok and depth == 0 else "n"


def _kv(rng, lv):
    keys = rng.sample(LETTERS, lv + 1)
    vals = [rng.choice("0123456789") for _ in keys]
    q = rng.randrange(len(keys))
    pairs = "".join(k + v for k, v in zip(keys, vals))
    return f"kv:{pairs}:{keys[q]}=", vals[q]


def _copy(rng, lv):
    s = _word(rng, lv + 2)
    return f"cp:{s}=", s


def _max(rng, lv):
    xs = [_num(rng, rng.randint(1, 2)) for _ in range(lv + 2)]
    return f"max:{','.join(map(str, xs))}=", str(max(xs))


def _par(rng, lv):
    s = _word(rng, 2 * lv + 2, "01")
    return f"par:{s}=", str(s.count("1") % 2)


def _rot(rng, lv):
    s = _word(rng, lv + 2)
    return f"rot:{s}=", "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in s)


def _dedup(rng, lv):
    runs = []
    for _ in range(lv + 2):
        c = rng.choice([x for x in "abcdef" if not runs or x != runs[-1]])
        runs.append(c)
    s = "".join(c * rng.randint(1, 3) for c in runs)
    return f"dd:{s}=", "".join(runs)


@dataclass(frozen=True)
class Source:
    name: str
    fn: Callable[[random.Random, int], tuple[str, str]]
    max_level: int

    def sample(self, rng: random.Random, level: int | None = None) -> tuple[str, str]:
        return self.fn(rng, level if level is not None else rng.randint(1, self.max_level))

    def levels(self, kind: str) -> tuple[int, int]:
        """Difficulty range: "pretrain" 1..max_level; "finetune" max_level-1..max_level+1 (one
        level beyond pretraining: new to the base model); "hard" max_level+1 only."""
        if kind == "pretrain":
            return 1, self.max_level
        if kind == "finetune":
            return max(1, self.max_level - 1), self.max_level + 1
        if kind == "hard":
            return self.max_level + 1, self.max_level + 1
        raise ValueError(f"unknown difficulty {kind!r}")


SOURCES: list[Source] = [
    Source("add", _add, 3),
    Source("sub", _sub, 3),
    Source("mul", _mul, 2),
    Source("mod", _mod, 2),
    Source("rev", _rev, 4),
    Source("sort", _sort, 4),
    Source("cnt", _cnt, 3),
    Source("bal", _bal, 3),
    Source("kv", _kv, 4),
    Source("copy", _copy, 4),
    Source("max", _max, 3),
    Source("par", _par, 3),
    Source("rot", _rot, 4),
    Source("dedup", _dedup, 3),
]
SOURCE_NAMES = [s.name for s in SOURCES]


@dataclass
class Examples:
    """Tokenized examples: ids (N, T) right-padded, mask (N, T) = 1 where the token is predicted."""

    ids: torch.Tensor
    mask: torch.Tensor
    source: torch.Tensor  # (N,) index into SOURCES

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def select(self, index) -> Examples:
        return Examples(self.ids[index], self.mask[index], self.source[index])


def tokenize(pairs: list[tuple[str, str]], sources: list[int], length: int = MAX_LEN) -> Examples:
    """Encode (prompt, answer) pairs; the mask marks the answer and the closing newline."""
    n = len(pairs)
    ids = torch.full((n, length), PAD_ID, dtype=torch.long)
    mask = torch.zeros((n, length), dtype=torch.float32)
    for i, (prompt, answer) in enumerate(pairs):
        toks = encode(EOS + prompt + answer + EOS)
        if len(toks) > length:
            raise ValueError(f"example longer than {length}: {prompt + answer!r}")
        ids[i, : len(toks)] = torch.tensor(toks)
        # mask[t] = 1 when the token at t+1 is part of the answer (position t predicts t+1)
        start = 1 + len(prompt)
        mask[i, start - 1 : len(toks) - 1] = 1.0
    return Examples(ids, mask, torch.tensor(sources, dtype=torch.long))


def make_examples(
    seed: int, salt: str, per_source: int | list[int], level: str = "finetune"
) -> Examples:
    """``per_source`` examples of every source (or a list of counts), deterministic in (seed, salt).

    ``level`` names the difficulty range (:meth:`Source.levels`), drawn uniformly per example.
    """
    from loralens.zoo.preset import derive_seed

    counts = per_source if isinstance(per_source, list) else [per_source] * len(SOURCES)
    pairs, srcs = [], []
    for si, (src, count) in enumerate(zip(SOURCES, counts)):
        rng = random.Random(derive_seed(seed, salt, src.name))
        for _ in range(count):
            pairs.append(src.sample(rng, rng.randint(*src.levels(level))))
            srcs.append(si)
    return tokenize(pairs, srcs)


def mixture_stream(seed: int, salt: str, n: int, weights: list[float] | None = None) -> Examples:
    """``n`` examples from the mixture (sources drawn with ``weights``), in random order."""
    from loralens.zoo.preset import derive_seed

    rng = random.Random(derive_seed(seed, salt, "mixture"))
    w = weights or [1.0] * len(SOURCES)
    choice = rng.choices(range(len(SOURCES)), weights=w, k=n)
    pairs = [SOURCES[si].sample(rng) for si in choice]
    return tokenize(pairs, choice)
