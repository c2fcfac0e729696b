"""The learning-rate schedule the presets pretrain their base models with."""

from __future__ import annotations

import math
from collections.abc import Callable


def warmup_cosine(steps: int) -> Callable[[int], float]:
    """The LR factor at step ``t`` (for ``LambdaLR``): linear warmup over the first 5% of
    ``steps``, then cosine decay to zero at ``steps``."""
    warm = max(1, steps // 20)

    def factor(t: int) -> float:
        return min(1.0, (t + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(t, steps) / steps))

    return factor
