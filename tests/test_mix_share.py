"""mix_share: group and partner: reverse, FunMatch's batch-shared MixUp, drawn once and replayed exactly.

FunMatch draws one lambda per batch and mixes the batch with itself reversed (the TF2 port) or
rolled by one (big_vision). kdlib's batch is the plan's group: one mixing draw per group, the
partner inside it. The default (one draw per view, partner = next image) is unchanged.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdlib.errors import RecipeError
from kdlib.plan import MIX_CUTMIX, MIX_MIXUP, MIX_NONE, PARAM_FIELDS, make_plan
from kdlib.recipe import Recipe, load_recipe

SIZES = np.array([(28, 28), (20, 32), (375, 500), (33, 17)] * 64, np.int64)


def _groups(a: np.ndarray, g: int) -> np.ndarray:
    return a.reshape(-1, g, *a.shape[1:])


@pytest.mark.parametrize("m,c", [(8, 1), (4, 2)])
def test_group_shared_mixup_has_one_lambda_per_group_and_the_reversed_partner(m, c):
    r = Recipe(mix="mixup", lam="uniform", mix_share="group", partner="reverse", images_per_group=m, crops_per_image=c)
    g = r.group_size
    plan = make_plan(r, SIZES, 2)
    lam = _groups(plan["lam"], g)
    assert (lam == lam[:, :1]).all()  # one lambda per group ...
    assert len(np.unique(lam[:, 0])) == len(lam) > 10  # ... drawn afresh for each group
    assert (plan["mix"] == MIX_MIXUP).all()
    slot = np.arange(len(plan["image"])) % g
    np.testing.assert_array_equal(plan["partner"], g - 1 - slot)  # the group reversed: tf.reverse(images, [0])
    image = _groups(plan["image"], g)
    partner_image = np.take_along_axis(image, _groups(plan["partner"].astype(np.int64), g), axis=1)
    assert (partner_image != image).all()  # m even: never the view's own image


def test_group_shared_draws_are_whole_group_decisions():
    r = Recipe(mix="both", mix_prob=0.5, mix_share="group", images_per_group=4, crops_per_image=2, size=16)
    g = r.group_size
    plan = make_plan(r, SIZES, 0)
    for col in ("mix", "lam", "cutbox"):
        a = _groups(plan[col], g)
        assert (a == a[:, :1]).all(), col  # mixed or not, MixUp or CutMix, lambda and CutMix box: per group
    kinds = _groups(plan["mix"], g)[:, 0]
    assert {MIX_NONE, MIX_MIXUP, MIX_CUTMIX} <= set(kinds.tolist())
    # next partner (the default) is still the same crop of the next image: big_vision's roll by one
    slot = np.arange(len(plan["image"])) % g
    np.testing.assert_array_equal(plan["partner"], (slot + r.crops_per_image) % g)


def test_per_view_default_is_unchanged_and_not_recorded():
    base = Recipe(mix="mixup", images_per_group=4)
    same = Recipe(mix="mixup", images_per_group=4, mix_share="view", partner="next")
    assert base.to_dict() == same.to_dict() and "mix_share" not in base.to_dict()
    a, b = make_plan(base, SIZES, 1), make_plan(same, SIZES, 1)
    assert all(a[k].tobytes() == b[k].tobytes() for k in PARAM_FIELDS)
    assert len(np.unique(_groups(a["lam"], 4)[0])) > 1  # per view: lambdas differ inside a group
    shared = make_plan(base.replace(mix_share="group"), SIZES, 1)
    for k in ("image", "box", "flip", "partner"):  # sharing the mix draw moves nothing else
        np.testing.assert_array_equal(a[k], shared[k])


@pytest.mark.parametrize(
    "kw,key",
    [
        ({"mix": "mixup", "partner": "reverse", "images_per_group": 3}, "images_per_group"),
        ({"mix": "mixup", "mix_share": "batch"}, "mix_share"),
        ({"mix": "mixup", "partner": "roll"}, "partner"),
    ],
)
def test_bad_sharing_settings_are_refused_by_name(kw, key):
    with pytest.raises(RecipeError, match=key):
        Recipe(**kw)


def test_precompute_and_train_replay_the_shared_draws_exactly(teacher_dir, tmp_path):
    """A tiny store with the funmatch recipe's sharing (one draw per group of 8, reversed partners, TF crop):
    the store keeps the plan's bytes and the settings, and train's reader renders the pixels the teacher saw."""
    from kdlib.precompute import PrecomputeConfig, precompute
    from kdlib.replay import Replay

    recipe_file = tmp_path / "shared.yaml"
    recipe_file.write_text(
        "size: 28\ncrop: inception_tf\nscale: [0.05, 1.0]\nratio: [0.75, 1.33]\nmin_object_covered: 0.0\n"
        "mix: mixup\nlam: uniform\nmix_share: group\npartner: reverse\nimages_per_group: 8\n"
    )
    recipe = load_recipe(recipe_file)
    store = precompute(
        PrecomputeConfig(
            teacher=teacher_dir,
            data="fashion-mnist",
            out=str(tmp_path / "s"),
            recipe=str(recipe_file),
            epochs=1,
            limit=64,
            workers=0,
            chunk_views=32,
        )
    )
    rec = store.meta.recipe
    assert rec == recipe.digest_dict()
    assert (rec["crop"], rec["min_object_covered"], rec["mix_share"], rec["partner"]) == (
        "inception_tf",
        0.0,
        "group",
        "reverse",
    )
    plan = make_plan(recipe, store_source_sizes(store), 0)
    stored = {
        k: np.concatenate([store.read_chunk(0, c)[k] for c in range(store.meta.chunks_per_epoch)]) for k in PARAM_FIELDS
    }
    for k in PARAM_FIELDS:
        assert stored[k].tobytes() == plan[k].tobytes(), k
    assert (_groups(stored["lam"], 8) == _groups(stored["lam"], 8)[:, :1]).all()

    info, pixels = store.read_pixels()  # what precompute rendered and the teacher saw
    replay = Replay.from_store(str(tmp_path / "s"), batch_size=16, workers=0, device="cpu", rank=0, world=1)
    views = torch.cat([b.views for b in replay])
    start = info["start"]
    assert info["epoch"] == 0 and len(pixels) > 0
    assert torch.equal(views[start : start + len(pixels)], torch.as_tensor(np.asarray(pixels)))
    # the batch-shared lambda reaches train: each view's label weight is its group's lambda
    lam = torch.cat([b.item["lam"] for b in replay])
    assert torch.equal(lam, torch.from_numpy(plan["lam"]))


def store_source_sizes(store) -> np.ndarray:
    from kdlib.store import open_store_source

    return open_store_source(store).sizes()
