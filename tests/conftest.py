"""Shared test fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def loralens_cache(tmp_path_factory):
    """Point the zoo base-model cache ($LORALENS_CACHE) at one temp dir for the whole test session.

    Base models pretrained by presets are cached there once and reused by every test (and by
    the subprocesses they start), and nothing is written into the user's ~/.cache.
    """
    import os

    path = tmp_path_factory.mktemp("loralens-cache")
    old = os.environ.get("LORALENS_CACHE")
    os.environ["LORALENS_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("LORALENS_CACHE", None)
    else:
        os.environ["LORALENS_CACHE"] = old
