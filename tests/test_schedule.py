"""kdlib.schedule: the warmup + cosine schedule train and heads fitting share."""

from __future__ import annotations

import math

from kdlib.schedule import warmup_cosine


def test_warmup_then_cosine_to_zero():
    f = warmup_cosine(100, 0.1)
    assert [f(s) for s in range(10)] == [(s + 1) / 10 for s in range(10)]
    assert f(10) == 1.0 and abs(f(55) - 0.5) < 1e-12 and f(100) == 0.0
    assert all(f(s) >= f(s + 1) for s in range(10, 100))
    assert abs(f(40) - 0.5 * (1 + math.cos(math.pi * 30 / 90))) < 1e-15


def test_at_least_one_warmup_step():
    f = warmup_cosine(10, 0.0)
    assert f(0) == 1.0 and f(1) == 1.0 and f(2) < 1.0  # one warmup step, then the cosine from its top
