"""Row filters (``--where``): a small expression language over store columns, parsed by us.

Grammar: comparisons (``==``, ``!=``, ``<``, ``<=``, ``>``, ``>=``, chained ``a < b < c``),
``in`` / ``not in`` a list of literals (``col == [..]`` / ``col != [..]`` as in pandas),
``and`` / ``or`` / ``not`` (also ``&`` / ``|`` with the precedence of ``and`` / ``or``, and
``~``), parentheses, column names (`` `odd name` `` in backticks), numbers, strings, True/False.

The text is parsed with :func:`ast.parse` (which evaluates nothing) and the tree is then walked
against this whitelist: no attribute access, calls, subscripts, ``@`` names, arithmetic or
comprehensions, so a filter reads column values and nothing more. Length and size are bounded.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from loralens.store import StoreError

#: Longest filter accepted, in characters, and most syntax-tree nodes.
MAX_LENGTH = 2000
MAX_NODES = 500

_COMPARE: dict[type, Callable[[Any, Any], Any]] = {
    ast.Eq: operator.eq,
    ast.NotEq: operator.ne,
    ast.Lt: operator.lt,
    ast.LtE: operator.le,
    ast.Gt: operator.gt,
    ast.GtE: operator.ge,
}
_HINT = (
    "filters compare columns with numbers or strings, joined by and/or/not, e.g. "
    '"rank == 4 and lr < 1e-3" or "rank in [2, 4]"'
)


class FilterError(StoreError):
    """A ``--where`` filter outside the filter language, too long, or naming unknown columns."""


def _show(expr: str) -> str:
    return repr(expr if len(expr) <= 120 else expr[:117] + "...")


def _to_python(expr: str) -> tuple[str, dict[str, str]]:
    """Python source for ``expr`` and the column of each placeholder name.

    Backticked names become placeholders (a prefix that occurs nowhere in ``expr``, so no other
    name can be one); ``&`` / ``|`` become ``and`` / ``or`` (pandas' precedence: ``a == 1 & b
    == 2`` means what it says). Quoted strings are copied as they are.
    """
    prefix = "_col"
    while prefix in expr:
        prefix += "_"
    out: list[str] = []
    quoted: dict[str, str] = {}
    i = 0
    while i < len(expr):
        c = expr[i]
        if c in "'\"":
            j = i + 1
            while j < len(expr) and expr[j] != c:
                j += 2 if expr[j] == "\\" else 1
            out.append(expr[i : j + 1])  # unterminated: the parser says so
            i = j + 1
        elif c == "`":
            j = expr.find("`", i + 1)
            if j < 0:
                raise FilterError(f"--where {_show(expr)}: unbalanced backtick")
            key = f"{prefix}{len(quoted)}"
            quoted[key] = expr[i + 1 : j]
            out.append(f" {key} ")
            i = j + 1
        else:
            out.append({"&": " and ", "|": " or "}.get(c, c))
            i += 1
    return "".join(out), quoted


def parse_filter(expr: str) -> tuple[ast.expr, dict[str, str]]:
    """The syntax tree of ``expr`` and the backticked column names; bounded in length and size.

    Only parsing: what the tree may contain is checked when it is applied (:func:`row_mask`).
    """
    if not isinstance(expr, str):
        raise FilterError(f"--where must be a string, got {type(expr).__name__}")
    if len(expr) > MAX_LENGTH:
        raise FilterError(f"--where is {len(expr):,} characters long; at most {MAX_LENGTH:,}")
    text, quoted = _to_python(expr)
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        msg = getattr(e, "msg", None) or str(e) or type(e).__name__
        raise FilterError(f"--where {_show(expr)} is not a valid filter ({msg}); {_HINT}") from None
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise FilterError(f"--where {_show(expr)} is too complex (over {MAX_NODES} terms)")
    return tree.body, quoted


def row_mask(frame: pd.DataFrame, expr: str) -> np.ndarray:
    """A boolean mask of the rows of ``frame`` for which the filter ``expr`` holds.

    A comparison with a missing value (NaN/None) is false (``!=``: true), as in pandas.
    """
    node, quoted = parse_filter(expr)
    columns = [str(c) for c in frame.columns]

    def fail(what: str) -> FilterError:
        return FilterError(f"--where {_show(expr)}: {what}; {_HINT}")

    def show(n: ast.AST) -> str:
        text = ast.unparse(n)
        for key, name in quoted.items():
            text = text.replace(key, f"`{name}`")
        return repr(text if len(text) <= 60 else text[:57] + "...")

    def literal(n: ast.expr) -> Any:
        if (
            isinstance(n, ast.UnaryOp)
            and isinstance(n.op, (ast.USub, ast.UAdd))
            and isinstance(n.operand, ast.Constant)
            and type(n.operand.value) in (int, float)
        ):
            return -n.operand.value if isinstance(n.op, ast.USub) else n.operand.value
        if isinstance(n, ast.Constant) and type(n.value) in (int, float, str, bool):
            return n.value
        raise fail(f"{show(n)} is not a column name, a number or a string")

    def column(n: ast.expr) -> pd.Series | None:
        if not isinstance(n, ast.Name):
            return None
        name = quoted.get(n.id, n.id)
        if name not in columns:
            shown = ", ".join(columns[:40]) + (", ..." if len(columns) > 40 else "")
            raise fail(f"no column {name!r} (columns: {shown})")
        return frame[name]

    def operand(n: ast.expr) -> Any:
        col = column(n)
        return literal(n) if col is None else col

    def values(n: ast.expr) -> list[Any]:
        if isinstance(n, (ast.List, ast.Tuple, ast.Set)):
            return [literal(e) for e in n.elts]
        return [literal(n)]

    def compare(left: ast.expr, op: ast.cmpop, right: ast.expr) -> pd.Series:
        if isinstance(op, (ast.In, ast.NotIn)) or (
            isinstance(op, (ast.Eq, ast.NotEq)) and isinstance(right, (ast.List, ast.Tuple))
        ):
            col = column(left)
            if col is None:
                raise fail("the left side of 'in' (or of == / != a list) must be a column")
            part = col.isin(values(right))
            return ~part if isinstance(op, (ast.NotIn, ast.NotEq)) else part
        if type(op) not in _COMPARE:
            raise fail(f"operator {type(op).__name__} is not allowed")
        a, b = operand(left), operand(right)
        if not isinstance(a, pd.Series) and not isinstance(b, pd.Series):
            raise fail(f"{show(left)} vs {show(right)} compares no column")
        try:
            return _COMPARE[type(op)](a, b)
        except (TypeError, ValueError, OverflowError) as e:
            raise fail(f"cannot compare {show(left)} with {show(right)} ({e})") from None

    def boolean(n: ast.expr) -> pd.Series:
        if isinstance(n, ast.BoolOp):
            combine = operator.and_ if isinstance(n.op, ast.And) else operator.or_
            out = boolean(n.values[0])
            for v in n.values[1:]:
                out = combine(out, boolean(v))
            return out
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, (ast.Not, ast.Invert)):
            return ~boolean(n.operand)
        if isinstance(n, ast.Compare):
            out, left = None, n.left
            for op, right in zip(n.ops, n.comparators):
                part = compare(left, op, right)
                out = part if out is None else out & part
                left = right
            return out
        col = column(n)
        if col is not None:
            if col.dtype != bool:
                raise fail(f"column {show(n)} is not true/false: compare it with something")
            return col
        raise fail(f"{show(n)} is not allowed")

    mask = boolean(node)
    return np.asarray(mask.fillna(False), dtype=bool)


__all__ = ["MAX_LENGTH", "MAX_NODES", "FilterError", "parse_filter", "row_mask"]
