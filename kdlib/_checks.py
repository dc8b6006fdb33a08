"""Checks shared by the CLI and the config files: numbers that must be finite and in range, and
the one-line description of an environment fault (a full disk, a read-only filesystem)."""

from __future__ import annotations

import errno
import math
from typing import Any

import click

from .errors import ConfigError

__all__ = ["Number", "TRAIN_NUMBERS", "check_numbers", "ENV_ERRNOS", "describe_os_error"]


class Number(click.ParamType):
    """A finite float with a lower bound (`open`: the bound itself is refused): nan, inf and -1 never pass."""

    name = "number"

    def __init__(self, low: float | None = None, open: bool = False, high: float | None = None) -> None:
        self.low, self.open, self.high = low, open, high

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        why = _why_bad(value, self.low, self.open, self.high)
        if why:
            self.fail(f"{value!r} {why}", param, ctx)
        return float(value)


# flag -> (lower bound, lower bound excluded, upper bound); the click options and the config-file keys use the same table
TRAIN_NUMBERS = {
    "lr": (0.0, True, None),
    "weight_decay": (0.0, False, None),
    "temperature": (0.0, True, None),
    "gamma": (0.0, True, None),
    "ce_weight": (0.0, False, None),
    "clip": (0.0, False, None),
    "warmup": (0.0, False, 1.0),
    # issue 19: the optimizer, schedule and training options (EMA and label smoothing also below 1: TrainConfig)
    "momentum": (0.0, False, None),
    "min_lr": (0.0, False, None),
    "step_gamma": (0.0, True, None),
    "warmup_epochs": (0.0, False, None),
    "label_smoothing": (0.0, False, 1.0),
    "ema": (0.0, True, 1.0),
}


def _why_bad(value: Any, low: float | None, open: bool, high: float | None = None) -> str | None:
    if isinstance(value, bool):
        return "is not a number"
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "is not a number"
    if not math.isfinite(v):
        return "is not a finite number"
    if low is not None and (v < low or (open and v == low)):
        return f"must be {'>' if open else '>='} {low:g}"
    if high is not None and v > high:
        return f"must be <= {high:g}"
    return None


def check_numbers(values: dict[str, Any], rules: dict[str, tuple], origin: str) -> None:
    """Refuse a value of `values` (a config) that breaks its rule; strings are refused, not coerced."""
    for key, (low, open, high) in rules.items():
        v = values.get(key)
        if v is None:
            continue
        why = "is a string, not a number" if isinstance(v, str) else _why_bad(v, low, open, high)
        if why:
            raise ConfigError(f"{origin}: {key}={v!r} {why}")


ENV_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, errno.EDQUOT, errno.EFBIG, errno.EIO}


WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}  # only a write meets these


def describe_os_error(exc: OSError, where: str | None = None, todo: str | None = None) -> str:
    """One line for an environment fault: the path (the file, else `where`: the command's --out), what
    the filesystem said, and what to do (`todo`, else a default for the errno)."""
    path = str(exc.filename) if exc.filename is not None else (where or "?")
    reason = {
        errno.ENOSPC: "no space left on device",
        errno.EDQUOT: "disk quota exceeded",
        errno.EROFS: "read-only file system",
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
        errno.EFBIG: "file too large",
    }.get(exc.errno, exc.strerror or str(exc))
    under_out = where is not None and (path == where or path.startswith(where.rstrip("/") + "/"))
    writing = exc.errno in WRITE_ERRNOS or under_out
    if todo is None:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            todo = "free some space"
        elif writing:
            todo = "choose a writable --out"
        else:
            todo = "check its permissions and the disk"
    return f"cannot {'write' if writing else 'access'} {path}: {reason}; {todo}"
