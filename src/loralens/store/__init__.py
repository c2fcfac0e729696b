"""The packed store: many LoRAs of one layer layout in a directory, memory-mapped, batched fast.

``format`` defines the files (see its docstring for the layout), ``reader`` opens a store
(:class:`LoRAStore`), ``integrity`` holds the checks made on opening it, ``verify`` the full
check (:func:`verify_store`), ``writer`` writes one atomically (:class:`StoreWriter`,
:func:`write_store`), ``labels`` reads a labels CSV, ``pack`` turns a folder of adapters plus
labels into a store.
"""

from loralens.store.format import StoreError, shapes_key
from loralens.store.labels import read_labels
from loralens.store.pack import PackError, is_packed_from, pack, pack_zoo_cached
from loralens.store.reader import LoRAStore
from loralens.store.verify import StoreReport, verify_store
from loralens.store.writer import StoreWriter, write_store

__all__ = [
    "LoRAStore",
    "PackError",
    "StoreError",
    "StoreReport",
    "StoreWriter",
    "is_packed_from",
    "pack",
    "pack_zoo_cached",
    "read_labels",
    "shapes_key",
    "verify_store",
    "write_store",
]
