"""What `loralens inspect` reports: per adapter a summary, its training metadata, the base-model
families it fits, sanity flags and one row per layer; for several adapters (paths, folders of
adapters, hub ids) one report each and a summary of them all."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

from loralens.families import guess_base_model
from loralens.features import describe_layer
from loralens.flags import flags_by_layer, layer_flags
from loralens.formats import LoRAFormatError, open_lora
from loralens.formats.keys import natural_key
from loralens.formats.peft import WEIGHT_NAMES, is_peft_dir
from loralens.formats.tensor_file import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES
from loralens.hub import fetch_adapter, is_hub_id
from loralens.training_metadata import training_metadata


def inspect_adapter(
    path: str | os.PathLike, *, top: int = 4, allow_nonfinite: bool = False
) -> dict[str, Any]:
    """Read the adapter at ``path`` and describe it: format, base model, ranks, parameter count,
    ``training`` (what the file records about its training), ``base_model_guess`` (the file's
    word, else the well-known families its layer names and shapes fit), ``flags`` and per layer
    shape, rank, scale, |delta W|_F, top singular values, effective and numerical rank, and the
    kinds of flag that name it. The layers are read and described one at a time
    (:func:`~loralens.formats.open_lora`): memory holds one layer, never the whole adapter."""
    with open_lora(path, allow_nonfinite=allow_nonfinite) as reader:
        # map lets go of each layer before the next is read (a for loop's variable would not)
        rows = list(map(partial(describe_layer, k=top), reader))
        md = reader.metadata
    flags = layer_flags(rows)
    by_layer = flags_by_layer(flags)
    for row in rows:
        row["flags"] = by_layer.get(row["name"], [])
    report = {
        "path": str(path),
        "format": md.get("format"),
        "base_model": md.get("base_model"),
        "num_layers": len(rows),
        "ranks": sorted({r["rank"] for r in rows}),
        "adapter_params": sum((r["shape"][0] + r["shape"][1]) * r["rank"] for r in rows),
        "training": training_metadata(md),
        "flags": flags,
        "layers": rows,
    }
    report["base_model_guess"] = guess_base_model(report)
    return report


def _adapters_in(folder: Path) -> list[Path]:
    """The adapters directly inside a folder that is not one itself (PEFT sub-folders and
    weights files, in natural order); none for an adapter folder, even one the reader will
    refuse (PEFT weights without their config), or a folder that cannot be listed."""
    try:
        if is_peft_dir(folder) or any((folder / w).exists() for w in WEIGHT_NAMES):
            return []
        found = [
            p
            for p in folder.iterdir()
            if is_peft_dir(p)
            or (p.is_file() and p.suffix in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)
        ]
    except OSError:
        return []
    return sorted(found, key=lambda p: natural_key(p.name))


def adapter_paths(specs: Sequence[str | os.PathLike]) -> list[tuple[str, Path | LoRAFormatError]]:
    """(what to call it, the path to read or why it cannot be) for every adapter ``specs`` name:
    a path as it is; a folder of adapters (not one itself) as each adapter in it; a hub id that
    is not a local path as the adapter files fetched from the hub (named ``id/file`` when
    the repository holds weights files rather than a PEFT folder)."""
    out: list[tuple[str, Path | LoRAFormatError]] = []
    for spec in map(str, specs):
        path, hub = Path(spec), is_hub_id(spec)
        if hub:
            try:
                path = fetch_adapter(spec)
            except LoRAFormatError as e:
                out.append((spec, e))
                continue
        inner = _adapters_in(path) if path.is_dir() else []
        if inner:
            out.extend((f"{spec}/{p.name}" if hub else str(p), p) for p in inner)
        else:
            out.append((spec, path))
    return out


def inspect_adapters(
    specs: Sequence[str | os.PathLike], *, top: int = 4, allow_nonfinite: bool = False
) -> dict[str, Any]:
    """``adapters``: one :func:`inspect_adapter` report per adapter ``specs`` name (see
    :func:`adapter_paths`), or ``{"path", "error"}`` for one that cannot be read; ``summary``:
    :func:`summarize` of them."""
    reports: list[dict[str, Any]] = []
    for shown, path in adapter_paths(specs):
        if isinstance(path, LoRAFormatError):
            reports.append({"path": shown, "error": str(path)})
            continue
        try:
            report = inspect_adapter(path, top=top, allow_nonfinite=allow_nonfinite)
        except (ValueError, OSError) as e:  # LoRAFormatError is a ValueError
            message = f"{e.filename}: {e.strerror or e}" if getattr(e, "filename", None) else e
            reports.append({"path": shown, "error": str(message)})
            continue
        reports.append({**report, "path": shown})
    return {"adapters": reports, "summary": summarize(reports)}


def summarize(reports: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Totals over several reports: adapters read and failed, layers, parameters, ranks, and
    counts of formats, base models (the file's word or the fitting families) and flag kinds."""
    ok = [r for r in reports if "error" not in r]
    base = Counter(r["base_model_guess"]["label"] for r in ok)
    return {
        "adapters": len(reports),
        "read": len(ok),
        "failed": len(reports) - len(ok),
        "layers": sum(r["num_layers"] for r in ok),
        "adapter_params": sum(r["adapter_params"] for r in ok),
        "ranks": sorted({k for r in ok for k in r["ranks"]}),
        "formats": dict(Counter(r["format"] or "?" for r in ok)),
        "base_models": dict(base),
        "flagged": sum(bool(r["flags"]) for r in ok),
        "flags": dict(Counter(f["kind"] for r in ok for f in r["flags"])),
    }


__all__ = ["adapter_paths", "inspect_adapter", "inspect_adapters", "summarize"]
