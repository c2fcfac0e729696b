"""Fixtures of the benchmark smoke tests (benchmarks/ is on sys.path, so ``speedbench`` imports)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def loralens_cache(tmp_path_factory):
    """$LORALENS_CACHE (the compiled kernel) in a temp dir, not the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("loralens-cache")
        mp.setenv("LORALENS_CACHE", str(path))
        yield path
