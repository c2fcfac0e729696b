"""What `loralens inspect` reports about one adapter: a summary and one row per layer."""

from __future__ import annotations

import os
from typing import Any

from loralens.features import describe_layers
from loralens.formats import load_lora


def inspect_adapter(
    path: str | os.PathLike, *, top: int = 4, allow_nonfinite: bool = False
) -> dict[str, Any]:
    """Read the adapter at ``path`` and describe it: format, base model, ranks, parameter count,
    and per layer shape, rank, scale, |delta W|_F, top singular values and effective rank."""
    lora = load_lora(path, allow_nonfinite=allow_nonfinite)
    rows = describe_layers(lora, k=top)
    md = lora.metadata
    return {
        "path": str(path),
        "format": md.get("format"),
        "base_model": md.get("base_model"),
        "num_layers": len(rows),
        "ranks": sorted({r["rank"] for r in rows}),
        "adapter_params": sum(la.U.numel() + la.V.numel() for la in lora.layers),
        "layers": rows,
    }
