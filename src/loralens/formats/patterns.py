"""PEFT's ``rank_pattern`` / ``alpha_pattern`` rule, in bounded time.

PEFT (``peft.utils.other.get_pattern_key``) gives module ``name`` the value of the first key, in
order, for which ``re.match(rf"(.*\\.)?({key})$", name)`` succeeds. A key is a regular
expression from the adapter's config, so a hostile one (``(a|aa)*``) can backtrack for hours.
Here every key must be one Python's ``re`` accepts silently (as PEFT needs) with small counted
repetitions; it is matched with the ``regex`` package under a timeout per match and a budget per
file, and a key that runs out of time is refused by name. Plain names (``q_proj``, or escaped
full names as ``save_lora`` writes them) are looked up exactly without a regex.
"""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import regex

from loralens.formats.errors import LoRAFormatError

#: A match of one key against one module name may take this long (normal ones take microseconds).
MATCH_TIMEOUT_S = 0.1
#: All pattern matching for one file may take this long.
FILE_BUDGET_S = 10.0
#: Largest product of the counts in a key's ``{m,n}`` repetitions (``regex`` expands them).
MAX_REPEAT_PRODUCT = 10_000

_MAX_LITERAL = 512  # characters in a plain key (once its "\." are dots), at most
_LITERAL = re.compile(rf"(?:\w|\\\.){{1,{_MAX_LITERAL}}}", re.ASCII)  # q_proj, a\.b\.q_proj
_BRACES = re.compile(r"\{([^{}]*)\}?")
_COUNT = re.compile(r"(\d*)(?:,(\d*))?")


def _wrapped(key: str) -> str:
    return rf"(.*\.)?({key})$"


def _compile(key: str) -> regex.Pattern:
    """The key as PEFT wraps it, compiled; raises ``ValueError`` saying why a key is refused."""
    product = 1
    for m in _BRACES.finditer(key):
        count = _COUNT.fullmatch(m[1]) if m[0].endswith("}") else None
        if count is None or not (count[1] or count[2]):
            raise ValueError("braces are allowed only as counted repetitions {m}, {m,n}")
        product *= max(1, *(int(c) for c in count.groups() if c))
        if product > MAX_REPEAT_PRODUCT:
            raise ValueError(f"its counted repetitions allow over {MAX_REPEAT_PRODUCT} repeats")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # e.g. "possible nested set": read differently later
            re.compile(_wrapped(key))
    except (re.error, Warning, RecursionError, OverflowError) as e:
        raise ValueError(f"Python's re (which PEFT uses) refuses it: {e}") from e
    try:
        return regex.compile(_wrapped(key))
    except (regex.error, RecursionError, OverflowError) as e:
        raise ValueError(str(e)) from e


def check_pattern_key(key: str, what: str, path: Path) -> regex.Pattern | None:
    """The compiled pattern of a key (None for a plain name, looked up without one); refuses
    (naming the file and key) a key that cannot be matched as PEFT does in bounded time."""
    if _LITERAL.fullmatch(key):
        return None
    try:
        return _compile(key)
    except ValueError as e:
        raise LoRAFormatError(path, f"{what} key {key!r} is not a valid pattern: {e}") from e


class PatternTable:
    """The keys of one ``rank_pattern`` or ``alpha_pattern``, matched as PEFT matches them."""

    def __init__(self, patterns: Mapping[str, Any], what: str, path: Path, budget: Budget) -> None:
        self.patterns, self.what, self.path, self.budget = dict(patterns), what, path, budget
        self.keys = list(self.patterns)
        self._literal_index: dict[str, int] = {}
        self._compiled: dict[str, regex.Pattern] = {}
        self._regex_keys: list[tuple[int, str]] = []
        for i, key in enumerate(self.keys):
            compiled = check_pattern_key(key, what, path)
            if compiled is None:
                self._literal_index.setdefault(key.replace("\\.", "."), i)
            else:
                self._compiled[key] = compiled
                self._regex_keys.append((i, key))

    def get(self, name: str, default: Any) -> Any:
        """PEFT's ``patterns.get(get_pattern_key(patterns.keys(), name), default)``."""
        return self.patterns.get(self.key_for(name), default)

    def key_for(self, name: str) -> str:
        """The first key that matches ``name`` (``name`` itself when none does, as in PEFT)."""
        with self.budget:
            return self._key_for(name)

    def _key_for(self, name: str) -> str:
        if self.budget.left() <= 0:
            raise LoRAFormatError(
                self.path, f"matching {self.what} took over {FILE_BUDGET_S} s; refused"
            )
        if "\n" in name:  # "." and "$" treat newlines specially: match every key as a regex
            for key in self.keys:
                if self._match(key, name):
                    return key
            return name
        # a plain key matches exactly when it is the name or a dot-separated tail of it
        first = len(self.keys)
        for tail in _tails(name):
            first = min(first, self._literal_index.get(tail, first))
        for i, key in self._regex_keys:
            if i > first:
                break
            if self._match(key, name):
                return key
        return self.keys[first] if first < len(self.keys) else name

    def _match(self, key: str, name: str) -> bool:
        if key not in self._compiled:  # a plain key, against a name with a newline
            self._compiled[key] = _compile(key)
        timeout = min(MATCH_TIMEOUT_S, self.budget.left())
        try:
            return self._compiled[key].match(name, timeout=max(timeout, 1e-6)) is not None
        except TimeoutError:
            spent = f"over {MATCH_TIMEOUT_S} s"
            if timeout < MATCH_TIMEOUT_S:
                spent = "the time budget for this file's patterns"
            raise LoRAFormatError(
                self.path,
                f"{self.what} key {key!r} took {spent} to match module {name[:200]!r} "
                "(a pattern that backtracks catastrophically?); refused",
            ) from None


def _tails(name: str):
    """``name`` and its dot-separated tails, shortest first, as long as a plain key can be."""
    end = len(name)
    dot = name.rfind(".")
    while dot >= 0 and end - dot - 1 <= _MAX_LITERAL:
        yield name[dot + 1 :]
        dot = name.rfind(".", 0, dot)
    if end <= _MAX_LITERAL:
        yield name


class Budget:
    """Seconds left for one file's pattern matching: only time spent matching counts (reading
    the file's tensors in between does not)."""

    def __init__(self) -> None:
        self.spent = 0.0
        self._since: float | None = None

    def __enter__(self) -> Budget:
        self._since = time.monotonic()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.spent += time.monotonic() - (self._since or time.monotonic())
        self._since = None

    def left(self) -> float:
        running = time.monotonic() - self._since if self._since is not None else 0.0
        return FILE_BUDGET_S - self.spent - running
