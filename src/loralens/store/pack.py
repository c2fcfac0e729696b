"""Packing a folder of adapters plus a labels CSV into a store, and keeping a zoo's store current.

Labels are joined to adapters by name (see :mod:`loralens.store.labels`), never by position.
Only what the names lead to inside the adapters folder is read, and only regular files and
folders (a named pipe is refused, never opened). Adapters that cannot be read or do not fit
the others are refused and reported by name; so are names without an adapter and adapters
without a name, unless asked to skip them.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from loralens.atomic import special_kind
from loralens.store.format import INFO, StoreError
from loralens.store.labels import labels_frame, read_labels
from loralens.store.reader import LoRAStore
from loralens.store.writer import StoreWriter, refuse_existing
from loralens.zoo.folder import ADAPTERS, LABELS, MANIFEST

if TYPE_CHECKING:
    from loralens.formats import LoRAReader

#: File suffixes of single-file adapters (anything else in the folder that is not a folder is
#: not an adapter).
ADAPTER_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
#: How many adapters the layer layout of a new store is chosen from (the most common one).
LAYOUT_SAMPLE = 16
_MISSING = "not found"


class PackError(StoreError):
    """Some adapters were refused; ``refused`` lists (adapter, reason). Nothing was written."""

    def __init__(self, message: str, refused: list[tuple[str, str]]):
        super().__init__(message)
        self.refused = refused


def _adapter_entries(adapters_dir: Path) -> list[str]:
    """Names of the adapters in a folder: single adapter files (by suffix; one that is a named
    pipe or device is listed, to be refused by name) and sub-folders that hold an adapter, not
    what people keep beside their adapters (a base model's folder, a dataset, samples)."""
    return [
        p.name
        for p in sorted(adapters_dir.iterdir())
        if not p.name.startswith(".")
        and (p.suffix in ADAPTER_SUFFIXES if not p.is_dir() else _holds_adapter(p))
    ]


def _holds_adapter(folder: Path) -> bool:
    """Whether a folder is an adapter: PEFT's config or weights (readable or not: a broken
    adapter is still refused by name), or a LoRA file a reader recognizes."""
    from loralens.formats import LoRAFormatError, detect_format
    from loralens.formats.peft import CONFIG_NAME, WEIGHT_NAMES

    if any(os.path.lexists(folder / name) for name in (CONFIG_NAME, *WEIGHT_NAMES)):
        return True
    try:
        detect_format(folder)
    except LoRAFormatError:
        return False
    return True


def _inside(real_root: str, path: Path) -> bool:
    real = os.path.realpath(path)
    return real != real_root and os.path.commonpath([real_root, real]) == real_root


def _resolve_adapter(adapters_dir: Path, name: str) -> tuple[Path | None, str]:
    """(the file or folder an adapter name refers to, why it cannot be read: '' when it can;
    a special file, or something leading outside the folder), or (None, _MISSING). The name
    may omit the suffix."""
    real_root = os.path.realpath(adapters_dir)
    for candidate in (name, *(name + ext for ext in ADAPTER_SUFFIXES)):
        path = adapters_dir / candidate
        try:
            kind = special_kind(path)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as e:
            return path, f"unreadable: {e}"
        if kind:
            return path, f"{candidate} is {kind}, not an adapter file or folder"
        inner = list(path.iterdir()) if path.is_dir() else []
        for p in (path, *inner):
            if not _inside(real_root, p):
                return path, f"{p.relative_to(adapters_dir)} leads outside {adapters_dir}"
            with contextlib.suppress(FileNotFoundError):
                kind = special_kind(p)
            if kind:
                return path, f"{p.relative_to(adapters_dir)} is {kind}, not a file"
        return path, ""
    return None, _MISSING


def _unlabeled(root: Path, found: Mapping[str, Path]) -> list[str]:
    """The adapters in ``root`` that none of the ``found`` paths is, or lies in."""
    real_root = os.path.realpath(root)
    covered = set()
    for path in found.values():
        real = os.path.realpath(path)
        while real != real_root and real not in covered:
            covered.add(real)
            real = os.path.dirname(real)
    return [e for e in _adapter_entries(root) if os.path.realpath(root / e) not in covered]


def _zoo_parts(root: Path) -> tuple[Path, Path | None, dict | None]:
    """(adapters folder, its labels CSV, its zoo manifest) when ``root`` is a zoo folder."""
    if not ((root / ADAPTERS).is_dir() and os.path.lexists(root / LABELS)):
        return root, None, None
    manifest = None
    if (root / MANIFEST).is_file():
        with contextlib.suppress(ValueError):
            manifest = json.loads((root / MANIFEST).read_text())
    return root / ADAPTERS, root / LABELS, manifest


def _common_layout(layouts: Sequence[tuple | None]) -> tuple[list[str], list] | None:
    """The (names, shapes) most of the readable adapters' ``layouts`` share (None: unreadable),
    or None if none is readable."""
    counts: dict[tuple, int] = {}
    for key in layouts:
        if key is not None:
            counts[key] = counts.get(key, 0) + 1
    if not counts:
        return None
    names, shapes = max(counts, key=lambda key: counts[key])
    return list(names), list(shapes)


@dataclass
class _Targets:
    """What a pack reads: label records and their adapter paths; and what it leaves out:
    ``bad`` (refused unless skip_bad), ``missing`` names and ``unlabeled`` adapters (refused
    unless skip_missing), each as (name, why)."""

    records: list[dict]
    paths: dict[str, Path]
    bad: list[tuple[str, str]]
    missing: list[tuple[str, str]]
    unlabeled: list[tuple[str, str]]


def _targets(root: Path, frame: pd.DataFrame, labels_name: str | None) -> _Targets:
    """Resolve the adapters ``frame`` names; names leading to one adapter twice are refused."""
    records = frame.to_dict("records")
    out = _Targets([], {}, [], [], [])
    refused: dict[str, Path] = {}  # named, found, but not readable as an adapter
    for rec in records:
        name = rec["adapter"]
        path, why = _resolve_adapter(root, name)
        if path is not None and not why:
            out.records.append(rec)
            out.paths[name] = path
        elif labels_name is not None and why == _MISSING:
            out.missing.append((name, f"named in {labels_name} but not found in {root}"))
        else:
            out.bad.append((name, why))
            if path is not None:
                refused[name] = path
    by_path: dict[str, list[str]] = {}
    for name, path in out.paths.items():
        by_path.setdefault(os.path.realpath(path), []).append(name)
    twice = [names for names in by_path.values() if len(names) > 1]
    if twice:
        raise StoreError(
            f"{labels_name}: adapters listed twice: {', '.join(map(repr, twice[0]))} all name "
            f"{out.paths[twice[0][0]]}; list each adapter once"
        )
    if labels_name is not None:
        why = f"in {root} but not named in {labels_name}"
        out.unlabeled = [(n, why) for n in _unlabeled(root, {**out.paths, **refused})]
    return out


def pack(
    adapters_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    labels: str | os.PathLike | pd.DataFrame | None = None,
    dtype: str = "float32",
    append: bool = False,
    overwrite: bool = False,
    skip_bad: bool = False,
    skip_missing: bool = False,
    load: Callable[[Path], LoRAReader] | None = None,
    progress: Callable[[int, int, str], Any] | None = None,
    made_by: Mapping[str, Any] | None = None,
) -> tuple[LoRAStore, list[tuple[str, str]]]:
    """Pack a folder of adapters (any supported format) plus labels into a store at ``out``.

    ``labels`` is a CSV (or frame) naming adapters (sub-folder or file name, extension
    optional; see :mod:`loralens.store.labels`). Without labels every adapter in the folder is
    packed. ``adapters_dir`` may also be a zoo folder holding ``adapters/`` and
    ``labels.csv``. Names the folder lacks, and adapters in the folder the labels do not name,
    are refused (a :class:`PackError` listing them, nothing written) unless ``skip_missing``,
    which leaves them out. The layer layout is the store's own when appending, else the most
    common one among the first adapters (from their headers). Adapters that cannot be read, are
    not regular files or folders, or whose layers do not fit are refused: with ``skip_bad``
    they are left out, otherwise a :class:`PackError` lists them all and nothing is written.
    Everything left out is recorded by name in ``store.json``'s history and returned as (name,
    reason). ``progress(i, n, name)`` is called after each adapter.

    Each adapter is opened with ``load`` (default :func:`~loralens.formats.open_lora`) and
    written a layer at a time: memory holds one layer, never a whole adapter.
    """
    from loralens.formats import open_lora

    load = load or open_lora
    if not (append or overwrite):  # before any adapter is read; checked again under the lock
        refuse_existing(Path(out))
    root, zoo_labels, zoo_info = _zoo_parts(Path(adapters_dir))
    if labels is None:
        labels = zoo_labels
    if not root.is_dir():
        raise StoreError(f"{root} is not a folder of adapters")
    labels_name = None  # how errors name the labels
    if labels is None:
        frame = pd.DataFrame({"adapter": _adapter_entries(root)})
    elif isinstance(labels, pd.DataFrame):
        labels_name = "the labels frame"
        frame = labels_frame(labels, labels_name)
    else:
        labels_name = str(labels)
        frame = read_labels(labels)
    if frame.empty:
        raise StoreError(f"no adapters to pack in {root}")
    targets = _targets(root, frame, labels_name)
    gaps = targets.missing + targets.unlabeled
    if gaps and not skip_missing:
        parts = [
            f"{len(targets.missing)} adapter(s) named in {labels_name} are not in {root}"
            * bool(targets.missing),
            f"{len(targets.unlabeled)} adapter(s) in {root} are not named in {labels_name}"
            * bool(targets.unlabeled),
        ]
        raise PackError(
            f"{', '.join(p for p in parts if p)}; nothing was written (pass skip_missing / "
            "--skip-missing to pack the adapters both name)",
            gaps,
        )
    records, paths, bad = targets.records, targets.paths, targets.bad
    label_cols = [c for c in frame.columns if c != "adapter"]
    refused: set[int] = set()  # adapters that could not even be opened

    def _open(k: int) -> LoRAReader | None:
        name = str(records[k]["adapter"])
        try:
            return load(paths[name])
        except Exception as e:  # hostile or broken files are refused, never fatal
            bad.append((name, f"unreadable: {e}"))
            refused.add(k)
            return None

    meta = {"command": "pack", "adapters": str(root), "labels": labels_name}
    meta.update(made_by or {})
    with StoreWriter.open(out, append=append, overwrite=overwrite, dtype=dtype, made_by=meta) as w:
        if not w.appending:
            if zoo_info is not None:
                w.made_by["zoo"] = zoo_info
            layouts = []
            for k in range(min(LAYOUT_SAMPLE, len(records))):
                reader = _open(k)  # the header is enough: the names and shapes are known
                layouts.append(None if reader is None else _layout_of(reader))
                if reader is not None:
                    reader.close()
            layout = _common_layout(layouts)
            if layout is not None:
                w.set_layout(*layout)
        for k, rec in enumerate(records):
            name = str(rec["adapter"])
            reader = None if k in refused else _open(k)
            if reader is not None:
                with reader:
                    _add(w, reader, name, paths[name], {c: rec[c] for c in label_cols}, bad)
            if progress is not None:
                progress(k + 1, len(records), name)
        if bad and not skip_bad:
            raise PackError(
                f"{len(bad)} of {len(frame)} adapters refused; nothing was written "
                "(pass skip_bad / --skip-bad to pack the rest)",
                bad,
            )
        if not len(w) and not w.appending:
            raise PackError("no adapter could be packed", bad + gaps)
        if bad or targets.missing:
            w.made_by["refused"] = [name for name, _ in targets.missing + bad]
        if targets.unlabeled:
            w.made_by["unlabeled"] = [name for name, _ in targets.unlabeled]
    return LoRAStore(out), gaps + bad


def _layout_of(reader: LoRAReader) -> tuple:
    return tuple(reader.names), tuple(tuple(s) for s in reader.shapes)


def _add(
    w: StoreWriter,
    reader: LoRAReader,
    name: str,
    path: Path,
    labels: dict[str, Any],
    bad: list[tuple[str, str]],
) -> None:
    """Write one open adapter, or add to ``bad`` why not: layers that do not fit, values the
    reader refuses as it reads them, or what the store refuses (NaN or inf in its dtype)."""
    problem = w.mismatch(reader)
    if problem:
        bad.append((name, f"layers do not fit the others: {problem}"))
        return
    try:
        w.add(reader, id=name, source=str(reader.metadata.get("source", path)), labels=labels)
    except StoreError as e:  # NaN or inf factors, an id already stored
        bad.append((name, str(e)))
    except Exception as e:  # a layer the reader refuses (NaN weights, a corrupt tensor, ...)
        bad.append((name, f"unreadable: {e}"))


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
    zoo's labels.csv (:func:`is_packed_from`), else packed anew, skipping bad adapters and
    any the labels and the adapters folder do not both name."""
    zoo, target = Path(zoo), Path(target)
    if is_packed_from(target, zoo / LABELS):
        return target
    log(f"packing {zoo} into {target}")
    store, refused = pack(zoo, target, overwrite=True, skip_bad=True, skip_missing=True)
    for name, why in refused:
        log(f"skipped {name}: {why}")
    log(f"packed {len(store)} LoRAs")
    return target
