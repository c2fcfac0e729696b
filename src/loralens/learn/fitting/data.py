"""What a run learns from: target columns, the rows used (``--where``), their train/val/test
split, the DataLoader over store rows, and the zoo's finetuning hyperparameter columns."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from loralens.errors import InputError
from loralens.learn.fitting.rowfilter import row_mask
from loralens.lora import LoRABatch
from loralens.store import LoRAStore, StoreError
from loralens.store.format import INTERNAL_COLUMNS

if TYPE_CHECKING:
    from loralens.learn.fitting.tasks import Task

SPLITS = ("train", "val", "test")

#: Finetuning hyperparameter columns guessed by name for zoos whose manifest does not list them.
KNOWN_HPARAMS = (
    "lr",
    "learning_rate",
    "weight_decay",
    "epochs",
    "batch_size",
    "grad_accum",
    "gradient_accumulation",
    "lora_dropout",
    "rank",
    "rank_label",
    "lora_alpha",
    "n_train",
    "steps",
    "max_steps",
    "num_images",
    "n_images",
    "data_seed",
    "prompt_id",
    "init_seed",
)


# ---------------------------------------------------------------------------------- columns


def resolve_targets(store: LoRAStore, spec: str) -> list[str]:
    """``"a,b"`` or a glob (``"src_*"``) -> label columns of ``store``."""
    cols = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        hits = (
            [c for c in store.label_columns if fnmatch.fnmatchcase(c, part)]
            if any(ch in part for ch in "*?[")
            else [part] * (part in store.index.columns)
        )
        if not hits:
            raise StoreError(f"target {part!r} matches no column; labels: {store.label_columns}")
        cols += [c for c in hits if c not in cols]
    return cols


def hparam_columns(store: LoRAStore, exclude: Sequence[str] = ()) -> list[str]:
    """The zoo's finetuning hyperparameter columns that vary, ``exclude`` left out.

    They are the list ``hyperparameter_columns`` of the zoo manifest (``zoo.json``), which
    ``pack`` copies into the store's history (``store.json``: ``history[i]["zoo"]``; the last
    entry that has a zoo counts), even when empty; a store packed from an older zoo without
    that key, or from no zoo, falls back to the columns named in ``KNOWN_HPARAMS``.
    """
    zoo = {}
    for entry in store.info.get("history", []):
        zoo = entry.get("zoo") or zoo
    listed = zoo.get("hyperparameter_columns") if isinstance(zoo, dict) else None
    if listed is None:
        listed = [c for c in KNOWN_HPARAMS if c in store.index.columns]
    cols = list(listed)
    out = []
    for c in cols:
        if c in exclude or c not in store.index.columns:
            continue
        v = store.labels([c]).ravel()
        if np.isfinite(v).any() and np.nanstd(v) > 0:
            out.append(c)
    return out


def check_finite_labels(
    store: LoRAStore, targets: Sequence[str], y: np.ndarray, rows: np.ndarray
) -> None:
    """Refuse inf/-inf among the labels ``y[rows]`` of ``targets`` (one inf trains a NaN model);
    NaN is a missing label, left out of losses and metrics, and stays allowed."""
    counts = np.isinf(y[rows]).sum(axis=0)
    if counts.any():
        bad = [f"{t!r} ({n} row{'s' * (n > 1)})" for t, n in zip(targets, counts.tolist()) if n]
        raise StoreError(
            f"{store.path}: target column {', '.join(bad)} holds inf/-inf labels; "
            "fix or remove them (an empty label is missing and left out)"
        )


def encode_targets(store: LoRAStore, task: Task, y: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``task.encode(y)`` in float32, what the model trains on; refused where a label of
    ``rows`` is finite but overflows once standardized (1e300: a NaN model otherwise)."""
    enc = task.encode(y).astype(np.float32)
    counts = (~np.isfinite(enc[rows]) & ~np.isnan(y[rows])).sum(axis=0)
    if counts.any():
        bad = [f"{t!r} ({n} rows)" for t, n in zip(task.targets, counts.tolist()) if n]
        raise StoreError(
            f"{store.path}: labels of {', '.join(bad)} are too large to train on (standardized, "
            "they overflow float32); rescale them"
        )
    return enc


# ---------------------------------------------------------------------------------- rows


def select_rows(store: LoRAStore, where: str | None) -> np.ndarray:
    """Row indices of ``store`` where the filter ``where`` holds (all rows when it is empty).

    ``where`` is in the filter language of :mod:`loralens.learn.fitting.rowfilter` over the store's
    label and design columns (``id``, ``rank``, ...); a filter outside it raises ``FilterError``.
    """
    if not where:
        return np.arange(len(store))
    frame = store.index.drop(columns=list(INTERNAL_COLUMNS), errors="ignore")
    return np.flatnonzero(row_mask(frame, where)).astype(np.int64)


#: Fewer labelled LoRAs than this: ``train`` refuses (no split measures anything).
MIN_LORAS = 10
#: Fewer labelled LoRAs than this (and no ``split`` column): k-fold cross-validation.
CV_BELOW = 60
#: Folds of that cross-validation.
CV_FOLDS = 5


def _stratified(
    strata: np.ndarray, rng: np.random.Generator, fractions: tuple[float, float, float]
) -> dict[str, np.ndarray]:
    """Per stratum (class), its fractions of rows to val and test, at least one each where the
    stratum has 3 rows or more, so every split holds every class that can be spread."""
    out: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for value in np.unique(strata):
        idx = rng.permutation(np.flatnonzero(strata == value))
        m = len(idx)
        n_val, n_test = (round(m * fractions[1]), round(m * fractions[2]))
        if m >= 3:
            n_val = max(n_val, int(fractions[1] > 0))
            n_test = max(n_test, int(fractions[2] > 0))
        out["test"].append(idx[:n_test])
        out["val"].append(idx[n_test : n_test + n_val])
        out["train"].append(idx[n_test + n_val :])
    parts = {k: np.sort(np.concatenate(v)) for k, v in out.items()}
    for k in ("test", "val"):  # tiny strata only: take one row from train
        if fractions[SPLITS.index(k)] > 0 and len(parts[k]) == 0 and len(parts["train"]) > 1:
            parts[k], parts["train"] = parts["train"][:1], parts["train"][1:]
    return parts


def split_rows(
    n: int,
    *,
    seed: int = 0,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    split_column: Sequence[Any] | None = None,
    strata: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Deterministic train/val/test row indices: from a ``split`` column if given (values
    train/val/test, and cal for calibration rows; 'valid'/'validation' accepted), else a seeded split of ``fractions``,
    stratified by ``strata`` (e.g. the class of each row) when given."""
    if split_column is not None:
        alias = {"valid": "val", "validation": "val", "dev": "val", "calibration": "cal"}
        values = np.asarray([alias.get(str(v).lower(), str(v).lower()) for v in split_column])
        bad = sorted(set(values) - {*SPLITS, "cal"})
        if bad:
            raise InputError(f"split column has values {bad}; expected train/val/test (/cal)")
        parts = {s: np.flatnonzero(values == s) for s in SPLITS}
        return {**parts, "cal": np.flatnonzero(values == "cal")} if "cal" in values else parts
    if n < 3:
        raise InputError(f"need at least 3 LoRAs to split into train/val/test, got {n}")
    rng = np.random.default_rng(seed)
    if strata is not None:
        return _stratified(np.asarray(strata), rng, fractions)
    perm = rng.permutation(n)
    n_val = max(1, round(n * fractions[1]))
    n_test = max(1, round(n * fractions[2]))
    n_train = n - n_val - n_test
    return {
        "train": np.sort(perm[:n_train]),
        "val": np.sort(perm[n_train : n_train + n_val]),
        "test": np.sort(perm[n_train + n_val :]),
    }


def kfold_rows(
    n: int, k: int, *, seed: int = 0, strata: np.ndarray | None = None
) -> list[dict[str, np.ndarray]]:
    """``k`` train/val/test splits of ``n`` rows whose test parts partition the rows (stratified
    by ``strata`` when given); in each, val is 1/(k-1) of the rest, stratified likewise."""
    rng = np.random.default_rng(seed)
    strata = np.zeros(n, dtype=np.int64) if strata is None else np.asarray(strata)
    order = np.concatenate(
        [rng.permutation(np.flatnonzero(strata == v)) for v in np.unique(strata)]
    )
    fold = np.empty(n, dtype=np.int64)
    fold[order] = np.arange(n) % k
    out = []
    for i in range(k):
        test = np.flatnonzero(fold == i)
        rest = np.flatnonzero(fold != i)
        inner = _stratified(strata[rest], rng, (1 - 1 / (k - 1), 1 / (k - 1), 0.0))
        out.append({"train": rest[inner["train"]], "val": rest[inner["val"]], "test": test})
    return out


def hold_out(
    rows: np.ndarray, share: float, seed: int, strata: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held out) store ``rows``: a seeded ``share`` of them held out (at least one;
    stratified by ``strata``, one per row, when given), e.g. to calibrate on."""
    rows = np.asarray(rows)
    strata = np.zeros(len(rows), dtype=np.int64) if strata is None else np.asarray(strata)
    rng = np.random.default_rng([seed, 0xCA1])
    parts = _stratified(strata, rng, (1.0 - share, share, 0.0))
    return rows[parts["train"]], rows[parts["val"]]


def class_strata(y: np.ndarray) -> np.ndarray:
    """One stratum per row for a classification split: the label of the target column whose
    minority class is rarest (missing: its own stratum)."""
    y = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    minority = [min(np.nansum(c == 1), np.nansum(c == 0)) for c in y.T]
    col = y[:, int(np.argmin(minority))]
    return np.where(np.isnan(col), -1, col).astype(np.int64)


def make_splits(
    store: LoRAStore,
    rows: np.ndarray,
    y_all: np.ndarray,
    seed: int,
    *,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    split_column: str | None = "auto",
    classification: bool = False,
    folds: int | None = None,
) -> list[dict[str, np.ndarray]]:
    """Store rows of the train/val/test split(s) among ``rows`` that have any target label:
    one split, or ``folds`` cross-validation splits whose test parts cover every row.

    ``split_column="auto"`` uses the store's ``split`` column when it has one, else a seeded
    split of ``fractions`` (stratified by class when ``classification``); a column name uses
    that column; ``None`` always splits by seed. ``folds=None`` chooses: ``CV_FOLDS`` folds below
    ``CV_BELOW`` labelled LoRAs without a split column, else one split; fewer than
    ``MIN_LORAS`` labelled LoRAs are refused.
    """
    rows = rows[~np.isnan(y_all[rows]).all(axis=1)]
    if len(rows) < MIN_LORAS:
        raise StoreError(
            f"only {len(rows)} LoRAs have these labels: too few to train and measure anything "
            f"(at least {MIN_LORAS} are needed; {CV_BELOW} or more for a held-out test split)"
        )
    if split_column == "auto":
        split_column = "split" if "split" in store.index.columns else None
    strata = class_strata(y_all[rows]) if classification else None
    if split_column:
        parts = [split_rows(0, split_column=store.index[split_column].to_numpy()[rows])]
    elif (folds is None and len(rows) < CV_BELOW) or (folds or 1) > 1:
        parts = kfold_rows(len(rows), folds or CV_FOLDS, seed=seed, strata=strata)
    else:
        parts = [split_rows(len(rows), seed=seed, fractions=fractions, strata=strata)]
    splits = [{k: rows[v] for k, v in p.items()} for p in parts]
    for split in splits:
        for k, v in split.items():
            if len(v) == 0:
                raise StoreError(f"the {k} split is empty ({len(rows)} labelled LoRAs)")
    return splits


def make_split(
    store: LoRAStore,
    rows: np.ndarray,
    y_all: np.ndarray,
    seed: int,
    *,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    split_column: str | None = "auto",
    classification: bool = False,
) -> dict[str, np.ndarray]:
    """The one held-out train/val/test split of :func:`make_splits` (never cross-validation)."""
    return make_splits(
        store,
        rows,
        y_all,
        seed,
        fractions=fractions,
        split_column=split_column,
        classification=classification,
        folds=1,
    )[0]


# ---------------------------------------------------------------------------------- loading


class _Collate:
    """Turns a list of store rows into (rows, LoRABatch, encoded targets)."""

    def __init__(self, store: LoRAStore, y: np.ndarray, pad_ranks: Sequence[int]):
        self.store, self.y, self.pad_ranks = store, y, list(pad_ranks)

    def __call__(self, rows: list[int]) -> tuple[torch.Tensor, LoRABatch, torch.Tensor]:
        idx = np.asarray(rows, dtype=np.int64)
        batch = self.store.batch(idx, pad_ranks=self.pad_ranks)
        return torch.from_numpy(idx), batch, torch.from_numpy(self.y[idx]).float()


class ProjectedRows:
    """Store ``rows`` read once through ``model``'s basis (padded to its ranks) and kept in
    memory, with the store's ``batch`` and ``iter_batches``: what a run's epochs read again and
    again (projecting wide layers anew every epoch would cost more than the network). Its
    batches are what :meth:`LoLModel.prepare` makes: read them inside ``model.given_prepared()``."""

    def __init__(self, store: LoRAStore, model: Any, rows: np.ndarray, pad: Sequence[int]):
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        self.names = list(store.names)
        self.ranks = store.ranks
        self._at = np.full(len(store), -1, dtype=np.int64)
        self._at[rows] = np.arange(len(rows))
        us: list[list[torch.Tensor]] = [[] for _ in self.names]
        vs: list[list[torch.Tensor]] = [[] for _ in self.names]
        with torch.no_grad():
            for _, batch in store.iter_batches(256, rows=rows, pad_ranks=pad):
                inner = model.prepare(batch)
                for k, (u, v) in enumerate(zip(inner.U, inner.V)):
                    us[k].append(u)
                    vs[k].append(v)
        self.U = [torch.cat(u) for u in us]
        self.V = [torch.cat(v) for v in vs]

    def batch(self, rows: Sequence[int] | np.ndarray, *, pad_ranks: Any = None) -> LoRABatch:
        """The projected LoRAs at store ``rows`` (already padded to the model's ranks)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        at = torch.from_numpy(self._at[rows])
        if bool((at < 0).any()):
            raise IndexError("a row that was not projected")
        return LoRABatch(
            names=list(self.names),
            U=[u[at] for u in self.U],
            V=[v[at] for v in self.V],
            ranks=torch.from_numpy(self.ranks[rows].copy()),
        )

    def iter_batches(
        self, batch_size: int = 64, *, rows: np.ndarray, pad_ranks: Any = None
    ) -> Iterator[tuple[np.ndarray, LoRABatch]]:
        """(rows, batch) over ``rows`` in order, like ``LoRAStore.iter_batches``."""
        rows = np.asarray(rows, dtype=np.int64)
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            yield chunk, self.batch(chunk)


def make_loader(
    store: LoRAStore | ProjectedRows,
    y: np.ndarray,
    rows: Sequence[int],
    batch_size: int,
    pad_ranks: Sequence[int],
    *,
    shuffle: bool,
    seed: int,
) -> torch.utils.data.DataLoader:
    """Batches of (rows, LoRABatch padded to ``pad_ranks``, ``y[rows]``) over store ``rows``;
    shuffled by a generator seeded with ``seed`` when ``shuffle``."""
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        [int(r) for r in rows],
        batch_size=batch_size,
        shuffle=shuffle,
        generator=g if shuffle else None,
        collate_fn=_Collate(store, y, pad_ranks),
    )


__all__ = [
    "CV_BELOW",
    "CV_FOLDS",
    "KNOWN_HPARAMS",
    "MIN_LORAS",
    "SPLITS",
    "ProjectedRows",
    "check_finite_labels",
    "class_strata",
    "encode_targets",
    "hold_out",
    "hparam_columns",
    "kfold_rows",
    "make_loader",
    "make_split",
    "make_splits",
    "resolve_targets",
    "select_rows",
    "split_rows",
]
