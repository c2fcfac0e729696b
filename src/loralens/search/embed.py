"""Invariant embeddings of LoRAs: a trained run's view of each LoRA, or spectral features that
need no labels (``--unsupervised``).

A run's embedding is the LoRA's update in the run's basis (``models.basis``: the flattened
(P U)(R V)^T of every layer, inside the training updates' span the same inner products as the
flattened ΔW, at any width), scaled to unit norm, then what the run predicts for it over the
square root of the number of targets (classification: 2 p - 1 of each probability; regression:
the standardized prediction); past ``UPDATE_DIM`` coordinates the update is count-sketched.
Euclidean distances between these are those of the cosine on ΔW plus the difference in
predictions: on skills-lm's development zoo an index of a run trained on
the skill labels finds LoRAs of shared skills better than the cosine on ΔW (BENCHMARKS.md),
whether the run kept its network or its linear base alone.

The unsupervised embedding is, per layer, the log of the top-k singular values of delta W
relative to its Frobenius norm (floored at 1e-6), then the log of that norm: GL(r)-invariant,
computed from the factors (``features.svals_and_norms``), comparable across scales. An index
standardizes it dimension by dimension (``search.index``); a run's it only centers.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loralens import features
from loralens.atomic import file_sha256, new_file, open_regular, replaceable, write_file_atomic
from loralens.errors import InputError, SettingsError
from loralens.jsonio import dumps, read_json_object
from loralens.learn.fitting.tasks import CLASSIFICATION
from loralens.learn.runs.checkpoint import CHECKPOINT
from loralens.learn.runs.folder import Run, load_run
from loralens.lora import LayerSpec, LoRA, LoRABatch, collate, spec_of
from loralens.models.base import EPS, log_scale
from loralens.models.linear_base import linear_features
from loralens.store import LoRAStore

RUN, UNSUPERVISED = "run", "unsupervised"

#: Most coordinates of the update part of a run's embedding. A longer update (a basis holds up
#: to 2^18 features) is count-sketched down to this: cosines move by about
#: 1/sqrt(UPDATE_DIM) = 0.016, and retrieval on skills-lm's development zoo by -0.004 (BENCHMARKS.md).
UPDATE_DIM = 4096
#: Most ΔW entries per LoRA a run's embedding reads (a run trained with ``--basis none`` on
#: wide layers has more: its update is not bounded by a basis).
MAX_UPDATE_ENTRIES = 2**24


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Each row of ``x`` over its norm (zero rows stay zero)."""
    return x / x.norm(dim=1, keepdim=True).clamp_min(EPS)


@functools.lru_cache(maxsize=8)
def _hashing(length: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    bucket = torch.randint(dim, (length,), generator=g)
    sign = torch.randint(2, (length,), generator=g).double() * 2 - 1
    return bucket, sign


def count_sketch(x: torch.Tensor, dim: int) -> torch.Tensor:
    """(B, dim) count sketch of the (B, D) rows of ``x``: each coordinate added, with a sign,
    into one bucket, both drawn once from a fixed seed, so inner products are kept in
    expectation and every call with the same D uses the same sketch."""
    bucket, sign = _hashing(x.shape[1], dim)
    out = torch.zeros(x.shape[0], dim, dtype=torch.float64, device=x.device)
    return out.index_add_(1, bucket.to(x.device), x.double() * sign.to(x.device))


#: Relative singular values below this count as this (log floor of the spectral features).
SVAL_FLOOR = 1e-6


def spectral_features(batch: LoRABatch, k: int) -> torch.Tensor:
    """(B, L (k + 1)) float32: per layer log(s_1..k / |delta W|), floored, then log |delta W|."""
    s, norm = features.svals_and_norms(batch, k)
    rel = s.to(norm.dtype) / norm.clamp_min(EPS)[..., None]
    logs = torch.log(rel.clamp_min(SVAL_FLOOR)).flatten(1)
    return torch.cat([logs, log_scale(norm)], dim=1).float()


@dataclass
class Embedder:
    """Maps LoRAs of one layout (``spec``: layer names and shapes) to (N, D) float32 vectors:
    a trained ``run``'s ``model.embed``, or the spectral features with ``k`` values per layer."""

    kind: str
    spec: LayerSpec
    run: Run | None = None
    k: int = 0
    run_sha256: str = field(default="", repr=False)

    @classmethod
    def of_run(cls, run: Run | str | os.PathLike) -> Embedder:
        run = run if isinstance(run, Run) else load_run(run)
        entries = sum(o * i for o, i in run.model.inner.shapes)
        if entries > MAX_UPDATE_ENTRIES:
            raise SettingsError(
                f"{run.path}: this run reads LoRAs without a basis (--basis none), so its "
                f"embedding would sketch {entries:,} ΔW entries per LoRA; embed with a run "
                "trained with --basis auto (the default), or --unsupervised"
            )
        return cls(RUN, run.spec, run=run, run_sha256=file_sha256(run.path / CHECKPOINT)[1])

    @property
    def per_dimension(self) -> bool:
        """Whether an index standardizes these vectors dimension by dimension (the spectral
        features, of mixed units) or only centers them (a run's, whose distances mean what
        they are: standardizing the basis's coordinates one by one would whiten them)."""
        return self.kind == UNSUPERVISED

    @classmethod
    def unsupervised(cls, spec: LayerSpec, k: int | None = None) -> Embedder:
        return cls(UNSUPERVISED, spec, k=int(k if k is not None else max(spec.ranks)))

    def describe(self) -> dict[str, Any]:
        """What rebuilds this embedder (written into an index): kind, and the run or k."""
        if self.kind == RUN:
            assert self.run is not None
            return {
                "kind": RUN,
                "run": str(self.run.path.resolve()),
                "model": self.run.config["model"]["name"],
                "checkpoint_sha256": self.run_sha256,
            }
        return {"kind": UNSUPERVISED, "k": self.k}

    def check(self, spec: LayerSpec, what: str) -> None:
        """Refuse LoRAs whose layers differ (names, order, shapes) from this embedder's."""
        problem = self.spec.describe_mismatch(spec)
        if problem:
            raise InputError(f"{what} does not fit this embedding's layers: {problem}")

    @torch.no_grad()
    def __call__(self, batch: LoRABatch) -> np.ndarray:
        if self.kind == UNSUPERVISED:
            return spectral_features(batch, self.k).cpu().numpy()
        assert self.run is not None
        model = self.run.model.eval()
        inner = model.prepare(batch.pad_to(np.maximum(batch.spec.ranks, self.run.spec.ranks)))
        update = unit_rows(linear_features(inner, "dense"))
        if update.shape[1] > UPDATE_DIM:
            update = unit_rows(count_sketch(update, UPDATE_DIM))
        with model.given_prepared():
            out = model(inner).double()
        if self.run.task.kind == CLASSIFICATION:
            out = 2 * torch.sigmoid(out) - 1
        out = out / math.sqrt(out.shape[1])
        return torch.cat([update.to(out.device), out], dim=1).float().cpu().numpy()

    def store(self, store: LoRAStore, rows: Sequence[int] | None = None, batch_size: int = 256):
        """(len(rows), D) vectors of the store's LoRAs (default: all rows), in row order."""
        self.check(store.spec, f"store {store.path}")
        outs = [self(b) for _, b in store.iter_batches(batch_size, rows=rows)]
        return _finite(np.concatenate(outs) if outs else np.zeros((0, 0), np.float32), store.path)

    def loras(self, loras: Sequence[LoRA], names: Sequence[str], batch_size: int = 64):
        """(len(loras), D) vectors of LoRAs read from files (``names`` say which, in errors)."""
        for lora, name in zip(loras, names):
            self.check(spec_of(lora), str(name))
        outs = [
            self(collate(list(loras[s : s + batch_size]))) for s in range(0, len(loras), batch_size)
        ]
        return _finite(np.concatenate(outs), ", ".join(map(str, names[:3])))


def _finite(x: np.ndarray, where: Any) -> np.ndarray:
    if not np.isfinite(x).all():
        raise InputError(f"{where}: the embedding has NaN/inf values for some LoRAs")
    return x.astype(np.float32, copy=False)


def read_adapters(paths: Sequence[str | os.PathLike]) -> list[LoRA]:
    """Every adapter file or folder read (``formats.load_lora``), in order."""
    from loralens.formats import load_lora

    return [load_lora(p) for p in paths]


def embed(
    *,
    run: Run | str | os.PathLike | None = None,
    data: LoRAStore | str | os.PathLike | None = None,
    adapters: Sequence[str | os.PathLike] = (),
    batch_size: int = 256,
) -> tuple[list[str], np.ndarray, dict[str, Any]]:
    """Embed a store's LoRAs (``data``) or adapter files with ``run``'s model, or with the
    unsupervised spectral features when ``run`` is None. Returns (names, (N, D), description)."""
    if (data is None) == (not adapters):
        raise SettingsError("embed either a store (data=) or adapter files (adapters=), not both")
    if data is not None:
        store = data if isinstance(data, LoRAStore) else LoRAStore(data)
        emb = Embedder.of_run(run) if run is not None else Embedder.unsupervised(store.spec)
        return store.ids, emb.store(store, batch_size=batch_size), emb.describe()
    loras = read_adapters(adapters)
    names = [str(p) for p in adapters]
    spec = collate(loras[:1]).spec
    emb = Embedder.of_run(run) if run is not None else Embedder.unsupervised(spec)
    return names, emb.loras(loras, names), emb.describe()


def embedding_outputs(out: str | os.PathLike, overwrite: bool = False) -> dict[Path, bool]:
    """The two files :func:`save_embeddings` writes, ``out`` (.npy) and ``out`` with .json,
    each with whether it replaces one there: only with ``overwrite``, and only a .npy array or
    an embedding's rows file (anything else there is refused, ``OutputExistsError``)."""
    out = Path(out)
    if out.suffix != ".npy":
        raise SettingsError(f"{out}: embeddings are written as .npy (give a name ending in .npy)")
    side = out.with_suffix(".json")
    return {
        out: replaceable(out, overwrite=overwrite, ours=_is_npy, what="a .npy array"),
        side: replaceable(side, overwrite=overwrite, ours=_is_rows, what="an embedding's rows"),
    }


def _is_npy(path: Path) -> bool:
    try:
        with open_regular(path, follow=False) as f:
            return f.read(6) == b"\x93NUMPY"
    except OSError:
        return False


def _is_rows(path: Path) -> bool:
    try:
        return set(read_json_object(path, follow=False)) == {"embedding", "shape", "rows"}
    except InputError:
        return False


def save_embeddings(
    out: str | os.PathLike,
    names: Sequence[str],
    vectors: np.ndarray,
    description: dict[str, Any],
    *,
    overwrite: bool = False,
) -> Path:
    """``out`` (.npy, float32 (N, D), no pickle) and beside it ``out`` with .json: the LoRAs
    row by row and how they were embedded, each written whole (:func:`embedding_outputs` says
    what may be replaced). Returns the JSON's path."""
    (npy, replace_npy), (side, replace_side) = embedding_outputs(out, overwrite).items()
    with new_file(npy, replace=replace_npy) as f:
        np.save(f, np.ascontiguousarray(vectors, dtype=np.float32), allow_pickle=False)
    rows = {"embedding": description, "shape": list(vectors.shape), "rows": list(names)}
    write_file_atomic(side, dumps(rows) + "\n", replace=replace_side)
    return side


__all__ = [
    "RUN",
    "UNSUPERVISED",
    "Embedder",
    "embed",
    "embedding_outputs",
    "save_embeddings",
    "spectral_features",
]
