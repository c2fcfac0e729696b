"""Which LoRAs a run learned from, so ``evaluate`` never passes training data off as unseen.

A run records, for every LoRA it trained or early-stopped on, its id, its source path and a
content hash of its factors (``trained_on.json``); a LoRA of any store is "seen" when its hash
matches, or its id and source both do.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from loralens.lora import LoRA
from loralens.store import LoRAStore

TRAINED_ON = "trained_on.json"


def fingerprint(lora: LoRA) -> str:
    """A hash of a LoRA's factors as float32 (rank padding removed first), equal across
    stores, copies and files holding the same factors."""
    h = hashlib.sha1()
    for layer in lora.layers:
        for f in (layer.U, layer.V):
            h.update(str(tuple(f.shape)).encode())
            h.update(f.float().contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


def fingerprints(store: LoRAStore, rows: np.ndarray) -> list[str]:
    """:func:`fingerprint` of each of store ``rows``."""
    pad = store.ranks[rows].max(axis=0) if len(rows) else None
    batches = store.iter_batches(64, rows=rows, pad_ranks=pad)
    return [fingerprint(lora) for _, batch in batches for lora in batch.unbatch()]


def _sources(store: LoRAStore, rows: np.ndarray) -> list[str]:
    if "source" not in store.index.columns:
        return [""] * len(rows)
    return [str(s) for s in store.index["source"].to_numpy()[rows]]


def trained_on(store: LoRAStore, rows: np.ndarray) -> dict[str, Any]:
    """The record of ``rows`` (train and val of a run) written to ``trained_on.json``."""
    return {
        "store": str(store.path),
        "ids": [store.ids[r] for r in rows],
        "sources": _sources(store, rows),
        "hashes": fingerprints(store, rows),
    }


#: A trained_on.json larger than this is not one (a run of a million LoRAs needs ~100 MiB).
MAX_RECORD_BYTES = 256 << 20


def read_trained_on(run_dir: Path) -> dict[str, list[str]] | None:
    """The record of a run folder, checked (lists of strings of one length); ``None`` for a run
    written before runs kept one. A malformed record raises ``RunError`` naming the file."""
    from loralens.errors import RunError

    path = Path(run_dir) / TRAINED_ON
    if not path.exists():
        return None
    if not path.is_file():
        raise RunError(f"{path}: not a regular file")
    with open(path, "rb") as f:
        data = f.read(MAX_RECORD_BYTES + 1)
    try:
        rec = json.loads(data) if len(data) <= MAX_RECORD_BYTES else None
    except (ValueError, RecursionError):
        rec = None
    keys = ("ids", "sources", "hashes")
    if not (
        isinstance(rec, dict)
        and all(isinstance(rec.get(k), list) for k in keys)
        and len({len(rec[k]) for k in keys}) == 1
        and all(isinstance(x, str) for k in keys for x in rec[k])
    ):
        raise RunError(f"{path}: not a record of training LoRAs (lists ids, sources, hashes)")
    return {k: rec[k] for k in keys}


def seen_mask(record: Mapping[str, Any], store: LoRAStore, rows: np.ndarray) -> np.ndarray:
    """True for each of ``rows`` that the run of ``record`` trained on."""
    hashes = set(record.get("hashes", []))
    pairs = set(zip(record.get("ids", []), record.get("sources", [])))
    mine = fingerprints(store, rows)
    ids = [store.ids[r] for r in rows]
    return np.array(
        [h in hashes or (i, s) in pairs for h, i, s in zip(mine, ids, _sources(store, rows))],
        dtype=bool,
    )


__all__ = [
    "TRAINED_ON",
    "fingerprint",
    "fingerprints",
    "read_trained_on",
    "seen_mask",
    "trained_on",
]
