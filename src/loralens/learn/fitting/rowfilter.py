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

#: Longest filter accepted, in characters (room for ``id in [...]`` with thousands of ids), most
#: syntax-tree nodes, and deepest nesting (what bounds the recursion applying a filter).
MAX_LENGTH = 256 * 1024
MAX_NODES = 100_000
MAX_DEPTH = 100

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


#: A compiled part of a filter: frame -> a column, a literal or a boolean Series.
Column = Callable[[pd.DataFrame], Any]


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


def _parse(expr: str) -> tuple[ast.expr, dict[str, str]]:
    """The syntax tree of ``expr`` and the backticked column names; bounded in length and size."""
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
        raise FilterError(f"--where {_show(expr)} is too complex (over {MAX_NODES:,} terms)")
    stack = [(tree.body, 1)]
    while stack:  # no recursion: the depth is what is being bounded
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise FilterError(f"--where {_show(expr)} is nested over {MAX_DEPTH} levels deep")
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))
    return tree.body, quoted


def compile_filter(expr: str) -> Callable[[pd.DataFrame], pd.Series]:
    """Check ``expr`` against the filter language and return the function that applies it to
    a frame (a boolean Series). Everything but the column names is checked here, so a filter
    can be refused before any data is read; unknown columns are refused when it is applied."""
    node, quoted = _parse(expr)

    def fail(what: str) -> FilterError:
        return FilterError(f"--where {_show(expr)}: {what}; {_HINT}")

    def show(n: ast.AST) -> str:
        text = ast.unparse(n)
        for key, name in quoted.items():
            text = text.replace(key, f"`{name}`")
        return repr(text if len(text) <= 60 else text[:57] + "...")

    def column(name: str) -> Column:
        def get(frame: pd.DataFrame) -> pd.Series:
            if name not in frame.columns:
                cols = [str(c) for c in frame.columns]
                shown = ", ".join(cols[:40]) + (", ..." if len(cols) > 40 else "")
                raise fail(f"no column {name!r} (columns: {shown})")
            return frame[name]

        return get

    def name_of(n: ast.expr) -> str | None:
        return quoted.get(n.id, n.id) if isinstance(n, ast.Name) else None

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

    def operand(n: ast.expr) -> Column:
        name = name_of(n)
        if name is not None:
            return column(name)
        value = literal(n)
        return lambda frame: value

    def compare(left: ast.expr, op: ast.cmpop, right: ast.expr) -> Column:
        if isinstance(op, (ast.In, ast.NotIn)) or (
            isinstance(op, (ast.Eq, ast.NotEq)) and isinstance(right, (ast.List, ast.Tuple))
        ):
            name = name_of(left)
            if name is None:
                raise fail("the left side of 'in' (or of == / != a list) must be a column")
            elts = right.elts if isinstance(right, (ast.List, ast.Tuple, ast.Set)) else [right]
            values, col = [literal(e) for e in elts], column(name)
            if isinstance(op, (ast.NotIn, ast.NotEq)):
                return lambda frame: ~col(frame).isin(values)
            return lambda frame: col(frame).isin(values)
        if type(op) not in _COMPARE:
            raise fail(f"operator {type(op).__name__} is not allowed")
        if name_of(left) is None and name_of(right) is None:
            raise fail(f"{show(left)} vs {show(right)} compares no column")
        fn, a, b = _COMPARE[type(op)], operand(left), operand(right)

        def apply(frame: pd.DataFrame) -> pd.Series:
            try:
                return fn(a(frame), b(frame))
            except (TypeError, ValueError, OverflowError) as e:
                raise fail(f"cannot compare {show(left)} with {show(right)} ({e})") from None

        return apply

    def boolean(n: ast.expr) -> Column:
        if isinstance(n, ast.BoolOp):
            combine = operator.and_ if isinstance(n.op, ast.And) else operator.or_
            return _reduce(combine, [boolean(v) for v in n.values])
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, (ast.Not, ast.Invert)):
            inner = boolean(n.operand)
            return lambda frame: ~inner(frame)
        if isinstance(n, ast.Compare):
            lefts = [n.left, *n.comparators[:-1]]
            parts = [compare(a, op, b) for a, op, b in zip(lefts, n.ops, n.comparators)]
            return _reduce(operator.and_, parts)
        name = name_of(n)
        if name is None:
            raise fail(f"{show(n)} is not allowed")
        col = column(name)

        def flag(frame: pd.DataFrame) -> pd.Series:
            values = col(frame)
            if values.dtype != bool:
                raise fail(f"column {name!r} is not true/false: compare it with something")
            return values

        return flag

    return boolean(node)


def _reduce(combine: Callable[[Any, Any], Any], parts: list[Column]) -> Column:
    def apply(frame: pd.DataFrame) -> pd.Series:
        out = parts[0](frame)
        for part in parts[1:]:
            out = combine(out, part(frame))
        return out

    return apply


def row_mask(frame: pd.DataFrame, expr: str) -> np.ndarray:
    """A boolean mask of the rows of ``frame`` for which the filter ``expr`` holds.

    A comparison with a missing value (NaN/None) is false (``!=``: true), as in pandas.
    """
    mask = compile_filter(expr)(frame)
    return np.asarray(mask.fillna(False), dtype=bool)


__all__ = ["MAX_DEPTH", "MAX_LENGTH", "MAX_NODES", "FilterError", "compile_filter", "row_mask"]
