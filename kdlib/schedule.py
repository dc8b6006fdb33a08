"""Learning-rate schedules: a factor of the base lr per optimizer step, after a linear warmup.

`warmup_cosine` is the schedule train and heads fitting share by default; `lr_schedule` adds a
step schedule (x gamma at each milestone), a constant one, and a cosine that ends at a floor
(`min_factor` = --min-lr / --lr) instead of 0. Warmup goes from base/w to the base over w steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["SCHEDULES", "WARMUP", "STEP_GAMMA", "warmup_cosine", "warmup_steps", "lr_schedule", "schedule_settings"]

SCHEDULES = ("cosine", "step", "constant")
WARMUP = 0.05  # fraction of all steps, when neither --warmup nor --warmup-epochs is given
STEP_GAMMA = 0.1  # --schedule step without --step-gamma


def schedule_settings(config: Any) -> dict[str, Any]:
    """The schedule a train config names, its defaults filled in: schedule, warmup (a fraction of all
    steps, or None when warmup_epochs says it), warmup_epochs, min_lr, milestones (epochs), step_gamma."""
    step = config.schedule == "step"
    return {
        "schedule": config.schedule,
        "warmup": None if config.warmup_epochs is not None else (WARMUP if config.warmup is None else config.warmup),
        "warmup_epochs": config.warmup_epochs,
        "min_lr": float(config.min_lr or 0.0),
        "milestones": [int(m) for m in config.milestones] if step and config.milestones else None,
        "step_gamma": (STEP_GAMMA if config.step_gamma is None else float(config.step_gamma)) if step else None,
    }


def warmup_steps(total: int, fraction: float | None = None, epochs: float | None = None, per_epoch: int = 1) -> int:
    """Warmup length in steps: `epochs` epochs of `per_epoch` steps, else a `fraction` of `total` (at least one)."""
    w = epochs * per_epoch if epochs is not None else total * (fraction or 0.0)
    return max(1, int(round(w)))


def warmup_cosine(total: int, warmup: float) -> Callable[[int], float]:
    """Factor of the base lr at step `step` (0-based) of `total`: warmup over a `warmup` fraction of
    the steps (at least one), then half a cosine down to 0 at `total`."""
    return _warmup_cosine(total, warmup_steps(total, warmup))


def _warmup_cosine(total: int, w: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < w:
            return (step + 1) / w
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - w) / max(1, total - w))))

    return factor


def lr_schedule(
    kind: str,
    total: int,
    warmup: int,
    *,
    min_factor: float = 0.0,
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
) -> Callable[[int], float]:
    """Factor of the base lr at step `step` (0-based) of `total`, after `warmup` warmup steps:

    - ``cosine``: half a cosine from 1 down to `min_factor` at `total` (0: exactly `warmup_cosine`);
    - ``step``: `gamma` ** (milestones reached), `milestones` in steps;
    - ``constant``: 1.
    """
    w = max(1, int(warmup))
    if kind == "cosine":
        cosine = _warmup_cosine(total, w)
        if not min_factor:
            return cosine  # bitwise the schedule runs made before --min-lr existed
        return lambda step: cosine(step) if step < w else min_factor + (1 - min_factor) * cosine(step)
    if kind == "step":
        marks = sorted(int(m) for m in milestones)

        def step_factor(step: int) -> float:
            if step < w:
                return (step + 1) / w
            return gamma ** sum(step >= m for m in marks)

        return step_factor
    if kind == "constant":
        return lambda step: (step + 1) / w if step < w else 1.0
    raise ValueError(f"unknown schedule {kind!r}; choose one of {SCHEDULES}")
