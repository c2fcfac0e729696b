"""Where loralens keeps what it builds once per machine: pretrained base models, compiled kernels."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """$LORALENS_CACHE, else ~/.cache/loralens."""
    env = os.environ.get("LORALENS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "loralens"
