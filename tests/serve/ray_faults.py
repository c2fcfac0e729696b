"""Faults planted in the Ray workers of the screening tests: the test cluster runs :func:`plant`
in each worker as it starts (tests/serve is on the workers' PYTHONPATH). An adapter whose name
starts with ``dies-once`` kills its worker (``os._exit``, no cleanup) the first time it is
screened, leaving ``.<name>.killed`` beside it; one starting with ``always-fails`` makes its
task raise every time."""

from __future__ import annotations

import os
from pathlib import Path


def killed_marker(adapter: Path) -> Path:
    """The file the first attempt on ``adapter`` creates just before its worker dies."""
    return adapter.parent / f".{adapter.name}.killed"


def plant() -> None:
    """Swap the screener of :mod:`loralens.serve.ray_screen` for one with the faults above."""
    from loralens.serve import ray_screen

    class Faulty(ray_screen.PoolScreener):
        def __call__(self, path: Path, rel: str) -> dict:
            if path.name.startswith("dies-once"):
                try:
                    killed_marker(path).touch(exist_ok=False)
                except FileExistsError:
                    pass
                else:
                    os._exit(1)
            if path.name.startswith("always-fails"):
                raise RuntimeError("planted failure\nwith a second line that must not show")
            return super().__call__(path, rel)

    ray_screen.PoolScreener = Faulty
