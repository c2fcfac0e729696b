"""Sanity flags on an adapter's layers, from the ``inspect`` rows alone: non-finite weights, dead
(all-zero) layers, rank-collapsed layers and outliers in |delta W| among the file's layers.

One implementation for ``loralens inspect``, ``loralens screen`` and the screening service.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from loralens.features import NUMERICAL_RANK_TOL

#: a layer whose |delta W|_F is this many times above or below the median layer's is an outlier
OUTLIER_FACTOR = 100.0
#: singular values below this fraction of a layer's largest count as zero (for "collapsed")
COLLAPSE_TOL = NUMERICAL_RANK_TOL


def numerical_rank(row: dict[str, Any]) -> int | None:
    """The row's numerical rank, or where the row lacks it, a count over its top singular
    values (None when they are all above the tolerance and do not reach the usable rank)."""
    if row.get("numerical_rank") is not None:
        return int(row["numerical_rank"])
    s = row.get("top_svals") or []
    if not s or s[0] <= 0:
        return 0 if s else None
    n = sum(x > COLLAPSE_TOL * s[0] for x in s)
    return n if n < len(s) or len(s) >= _usable_rank(row) else None


def _usable_rank(row: dict[str, Any]) -> int:
    return min(row["rank"], *row.get("shape", [row["rank"]]))


def layer_flags(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Sanity flags from ``inspect`` rows: non-finite weights or norms (error), dead layers
    (delta W = 0; all of them: the adapter does nothing), rank-collapsed layers (numerical rank
    at most half the usable rank min(r, out, in), r > 1) and outlier layers (|delta W|_F 100x
    off the median layer)."""
    flags = []
    nonfinite = [r["name"] for r in rows if not r["finite"] or not _finite(r["fro_norm"])]
    if nonfinite:
        flags.append(
            _flag("nonfinite", "error", nonfinite, "NaN/inf weights, or a norm too large to square")
        )
    healthy = [r for r in rows if r["finite"] and _finite(r["fro_norm"])]
    dead = [r["name"] for r in healthy if r["fro_norm"] == 0]
    if dead:
        what = "all layers are zero: the adapter changes nothing" if len(dead) == len(rows) else ""
        flags.append(_flag("dead", "warning", dead, what or "delta W is zero"))
    collapsed = [
        r["name"]
        for r in healthy
        if r["fro_norm"] > 0
        and _usable_rank(r) > 1
        and (n := numerical_rank(r)) is not None
        and n <= _usable_rank(r) / 2
    ]
    if collapsed:
        flags.append(
            _flag("collapsed", "warning", collapsed, "numerical rank at most half of its rank")
        )
    norms = sorted(r["fro_norm"] for r in healthy if r["fro_norm"] > 0)
    if len(norms) >= 4:
        median = norms[len(norms) // 2]
        outliers = [
            r["name"]
            for r in healthy
            if r["fro_norm"] > 0
            and not 1 / OUTLIER_FACTOR <= r["fro_norm"] / median <= OUTLIER_FACTOR
        ]
        if outliers:
            what = f"|delta W|_F over {OUTLIER_FACTOR:g}x off the median layer ({median:.3g})"
            flags.append(_flag("outlier", "warning", outliers, what))
    return flags


def flags_by_layer(flags: Sequence[dict[str, Any]]) -> dict[str, list[str]]:
    """layer name -> the kinds of the flags that name it."""
    out: dict[str, list[str]] = {}
    for f in flags:
        for name in f["layers"]:
            out.setdefault(name, []).append(f["kind"])
    return out


def _finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _flag(kind: str, severity: str, layers: list[str], message: str) -> dict[str, Any]:
    return {
        "kind": kind,
        "severity": severity,
        "layers": layers,
        "message": f"{len(layers)} layer{'s' * (len(layers) != 1)}: {message}",
    }


__all__ = ["COLLAPSE_TOL", "OUTLIER_FACTOR", "flags_by_layer", "layer_flags", "numerical_rank"]
