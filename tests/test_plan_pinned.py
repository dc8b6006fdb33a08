"""The plans of existing recipes are pinned: a change to their draws (order, crops, flips, mixing) fails here.

A store replays the views its plan drew; a code change that moves any draw of an existing recipe would
make every store precomputed before it disagree with what train renders. The digests below were computed
with kdlib/plan.py as it was before FunMatch's crop law and group-shared MixUp (commit f181ce3^), and
equal today's: new recipe keys must leave the old draws bitwise as they were. NumPy's generators are part
of the draw: a NumPy that changed PCG64's streams would fail here too, which is what a store needs to know.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from conftest import REPO

from kdlib.plan import make_plan
from kdlib.recipe import Recipe, load_recipe

# 300 images of sizes 28..527 x 28..427, without a random generator (the sizes must not move either)
SIZES = np.array([(28 + (i * 37) % 500, 28 + (i * 91) % 400) for i in range(300)], np.int64)
PINNED = {
    "fmnist": "a24a9375a6400ba12748bdcb7cccb38dde8061041eb675e5750aaf3f599dd9d5",  # inception, mixup 0.3, groups of 4
    "fkd": "7c078db8fa477927ee8ce2545a1155fd9ed8677db82f4a39635bfe179d6eb591",  # 4 crops per image, mix both
    "plain": "660f6dcc2c465f7a0faaba4af76d3353786dd23a909abd57e63f4e2a4c3bd1d1",  # one crop, no mixing
}


def plan_digest(recipe: Recipe, make=make_plan) -> str:
    """sha256 of every field of the recipe's plans of epochs 0..2 over SIZES: name, dtype, shape, little-endian bytes."""
    h = hashlib.sha256()
    for epoch in (0, 1, 2):
        plan = make(recipe, SIZES, epoch)
        for k in sorted(plan):
            a = np.ascontiguousarray(plan[k])
            h.update(f"{epoch}:{k}:{a.dtype.str}:{a.shape}".encode())
            h.update(a.astype(a.dtype.newbyteorder("<")).tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("name", sorted(PINNED))
def test_existing_recipes_draw_the_pinned_plans(name):
    assert plan_digest(load_recipe(REPO / "precompute" / f"{name}.yaml")) == PINNED[name]


def test_the_digest_sees_one_moved_draw():
    def one_flip_changed(recipe, sizes, epoch):
        plan = make_plan(recipe, sizes, epoch)
        if epoch == 2:
            plan["flip"][-1] ^= 1
        return plan

    recipe = load_recipe(REPO / "precompute" / "plain.yaml")
    assert plan_digest(recipe, one_flip_changed) != plan_digest(recipe) == PINNED["plain"]
