"""kdlib.plan and kdlib.recipe: the plan is a pure, seeded function; its params obey the recipe."""

from __future__ import annotations

import numpy as np
import pytest

from kdlib.errors import RecipeError
from kdlib.plan import MIX_CUTMIX, MIX_MIXUP, MIX_NONE, PARAM_FIELDS, center_params, make_plan, views_per_epoch
from kdlib.recipe import Recipe, load_recipe

SQUARE = np.full((200, 2), 28, np.int64)
# non-square sizes, incl. extreme aspect ratios that force the center-crop fallback
ODD_SIZES = np.array(
    [(20, 32), (32, 20), (7, 300), (300, 7), (1, 1), (1, 40), (64, 48), (33, 17), (500, 375), (2, 3)] * 30, np.int64
)

RECIPES = {
    "mixup_m2c1": Recipe(mix="mixup", images_per_group=2, crops_per_image=1),
    "mixup_m4c2": Recipe(mix="mixup", images_per_group=4, crops_per_image=2, lam="uniform"),
    "cutmix_m2c3": Recipe(mix="cutmix", images_per_group=2, crops_per_image=3, size=16),
    "both_m3c2": Recipe(mix="both", images_per_group=3, crops_per_image=2, mix_prob=0.7, lam="beta", alpha=0.4),
    "both_m5c4": Recipe(mix="both", images_per_group=5, crops_per_image=4, size=32, scale=(0.08, 1.0)),
}


def _bytes(plan: dict[str, np.ndarray]) -> dict[str, tuple[str, tuple, bytes]]:
    return {k: (a.dtype.str, a.shape, a.tobytes()) for k, a in plan.items()}


# -- determinism ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_same_inputs_give_byte_identical_params(name):
    r = RECIPES[name]
    a, b = make_plan(r, ODD_SIZES, 3), make_plan(r, ODD_SIZES.copy(), 3)
    assert set(a) == set(PARAM_FIELDS)
    assert _bytes(a) == _bytes(b)
    # a recipe rebuilt from its dict (what a store keeps) plans the same views
    c = make_plan(Recipe.from_dict(r.to_dict()), ODD_SIZES, 3)
    assert _bytes(a) == _bytes(c)


def test_dtypes_and_shapes_are_the_documented_ones():
    r = RECIPES["both_m3c2"]
    plan = make_plan(r, ODD_SIZES, 0)
    v = views_per_epoch(r, len(ODD_SIZES))
    assert v == len(ODD_SIZES) // 3 * 6
    for k, (dtype, trail) in PARAM_FIELDS.items():
        assert plan[k].dtype == np.dtype(dtype), k
        assert plan[k].shape == (v, *trail), k


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_other_seed_or_epoch_gives_other_params(name):
    r = RECIPES[name]
    base = make_plan(r, SQUARE, 0)
    other_epoch = make_plan(r, SQUARE, 1)
    other_seed = make_plan(r.replace(seed=1), SQUARE, 0)
    for other in (other_epoch, other_seed):
        assert not np.array_equal(base["image"], other["image"])  # order
        assert not np.array_equal(base["box"], other["box"])
        assert not np.array_equal(base["lam"], other["lam"])


def test_seed_and_epoch_are_not_added():
    """Streams are keyed by (seed, epoch), never seed + epoch: seed 0 epoch 1 != seed 1 epoch 0."""
    for r in RECIPES.values():
        a = make_plan(r.replace(seed=0), SQUARE, 1)
        b = make_plan(r.replace(seed=1), SQUARE, 0)
        assert not np.array_equal(a["image"], b["image"])
        assert not np.array_equal(a["box"], b["box"])
        assert _bytes(a) != _bytes(b)


def test_mix_law_change_does_not_move_crops_or_order():
    r = RECIPES["mixup_m4c2"]
    a = make_plan(r, ODD_SIZES, 2)
    b = make_plan(r.replace(lam="maxbeta", mix="cutmix"), ODD_SIZES, 2)
    for k in ("image", "box", "flip", "partner"):
        assert np.array_equal(a[k], b[k]), k
    assert not np.array_equal(a["lam"], b["lam"])


def test_each_epoch_is_a_permutation_of_whole_groups():
    r = RECIPES["mixup_m4c2"]
    sizes = np.full((203, 2), 28)  # 203 = 50 groups of 4 + 3 left out
    plan = make_plan(r, sizes, 0)
    first_crops = plan["image"][:: r.crops_per_image]
    assert len(first_crops) == 200 and len(np.unique(first_crops)) == 200
    assert first_crops.max() < 203
    # crop j of image i is slot i*c + j: every image appears c times in a row
    assert np.array_equal(plan["image"], np.repeat(first_crops, r.crops_per_image))


# -- partners --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(RECIPES))
@pytest.mark.parametrize("epoch", [0, 1, 7])
def test_partner_is_always_another_image_of_the_group(name, epoch):
    r = RECIPES[name]
    plan = make_plan(r, ODD_SIZES, epoch)
    g = r.group_size
    v = len(plan["image"])
    partner = plan["partner"].astype(np.int64)
    assert (partner < g).all()
    group_start = np.arange(v) // g * g
    partner_image = plan["image"][group_start + partner]
    assert (partner_image != plan["image"]).all()
    # each group holds m distinct images, c views each
    groups = plan["image"].reshape(-1, g)
    for row in groups:
        ids, counts = np.unique(row, return_counts=True)
        assert len(ids) == r.images_per_group and (counts == r.crops_per_image).all()


# -- crop boxes --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_crop_boxes_lie_inside_non_square_images(name):
    r = RECIPES[name]
    for epoch in range(3):
        plan = make_plan(r, ODD_SIZES, epoch)
        hw = ODD_SIZES[plan["image"]]
        top, left, h, w = plan["box"].T.astype(np.int64)
        assert (h >= 1).all() and (w >= 1).all()
        assert (top >= 0).all() and (left >= 0).all()
        assert (top + h <= hw[:, 0]).all() and (left + w <= hw[:, 1]).all()


def test_inception_boxes_respect_scale_and_ratio_where_they_fit():
    r = Recipe(scale=(0.3, 0.6), ratio=(0.5, 2.0), images_per_group=1, mix="none")
    sizes = np.full((2000, 2), 200)
    plan = make_plan(r, sizes, 0)
    top, left, h, w = plan["box"].T.astype(np.float64)
    area = h * w / 200**2
    assert area.min() > 0.3 - 0.02 and area.max() < 0.6 + 0.02  # rounding of h, w to pixels
    aspect = w / h
    assert aspect.min() > 0.5 * 0.95 and aspect.max() < 2.0 * 1.05


def test_center_crop_recipe_boxes_are_centered_squares():
    r = Recipe(crop="center", center_fraction=0.5, images_per_group=1, mix="none", flip=False)
    plan = make_plan(r, ODD_SIZES, 0)
    hw = ODD_SIZES[plan["image"]]
    top, left, h, w = plan["box"].T.astype(np.int64)
    side = np.maximum(1, np.rint(hw.min(1) * 0.5))
    assert np.array_equal(h, side) and np.array_equal(w, side)
    assert np.array_equal(top, (hw[:, 0] - side) // 2) and np.array_equal(left, (hw[:, 1] - side) // 2)
    assert (plan["flip"] == 0).all()


# -- lambdas and cutmix ------------------------------------------------------------------------
def test_maxbeta_lambda_lies_in_half_to_one():
    r = Recipe(mix="mixup", mix_prob=1.0, lam="maxbeta", alpha=1.0)
    lam = make_plan(r, np.full((20000, 2), 28), 0)["lam"]
    assert lam.min() >= 0.5 and lam.max() <= 1.0
    # alpha=1: uniform on [0.5, 1]
    assert abs(float(lam.mean()) - 0.75) < 0.01
    assert lam.min() < 0.51 and lam.max() > 0.99


def test_uniform_lambda_lies_in_zero_to_one():
    r = Recipe(mix="mixup", mix_prob=1.0, lam="uniform")
    lam = make_plan(r, np.full((20000, 2), 28), 0)["lam"]
    assert lam.min() >= 0.0 and lam.max() < 1.0
    assert lam.min() < 0.01 and lam.max() > 0.99 and abs(float(lam.mean()) - 0.5) < 0.01


def test_beta_lambda_is_symmetric_beta():
    r = Recipe(mix="mixup", mix_prob=1.0, lam="beta", alpha=0.2)
    lam = make_plan(r, np.full((20000, 2), 28), 0)["lam"].astype(np.float64)
    assert lam.min() >= 0 and lam.max() <= 1
    assert abs(lam.mean() - 0.5) < 0.02
    assert (lam < 0.1).mean() > 0.3 and (lam > 0.9).mean() > 0.3  # Beta(0.2, 0.2) is U-shaped


def test_mix_prob_and_kinds():
    sizes = np.full((20000, 2), 28)
    none = make_plan(Recipe(mix="none"), sizes, 0)
    assert (none["mix"] == MIX_NONE).all() and (none["lam"] == 1).all() and (none["cutbox"] == 0).all()
    p = make_plan(Recipe(mix="both", mix_prob=0.6), sizes, 0)
    mixed = p["mix"] != MIX_NONE
    assert abs(mixed.mean() - 0.6) < 0.02
    assert abs((p["mix"][mixed] == MIX_MIXUP).mean() - 0.5) < 0.02
    assert (p["lam"][~mixed] == 1).all() and (p["cutbox"][~mixed] == 0).all()
    mixup = p["mix"] == MIX_MIXUP
    assert (p["cutbox"][mixup] == 0).all()


@pytest.mark.parametrize("size", [28, 17, 32])
def test_cutmix_lambda_is_the_kept_area(size):
    r = Recipe(mix="cutmix", mix_prob=1.0, size=size, lam="uniform")
    p = make_plan(r, np.full((5000, 2), 40), 0)
    assert (p["mix"] == MIX_CUTMIX).all()
    t, l, h, w = p["cutbox"].T.astype(np.int64)
    assert (t >= 0).all() and (l >= 0).all() and (h >= 0).all() and (w >= 0).all()
    assert (t + h <= size).all() and (l + w <= size).all()
    kept = np.float32(1.0) - (h * w).astype(np.float64) / size**2
    np.testing.assert_array_equal(p["lam"], kept.astype(np.float32))
    assert (h * w > 0).mean() > 0.9  # the boxes are real, not all empty


# -- center params -------------------------------------------------------------------------------
def test_center_params_are_identity_views():
    sizes = np.array([(28, 28), (20, 32), (32, 20), (5, 5)], np.int64)
    ids = np.array([0, 1, 2, 3, 1])
    p = center_params(sizes, ids)
    assert set(p) == set(PARAM_FIELDS)
    for k, (dtype, trail) in PARAM_FIELDS.items():
        assert p[k].dtype == np.dtype(dtype) and p[k].shape == (5, *trail), k
    assert p["image"].tolist() == [0, 1, 2, 3, 1]
    assert p["box"].tolist() == [[0, 0, 28, 28], [0, 6, 20, 20], [6, 0, 20, 20], [0, 0, 5, 5], [0, 6, 20, 20]]
    assert (p["flip"] == 0).all() and (p["mix"] == 0).all() and (p["lam"] == 1).all() and (p["cutbox"] == 0).all()


# -- recipes --------------------------------------------------------------------------------------
def test_recipe_unknown_key_is_an_error(tmp_path):
    with pytest.raises(RecipeError, match="mixx"):
        Recipe.from_dict({"size": 28, "mixx": "mixup"})
    f = tmp_path / "r.yaml"
    f.write_text("size: 28\ncrop_scale: [0.1, 1.0]\n")
    with pytest.raises(RecipeError, match="crop_scale"):
        load_recipe(f)


@pytest.mark.parametrize("mix", ["mixup", "cutmix", "both"])
def test_recipe_mixing_needs_two_images_per_group(mix):
    with pytest.raises(RecipeError, match="images_per_group"):
        Recipe(mix=mix, images_per_group=1, crops_per_image=4)
    with pytest.raises(RecipeError, match="images_per_group"):
        Recipe.from_dict({"mix": mix, "images_per_group": 1})
    Recipe(mix="none", images_per_group=1, crops_per_image=4)  # no mixing: one image is fine


def test_recipe_round_trips_and_file_overrides(tmp_path):
    r = RECIPES["both_m3c2"]
    assert Recipe.from_dict(r.to_dict()) == r
    f = tmp_path / "r.yaml"
    f.write_text("size: 20\nmix: cutmix\nimages_per_group: 3\nseed: 4\n")
    loaded = load_recipe(f, seed=9)
    assert loaded.size == 20 and loaded.mix == "cutmix" and loaded.seed == 9 and loaded.name == "r"


def test_too_few_images_for_a_group_is_an_error():
    with pytest.raises(ValueError, match="fewer than one group"):
        make_plan(Recipe(images_per_group=4, mix="mixup"), np.full((3, 2), 28), 0)
