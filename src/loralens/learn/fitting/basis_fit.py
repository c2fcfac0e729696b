"""The basis a run's models read LoRAs through (:mod:`loralens.models.basis`), fitted on the
factors of its training LoRAs in a store."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from loralens.models.basis import UpdateBasis
from loralens.store import LoRAStore

#: Most LoRAs a basis is fitted on (a seeded sample of the training LoRAs above this), and the
#: most bytes of float32 factors they may hold together (fewer where each is large; >= 16).
BASIS_REFERENCE = 512
BASIS_SAMPLE_BYTES = 2**30
_bases: OrderedDict[tuple, UpdateBasis] = OrderedDict()


def fit_basis(store: LoRAStore, rows: np.ndarray, seed: int) -> UpdateBasis:
    """The basis of the updates of store ``rows`` (a seeded sample of at most BASIS_REFERENCE
    of them, fewer where their factors pass BASIS_SAMPLE_BYTES). The few most recent are kept
    by (store, rows, seed): a run's model and its probes fit the same one."""
    rows = np.sort(np.asarray(rows, dtype=np.int64))
    key = (str(store.path), id(store), rows.tobytes(), int(seed))
    if key not in _bases:
        pad = store.ranks[rows].max(axis=0)
        per_lora = 4 * sum((o + i) * int(r) for (o, i), r in zip(store.shapes, pad))
        size = max(16, min(BASIS_REFERENCE, BASIS_SAMPLE_BYTES // max(per_lora, 1)))
        sample = rows
        if len(rows) > size:
            sample = np.sort(np.random.default_rng(seed).choice(rows, size, replace=False))
        _bases[key] = UpdateBasis.fit(store.batch(sample, pad_ranks=pad), seed=seed)
        while len(_bases) > 4:
            _bases.popitem(last=False)
    _bases.move_to_end(key)
    return _bases[key]


__all__ = ["BASIS_REFERENCE", "BASIS_SAMPLE_BYTES", "fit_basis"]
