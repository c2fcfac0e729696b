"""Packing a folder of adapters plus a labels CSV into a store, and keeping a zoo's store current.

Labels are joined to adapters by name (the CSV's first column names a sub-folder or file of
the folder, extension optional), never by position. Adapters that cannot be read or do not fit
the others are refused and reported by name.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from loralens.lora import LoRA
from loralens.store.format import INFO, StoreError
from loralens.store.reader import LoRAStore
from loralens.store.writer import StoreWriter
from loralens.zoo.folder import ADAPTERS, LABELS, MANIFEST

#: File suffixes of single-file adapters (anything else in the folder that is not a folder is
#: not an adapter).
ADAPTER_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
#: How many adapters the layer layout of a new store is chosen from (the most common one).
LAYOUT_SAMPLE = 16


class PackError(StoreError):
    """Some adapters were refused; ``refused`` lists (adapter, reason). Nothing was written."""

    def __init__(self, message: str, refused: list[tuple[str, str]]):
        super().__init__(message)
        self.refused = refused


def read_labels(path: str | os.PathLike) -> pd.DataFrame:
    """A labels CSV whose first column names the adapters (``adapter``), one row each."""
    frame = pd.read_csv(path, converters={0: str})  # "000017" stays a name, not 17
    if frame.empty or len(frame.columns) == 0:
        raise StoreError(f"{path}: no rows")
    first = frame.columns[0]
    frame = frame.rename(columns={first: "adapter"})
    frame["adapter"] = frame["adapter"].astype(str)
    dupes = frame["adapter"][frame["adapter"].duplicated()].tolist()
    if dupes:
        raise StoreError(f"{path}: adapters listed twice: {dupes[:5]}")
    return frame


def _adapter_entries(adapters_dir: Path) -> list[str]:
    """Names of the adapters in a folder: sub-folders and single adapter files."""
    return [
        p.name
        for p in sorted(adapters_dir.iterdir())
        if not p.name.startswith(".") and (p.is_dir() or p.suffix in ADAPTER_SUFFIXES)
    ]


def _resolve_adapter(adapters_dir: Path, name: str) -> Path | None:
    """The file or folder an adapter name refers to (the name may omit the file suffix)."""
    for candidate in (name, *(name + ext for ext in ADAPTER_SUFFIXES)):
        if (adapters_dir / candidate).exists():
            return adapters_dir / candidate
    return None


def _zoo_parts(root: Path) -> tuple[Path, Path | None, dict | None]:
    """(adapters folder, its labels CSV, its zoo manifest) when ``root`` is a zoo folder."""
    if not ((root / ADAPTERS).is_dir() and (root / LABELS).is_file()):
        return root, None, None
    manifest = None
    if (root / MANIFEST).is_file():
        with contextlib.suppress(ValueError):
            manifest = json.loads((root / MANIFEST).read_text())
    return root / ADAPTERS, root / LABELS, manifest


def _common_layout(loras: Sequence[LoRA | None]) -> tuple[list[str], list] | None:
    """The (names, shapes) most of the readable ``loras`` share, or None if none is readable."""
    counts: dict[tuple, int] = {}
    for lora in loras:
        if lora is not None:
            key = (tuple(lora.names), tuple(lora.shapes))
            counts[key] = counts.get(key, 0) + 1
    if not counts:
        return None
    names, shapes = max(counts, key=lambda key: counts[key])
    return list(names), list(shapes)


def pack(
    adapters_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    labels: str | os.PathLike | pd.DataFrame | None = None,
    dtype: str = "float32",
    append: bool = False,
    overwrite: bool = False,
    skip_bad: bool = False,
    load: Callable[[Path], LoRA] | None = None,
    progress: Callable[[int, int, str], Any] | None = None,
    made_by: Mapping[str, Any] | None = None,
) -> tuple[LoRAStore, list[tuple[str, str]]]:
    """Pack a folder of adapters (any supported format) plus labels into a store at ``out``.

    ``labels`` is a CSV (or frame) whose first column names adapters (sub-folder or file name,
    extension optional); only listed adapters are packed. Without labels every adapter in the
    folder is packed. ``adapters_dir`` may also be a zoo folder holding ``adapters/`` and
    ``labels.csv``. The layer layout is the store's own when appending, else the most common
    one among the first adapters. Adapters that cannot be read or whose layers do not fit are
    refused: with ``skip_bad`` they are left out, recorded by name in ``store.json``'s history
    and returned as (name, reason); otherwise a :class:`PackError` lists them all and nothing
    is written. ``progress(i, n, name)`` is called after each adapter.
    """
    from loralens.formats import load_lora

    load = load or load_lora
    root, zoo_labels, zoo_info = _zoo_parts(Path(adapters_dir))
    if labels is None:
        labels = zoo_labels
    if not root.is_dir():
        raise StoreError(f"{root} is not a folder of adapters")
    if labels is None:
        frame = pd.DataFrame({"adapter": _adapter_entries(root)})
    elif isinstance(labels, pd.DataFrame):
        frame = labels.rename(columns={labels.columns[0]: "adapter"})
    else:
        frame = read_labels(labels)
    if frame.empty:
        raise StoreError(f"no adapters to pack in {root}")
    label_cols = [c for c in frame.columns if c != "adapter"]
    records = frame.to_dict("records")

    refused: list[tuple[str, str]] = []
    loaded: dict[int, LoRA | None] = {}

    def _load(k: int) -> LoRA | None:
        if k in loaded:
            return loaded.pop(k)
        name = str(records[k]["adapter"])
        path = _resolve_adapter(root, name)
        if path is None:
            refused.append((name, "not found"))
            return None
        try:
            lora = load(path)
        except Exception as e:  # hostile or broken files are refused, never fatal
            refused.append((name, f"unreadable: {e}"))
            return None
        lora.metadata.setdefault("source", str(path))
        return lora

    meta = {
        "command": "pack",
        "adapters": str(root),
        "labels": str(labels) if labels is not None else None,
    }
    meta.update(made_by or {})
    writer = StoreWriter.open(out, append=append, overwrite=overwrite, dtype=dtype, made_by=meta)
    if not writer.appending:
        if zoo_info is not None:
            writer.made_by["zoo"] = zoo_info
        for k in range(min(LAYOUT_SAMPLE, len(records))):
            loaded[k] = _load(k)  # kept (or its refusal) for the main pass
        layout = _common_layout(list(loaded.values()))
        if layout is not None:
            writer.set_layout(*layout)
    with writer:
        for k, rec in enumerate(records):
            name = str(rec["adapter"])
            lora = _load(k)
            if lora is not None:
                problem = writer.mismatch(lora)
                if problem:
                    refused.append((name, f"layers do not fit the others: {problem}"))
                else:
                    writer.add(
                        lora,
                        id=name,
                        source=str(lora.metadata.get("source", "")),
                        labels={c: rec[c] for c in label_cols},
                    )
            if progress is not None:
                progress(k + 1, len(records), name)
        if refused and not skip_bad:
            raise PackError(
                f"{len(refused)} of {len(records)} adapters refused; nothing was written "
                "(pass skip_bad / --skip-bad to pack the rest)",
                refused,
            )
        if not len(writer) and not writer.appending:
            raise PackError("no adapter could be packed", refused)
        if refused:
            writer.made_by["refused"] = [name for name, _ in refused]
    return LoRAStore(out), refused


def is_packed_from(store_path: str | os.PathLike, labels_csv: str | os.PathLike) -> bool:
    """Whether the store at ``store_path`` holds, or refused when packed, exactly the adapters
    ``labels_csv`` names (False when either is missing or unreadable)."""
    store_path, labels_csv = Path(store_path), Path(labels_csv)
    if not (store_path / INFO).is_file() or not labels_csv.is_file():
        return False
    try:
        store = LoRAStore(store_path)
        wanted = set(read_labels(labels_csv)["adapter"])
    except (StoreError, ValueError, OSError):
        return False
    refused = {str(n) for e in store.info.get("history", []) for n in e.get("refused", [])}
    return wanted == set(store.ids) | refused


def pack_zoo_cached(
    zoo: str | os.PathLike,
    target: str | os.PathLike,
    log: Callable[[str], Any] = lambda _: None,
) -> Path:
    """The zoo folder packed into a store at ``target``: reused when it is up to date with the
    zoo's labels.csv (:func:`is_packed_from`), else packed anew, skipping bad adapters."""
    zoo, target = Path(zoo), Path(target)
    if is_packed_from(target, zoo / LABELS):
        return target
    log(f"packing {zoo} into {target}")
    store, refused = pack(zoo, target, overwrite=True, skip_bad=True)
    for name, why in refused:
        log(f"skipped {name}: {why}")
    log(f"packed {len(store)} LoRAs")
    return target
