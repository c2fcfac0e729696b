"""The label summary printed after a build: each label's spread over the zoo beside the base's."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any


def summarize_labels(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    binary: Sequence[str] = (),
    base: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Per column: n, min/median/max/std (numbers) or rate (0/1 columns), and the base's value."""
    base = base or {}
    out = []
    for col in columns:
        vals = []
        for r in rows:
            try:
                v = float(r.get(col, ""))
            except (TypeError, ValueError):
                continue
            if math.isfinite(v):
                vals.append(v)
        if not vals:
            continue
        entry: dict[str, Any] = {"column": col, "n": len(vals), "base": base.get(col)}
        if col in binary:
            entry["rate"] = sum(vals) / len(vals)
        else:
            entry.update(
                min=min(vals),
                median=statistics.median(vals),
                max=max(vals),
                std=statistics.pstdev(vals) if len(vals) > 1 else 0.0,
            )
        out.append(entry)
    return out


def format_summary(summary: Sequence[Mapping[str, Any]]) -> str:
    """The summary of :func:`summarize_labels` as an aligned text table."""

    def f(x: Any) -> str:
        if x is None or x == "":
            return "-"
        if isinstance(x, float):
            return f"{x:.4g}"
        return str(x)

    lines = [
        f"{'label':<24} {'n':>6} {'min':>10} {'median':>10} {'max':>10} {'std':>10} {'base':>10}"
    ]
    for e in summary:
        if "rate" in e:
            lines.append(
                f"{e['column']:<24} {e['n']:>6} {'rate ' + f(e['rate']):>43} {f(e['base']):>10}"
            )
        else:
            lines.append(
                f"{e['column']:<24} {e['n']:>6} {f(e['min']):>10} {f(e['median']):>10} "
                f"{f(e['max']):>10} {f(e['std']):>10} {f(e['base']):>10}"
            )
    return "\n".join(lines)
