"""Smaller stores: q8 logits and packed params are exact for both stages and cost what inspect says."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import CHUNK_VIEWS, FMNIST_RECIPE, LIMIT

from kdlib.errors import StoreMismatchError
from kdlib.plan import LAM_STEPS, make_plan, pack_params, unpack_params
from kdlib.recipe import load_recipe


@pytest.fixture(scope="module")
def small_store(teacher_dir, tmp_path_factory):
    from kdlib.precompute import PrecomputeConfig, precompute

    out = tmp_path_factory.mktemp("opts") / "s"
    precompute(
        PrecomputeConfig(
            teacher=teacher_dir,
            data="fashion-mnist",
            out=str(out),
            recipe=FMNIST_RECIPE,
            epochs=1,
            k=10,
            limit=LIMIT,
            chunk_views=CHUNK_VIEWS,
            workers=0,
            logit_codec="q8",
            param_packing="packed",
            full_sample=0.25,
        )
    )
    return out


def test_pack_round_trip_is_exact_on_the_grid():
    p = make_plan(load_recipe(FMNIST_RECIPE), np.full((64, 2), 28), 0)
    once = unpack_params(pack_params(p, "packed"), "packed")
    twice = unpack_params(pack_params(once, "packed"), "packed")
    for k in p:
        np.testing.assert_array_equal(once[k], twice[k])
    assert np.abs(once["lam"] - p["lam"]).max() <= 0.5 / LAM_STEPS + 1e-7


def test_q8_packed_store_verifies_and_replays_what_the_teacher_saw(small_store, teacher_dir):
    from kdlib.store import ChunkCache, open_store
    from kdlib.verify import verify
    from kdlib.views import Batch, FixedParams, ViewBatches

    store = open_store(str(small_store))
    assert store.meta.logit_codec == "q8" and store.meta.param_packing == "packed"
    raw = store.read_chunk(0, 0)
    assert raw["box"].dtype == np.uint16 and raw["lam"].dtype == np.uint16 and raw["logits"].dtype == np.uint8
    r = verify(str(small_store), teacher_dir, views=128)
    assert r["ok"] and r["top1_agreement"] == 1.0 and r["max_logit_error"] <= 1 / 32 + 2e-3
    # the student renders from the store exactly what precompute rendered from the quantized plan
    from kdlib.source import open_source

    src = open_source("fashion-mnist", "train", LIMIT)
    recipe = load_recipe(FMNIST_RECIPE)
    plan = unpack_params(pack_params(make_plan(recipe, src.sizes(), 0), "packed"), "packed")
    a = ViewBatches(src, [Batch(0, 0, 64)], recipe.size, recipe.group_size, ChunkCache(store))[0]["views"]
    b = ViewBatches(src, [Batch(0, 0, 64)], recipe.size, recipe.group_size, FixedParams(plan))[0]["views"]
    assert torch.equal(a, b)


def test_inspect_measures_the_smaller_store(small_store, store_dir):
    from kdlib.inspect import inspect_store

    small, default = inspect_store(str(small_store)), inspect_store(store_dir)
    assert small["bytes_per_view"]["params"] < default["bytes_per_view"]["params"]
    # k = classes: every logit is in the labels, so no duplicate full-logit sample is kept
    assert small["truncation"] is None and small["bytes_per_view"]["sample"] == 0


def test_codec_mismatch_is_refused(small_store, teacher_dir):
    from kdlib.precompute import PrecomputeConfig, precompute

    with pytest.raises(StoreMismatchError, match="logit codec"):
        precompute(
            PrecomputeConfig(
                teacher=teacher_dir,
                data="fashion-mnist",
                out=str(small_store),
                recipe=FMNIST_RECIPE,
                epochs=1,
                k=10,
                limit=LIMIT,
                chunk_views=CHUNK_VIEWS,
                workers=0,
                logit_codec="fp16",
                param_packing="packed",
                full_sample=0.25,
            )
        )


@pytest.mark.parametrize("full_sample, sample_views", [(None, 3), (0.01, 41), (0.0, 0)])
def test_full_logit_sample_shrinks_with_many_classes(tmp_path, full_sample, sample_views):
    """1000 classes, k = 5: by default the sample keeps 0.05 % of views (a tenth of the top-k bytes),
    not the 1 % that would cost more than the labels themselves; an explicit fraction is kept."""
    from kdlib.precompute import PrecomputeConfig, precompute

    rng = np.random.default_rng(0)
    data = tmp_path / "c1000.npz"
    np.savez(
        data,
        images=rng.integers(0, 256, (16, 12, 12, 3), dtype=np.uint8),
        labels=np.arange(16) * 61,
        classes=np.array([f"c{i}" for i in range(1000)]),
    )
    store = precompute(
        PrecomputeConfig(
            teacher="resnet8",
            data=str(data),
            out=str(tmp_path / "s"),
            recipe=FMNIST_RECIPE,
            k=5,
            chunk_views=4096,
            workers=0,
            test=False,
            full_sample=full_sample,
        )
    )
    assert store.meta.num_classes == 1000 and store.meta.sample_views == sample_views
    full = store.read_chunk(0, 0).get("full")
    assert (full is None) if sample_views == 0 else full.shape == (min(sample_views, 16), 1000)
