"""``--where`` filters: our own small language, never evaluated as Python or by pandas.

Hostile filters (the ``@store...os.system`` payload of issue 14 and other escapes) are refused
with a FilterError naming ``--where`` and run nothing; valid filters select the rows pandas'
``query`` selects on the same frame (a table and a hypothesis property test).
"""

from __future__ import annotations

import os
import time

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from loralens.cli import app
from loralens.learn.fitting.data import select_rows
from loralens.learn.fitting.rowfilter import MAX_DEPTH, MAX_LENGTH, FilterError, row_mask
from loralens.learn.training.config import TrainConfig
from loralens.learn.training.loop import train
from loralens.store import StoreError

runner = CliRunner()

PWNED = "@store.__class__.__init__.__globals__['os'].system('touch PWNED')"
ESCAPES = [
    PWNED,
    "rank == @store.__class__.__init__.__globals__['os'].system('touch PWNED')",
    "rank.__class__.__base__.__subclasses__()",  # attribute access
    "y.__class__ == 1",
    "__import__('os').system('touch PWNED') == 0",  # a call
    "open('PWNED', 'w') == 1",
    "y[0] == 1",  # a subscript
    "(lambda: __import__('os').system('touch PWNED'))() == 0",  # a lambda
    "[os for os in ().__class__.__bases__] == 1",  # comprehensions
    "{k: 1 for k in 'ab'} == 1",
    "f\"{__import__('os').system('touch PWNED')}\" == id",  # an f-string
    "(y := 1) == 1",  # walrus
    "rank == 10**10**10",  # arithmetic (a literal that never finishes computing)
    "y + 1 > 2",
    "`rank`.real == 2",
    "rank == 2; import os",
    "exec('import os') == 1",
    "rank if True else y",
    "rank == *[1]",
    "rank == b'2'",
    "rank == None",
    "`y` == `",  # unbalanced backtick
    "(" * 300 + "rank == 2" + ")" * 300,  # nesting past the parser's limit
    "not " * 600 + "rank == 2",  # nesting past ours
    "- " * 5000 + "1 == rank",
    "rank in [" + "1," * 120_000 + "]",  # too many terms
    "rank == '" + "x" * (2**20) + "'",  # 1 MB
]


@pytest.fixture
def store(make_store, tmp_path):
    return make_store(
        tmp_path / "s",
        n=20,
        ranks=(2, 3),
        extra=lambda k, s: {"z": None if k % 5 == 0 else s, "group": "ab"[k % 2]},
    )


@pytest.fixture
def empty_cwd(tmp_path, monkeypatch):
    """An empty working directory: a payload that ran would leave a file in it."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


@pytest.mark.parametrize("expr", ESCAPES, ids=[f"escape{k}" for k in range(len(ESCAPES))])
def test_hostile_filters_are_refused_and_run_nothing(expr, store, empty_cwd):
    t0 = time.process_time()  # CPU time: what a payload would burn, not the machine's load
    with pytest.raises(FilterError, match="--where") as err:
        select_rows(store, expr)
    assert time.process_time() - t0 < 5  # refused before any work grows with the input
    assert isinstance(err.value, StoreError)  # what the CLI already reports as one line
    assert len(str(err.value)) < 1000  # the 1 MB filter is not echoed back
    assert os.listdir(empty_cwd) == []


def test_hostile_filter_through_the_cli_exits_1_and_creates_nothing(store, empty_cwd):
    base = ["--data", str(store.path), "--where", PWNED]
    res = runner.invoke(app, ["train", *base, "--target", "y", "--out", "run", "--quiet"])
    assert res.exit_code == 1 and "--where" in res.output, res.output
    assert "not a valid filter" in res.output
    cfg = TrainConfig(model="mlp-svd", targets=["y"], epochs=1, plots=False)
    train(store, cfg, store.path.parent / "run")
    res = runner.invoke(app, ["evaluate", str(store.path.parent / "run"), *base])
    assert res.exit_code == 1 and "not a valid filter" in res.output, res.output
    with pytest.raises(FilterError):  # refused when the config is made, before any store
        TrainConfig(model="glnet", targets=["y"], where=PWNED)
    assert os.listdir(empty_cwd) == []


def test_long_id_lists_are_fine(store):
    """What benchmarks/summarize_paper.py asks: ``id not in [...]`` with many ids."""
    ids = [f"x{k:03d}" for k in range(0, 20, 3)] + [f"other{k:05d}" for k in range(15_000)]
    assert len(repr(ids)) > 200_000
    rows = select_rows(store, f"id not in {ids!r}")
    np.testing.assert_array_equal(rows, [k for k in range(20) if k % 3])


def test_unknown_columns_and_long_filters_say_what_is_wrong(store):
    with pytest.raises(FilterError, match=r"no column 'rnak' \(columns: id, source, rank"):
        select_rows(store, "rnak == 2")
    with pytest.raises(FilterError, match=f"at most {MAX_LENGTH:,}"):
        select_rows(store, "rank == 2 " + " " * MAX_LENGTH)
    with pytest.raises(FilterError, match=f"nested over {MAX_DEPTH} levels"):
        select_rows(store, "not " * (MAX_DEPTH + 1) + "rank == 2")
    with pytest.raises(FilterError, match="no column '_shard'"):  # the store's own bookkeeping
        select_rows(store, "_shard == 0")
    with pytest.raises(FilterError, match="cannot compare 'group' with '3'"):
        select_rows(store, "group < 3")


FRAME = pd.DataFrame(
    {
        "rank": [2, 4, 4, 8, 16, 2],
        "lr": [1e-3, 1e-4, np.nan, 1e-2, 3e-4, 2e-3],
        "name": ["a", "b&c", "c", None, "a", "d|e"],
        "my col": [1.0, 2.0, 3.0, 4.0, np.nan, 6.0],
        "ok": [True, False, True, False, True, True],
    }
)
VALID = [
    "rank == 4",
    "rank == 4 and lr < 1e-3",
    "rank == 4 & lr < 1e-3",  # & with the precedence of `and`, as in pandas
    "rank == 2 | rank == 16",
    "rank in [2, 4]",
    "rank not in (2,)",
    "rank == [2, 8]",
    "rank != [2, 8]",
    "2 < rank <= 8",
    "4 <= rank",
    "lr >= -1",
    "`my col` > 2",
    "`my col` != 2",
    "ok",
    "not ok",
    "~ok & rank > 2",
    "~(rank == 4) | name == 'a'",
    "not (rank == 4 or lr > 1e-3)",
    "name == 'b&c' or name == \"d|e\"",
    "name in ['a', 'c']",
    "lr != lr",
    "lr < `my col`",
    "ok == True",
]


@pytest.mark.parametrize("expr", VALID)
def test_valid_filters_select_what_pandas_query_selects(expr):
    want = FRAME.index.isin(FRAME.query(expr).index)
    np.testing.assert_array_equal(row_mask(FRAME, expr), want)


def test_select_rows_keeps_the_old_query_rows(store):
    index = store.index
    rows = select_rows(store, "rank == 3 and z > 0.5")
    want = np.flatnonzero((index["rank"] == 3) & (index["z"] > 0.5))
    np.testing.assert_array_equal(rows, want)
    assert rows.dtype == np.int64
    np.testing.assert_array_equal(select_rows(store, None), np.arange(len(store)))
    np.testing.assert_array_equal(select_rows(store, "group == 'a'"), np.arange(0, 20, 2))


# -------------------------------------------------------------------- property: same as pandas

_NUM = st.sampled_from(["-1", "0", "1", "2", "2.5", "4", "1e-3", "7"])
_OP = st.sampled_from(["==", "!=", "<", "<=", ">", ">="])
_COL = st.sampled_from(["a", "b", "`c d`"])


def _atoms():
    return st.one_of(
        st.builds(lambda c, o, n: f"{c} {o} {n}", _COL, _OP, _NUM),
        st.builds(lambda n, o, c: f"{n} {o} {c}", _NUM, _OP, _COL),
        st.builds(lambda c, d, o: f"{c} {o} {d}", _COL, _COL, _OP),
        st.builds(lambda n, c, m: f"{n} < {c} <= {m}", _NUM, _COL, _NUM),
        st.builds(
            lambda c, neg, xs: f"{c} {'not in' if neg else 'in'} [{', '.join(xs)}]",
            _COL,
            st.booleans(),
            st.lists(_NUM, min_size=1, max_size=3),
        ),
        st.builds(
            lambda o, s: f"s {o} '{s}'", st.sampled_from(["==", "!="]), st.sampled_from("xyz")
        ),
        st.just("flag"),
    )


def _combine(children):
    return st.one_of(
        st.builds(
            lambda x, op, y: f"({x}) {op} ({y})",
            children,
            st.sampled_from(["and", "or", "&", "|"]),
            children,
        ),
        st.builds(
            lambda x, op, y: f"{x} {op} {y}", children, st.sampled_from(["and", "or"]), children
        ),
        st.builds(lambda x, op: f"{op}({x})", children, st.sampled_from(["not ", "~"])),
    )


FILTERS = st.recursive(_atoms(), _combine, max_leaves=6)
_rng = np.random.default_rng(0)
PROP_FRAME = pd.DataFrame(
    {
        "a": _rng.integers(-1, 8, 30).astype(float),
        "b": _rng.choice([0.0, 1e-3, 2.5, 4.0, np.nan], 30),
        "c d": _rng.integers(0, 5, 30),
        "s": _rng.choice(["x", "y", "z"], 30),
        "flag": _rng.random(30) < 0.5,
    }
)
PROP_FRAME.loc[::7, "a"] = np.nan


@settings(max_examples=150, deadline=None)
@given(FILTERS)
def test_generated_filters_match_pandas_query(expr):
    want = PROP_FRAME.index.isin(PROP_FRAME.query(expr).index)
    np.testing.assert_array_equal(row_mask(PROP_FRAME, expr), want)
