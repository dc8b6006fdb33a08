"""The learning-rate schedule train and heads fitting share: linear warmup, then cosine to zero."""

from __future__ import annotations

import math
from collections.abc import Callable

__all__ = ["warmup_cosine"]


def warmup_cosine(total: int, warmup: float) -> Callable[[int], float]:
    """Factor of the base lr at step `step` (0-based) of `total`: warmup over a `warmup` fraction of
    the steps (at least one), then half a cosine down to 0 at `total`."""
    w = max(1, int(round(total * warmup)))

    def factor(step: int) -> float:
        if step < w:
            return (step + 1) / w
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - w) / max(1, total - w))))

    return factor
