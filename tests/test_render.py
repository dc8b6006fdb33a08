"""kdlib.render and kdlib.views: one render function; the train path replays the precompute path's pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdlib.feed import Feed
from kdlib.plan import MIX_CUTMIX, MIX_MIXUP, PARAM_FIELDS, center_params, make_plan
from kdlib.recipe import Recipe
from kdlib.render import render_views
from kdlib.source import Source, open_source
from kdlib.store import ChunkCache, open_store_source
from kdlib.views import Batch, FixedParams, PlanParams, ViewBatches, split_range

CPU = torch.device("cpu")


def _batches(ranges, epoch: int = 0) -> list[Batch]:
    return [Batch(epoch, a, b) for a, b in ranges]


def _collect(ds: ViewBatches, workers: int, render: str = "auto") -> list[dict]:
    return [
        {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in item.items()}
        for item in Feed(ds, CPU, workers, render)
    ]


# -- parity: precompute path == train path ---------------------------------------------------
@pytest.mark.parametrize("workers", [0, 2])
def test_store_replay_renders_the_precompute_pixels(store, train_source, workers):
    meta = store.meta
    recipe = Recipe.from_dict(meta.recipe)
    g = recipe.group_size
    # source reopened the way train does it (fingerprint-checked)
    source = open_store_source(store)
    assert source.fingerprint() == train_source.fingerprint()
    # batches of 5 groups: they straddle the 64-view chunks, so ChunkCache joins chunks
    ranges = split_range(0, meta.views_per_epoch, 5 * g)
    assert any(a // meta.chunk_views != (b - 1) // meta.chunk_views for a, b in ranges)
    epochs = [0, 1] if workers == 0 else [1]
    for epoch in epochs:
        params = make_plan(recipe, source.sizes(), epoch)
        pre = _collect(
            ViewBatches(source, _batches(ranges, epoch), recipe.size, g, PlanParams(recipe, source.sizes())), 0
        )
        replay = _collect(ViewBatches(source, _batches(ranges, epoch), recipe.size, g, ChunkCache(store)), workers)
        assert len(pre) == len(replay) == len(ranges)
        for a, b in zip(pre, replay):
            assert (a["start"], a["stop"]) == (b["start"], b["stop"])
            assert a["views"].dtype == torch.uint8 and a["views"].shape == (b["stop"] - b["start"], 1, 28, 28)
            assert torch.equal(a["views"], b["views"]), f"epoch {epoch} views {a['start']}:{a['stop']}"
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["lam"], b["lam"])
            assert torch.equal(a["label"], b["label"]) and torch.equal(a["partner_label"], b["partner_label"])
            assert "logits" in b and b["logits"].shape == (b["stop"] - b["start"], meta.k)
        # the views are not trivially equal: mixed, flipped and cropped views are there
        assert params["mix"].any() and params["flip"].any()


def test_stored_params_are_the_plan_bytes(store, train_source):
    """Invariant 1: train reads back exactly what precompute drew (no re-sampling)."""
    recipe = Recipe.from_dict(store.meta.recipe)
    for epoch in range(store.meta.epochs_done):
        plan = make_plan(recipe, train_source.sizes(), epoch)
        for c in range(store.meta.chunks_per_epoch):
            a, b = store.meta.chunk_range(c)
            cols = store.read_chunk(epoch, c)
            for k in PARAM_FIELDS:
                assert cols[k].dtype == plan[k].dtype and cols[k].tobytes() == plan[k][a:b].tobytes(), (epoch, c, k)


def test_render_does_not_depend_on_batch_composition(train_source):
    r = Recipe(mix="both", images_per_group=3, crops_per_image=2, mix_prob=0.8, size=24)
    p = make_plan(r, train_source.sizes(), 0)
    v = 12 * r.group_size
    p = {k: a[:v] for k, a in p.items()}
    whole = render_views(p, train_source.decode, r.size, r.group_size)
    parts = [
        render_views({k: a[s : s + r.group_size] for k, a in p.items()}, train_source.decode, r.size, r.group_size)
        for s in range(0, v, r.group_size)
    ]
    assert torch.equal(whole, torch.cat(parts))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one_thread = render_views(p, train_source.decode, r.size, r.group_size)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(whole, one_thread)


# -- decode once per image per group -------------------------------------------------------------
class CountingSource(Source):
    def __init__(self, inner: Source):
        super().__init__(inner.name, inner.split, inner.root, inner.classes, inner.channels)
        self.inner = inner
        self.calls: list[int] = []

    def __len__(self) -> int:
        return len(self.inner)

    def sizes(self) -> np.ndarray:
        return self.inner.sizes()

    def labels(self) -> np.ndarray:
        return self.inner.labels()

    def decode(self, i: int) -> np.ndarray:
        self.calls.append(int(i))
        return self.inner.decode(i)


@pytest.mark.parametrize("m,c", [(2, 1), (4, 2), (2, 3)])
def test_each_image_is_decoded_once_per_group(train_source, m, c):
    r = Recipe(mix="mixup", images_per_group=m, crops_per_image=c)
    src = CountingSource(train_source)
    params = make_plan(r, src.sizes(), 0)
    g = r.group_size
    n_groups = 10
    ds = ViewBatches(src, _batches(split_range(0, n_groups * g, g)), r.size, g, FixedParams(params))
    for item in Feed(ds, CPU, 0):
        distinct = torch.unique(item["image"])
        assert len(distinct) == m
    assert len(src.calls) == n_groups * m  # 1/c decodes per view
    assert len(src.calls) * c == n_groups * g


def test_render_views_decodes_each_distinct_image_of_a_batch_once(train_source):
    r = Recipe(mix="cutmix", images_per_group=2, crops_per_image=4)
    params = make_plan(r, train_source.sizes(), 0)
    p = {k: a[: 6 * r.group_size] for k, a in params.items()}
    calls = []

    def decode(i):
        calls.append(i)
        return train_source.decode(i)

    views = render_views(p, decode, r.size, r.group_size)
    assert views.shape == (48, 1, 28, 28)
    assert sorted(calls) == sorted(set(p["image"].tolist())) and len(calls) == 12


# -- pixels against straightforward references ----------------------------------------------------
def _identity_params(ids, size, **over):
    v = len(ids)
    p = {
        "image": np.asarray(ids, np.uint32),
        "box": np.tile(np.array([0, 0, size, size], np.int32), (v, 1)),
        "flip": np.zeros(v, np.uint8),
        "partner": np.zeros(v, np.uint16),
        "mix": np.zeros(v, np.uint8),
        "lam": np.ones(v, np.float32),
        "cutbox": np.zeros((v, 4), np.int16),
    }
    for k, a in over.items():
        p[k] = np.asarray(a, dtype=p[k].dtype).reshape(p[k].shape)
    return p


def test_center_params_render_the_image_itself(train_source):
    ids = np.arange(8)
    views = render_views(center_params(train_source.sizes(), ids), train_source.decode, 28, 1)
    expected = torch.from_numpy(np.stack([train_source.decode(i) for i in ids]))
    assert views.dtype == torch.uint8 and torch.equal(views, expected)


def test_flip_is_a_horizontal_mirror(train_source):
    p = _identity_params([3, 5], 28, flip=[1, 0])
    views = render_views(p, train_source.decode, 28, 1)
    a, b = train_source.decode(3), train_source.decode(5)
    assert not np.array_equal(a, a[..., ::-1])
    assert np.array_equal(views[0].numpy(), a[..., ::-1]) and np.array_equal(views[1].numpy(), b)


@pytest.mark.parametrize("lams", [(0.3, 0.7), (0.5, 0.5), (0.9137, 0.0625), (1.0, 0.0)])
def test_mixup_pixel_is_rounded_float32_blend(train_source, lams):
    ids = [10, 11, 12, 13]  # two groups of two images
    lam = [lams[0], lams[1], lams[1], lams[0]]
    p = _identity_params(ids, 28, partner=[1, 0, 1, 0], mix=[MIX_MIXUP] * 4, lam=lam)
    views = render_views(p, train_source.decode, 28, 2).numpy()
    imgs = [train_source.decode(i).astype(np.float32) for i in ids]
    for j in range(4):
        partner = imgs[(j // 2) * 2 + (1 - j % 2)]
        l32 = np.float32(lam[j])
        ref = np.round(l32 * imgs[j] + (np.float32(1.0) - l32) * partner)  # round half to even, like torch
        assert np.array_equal(views[j], np.clip(ref, 0, 255).astype(np.uint8)), j
    if 0 < lams[0] < 1:
        assert not np.array_equal(views[0], train_source.decode(10))


def test_cutmix_region_is_copied_from_the_partner(train_source):
    ids = [20, 21, 22]
    cutbox = [[3, 5, 10, 12], [0, 0, 28, 1], [27, 27, 1, 1]]
    p = _identity_params(ids, 28, partner=[1, 2, 0], mix=[MIX_CUTMIX] * 3, lam=[0.5] * 3, cutbox=cutbox)
    views = render_views(p, train_source.decode, 28, 3).numpy()
    imgs = [train_source.decode(i) for i in ids]
    for j, (t, l, h, w) in enumerate(cutbox):
        partner = imgs[(j + 1) % 3]
        inside = np.zeros((28, 28), bool)
        inside[t : t + h, l : l + w] = True
        assert np.array_equal(views[j][:, inside], partner[:, inside]), j
        assert np.array_equal(views[j][:, ~inside], imgs[j][:, ~inside]), j


def test_unmixed_views_in_a_mixed_batch_are_untouched(train_source):
    ids = [30, 31]
    p = _identity_params(ids, 28, partner=[1, 0], mix=[MIX_MIXUP, 0], lam=[0.6, 0.4])
    views = render_views(p, train_source.decode, 28, 2).numpy()
    assert np.array_equal(views[1], train_source.decode(31))
    assert not np.array_equal(views[0], train_source.decode(30))


def test_render_refuses_partial_groups(train_source):
    p = _identity_params([1, 2, 3], 28)
    with pytest.raises(ValueError, match="whole groups"):
        render_views(p, train_source.decode, 28, 2)


# -- RGB, non-square sources ---------------------------------------------------------------------
def test_rgb_npz_non_square_renders_v3ss(rgb_npz):
    src = open_source(rgb_npz)
    assert src.channels == 3 and tuple(src.sizes()[0]) == (20, 32)
    r = Recipe(mix="both", images_per_group=2, crops_per_image=2, size=16, mix_prob=1.0)
    params = make_plan(r, src.sizes(), 0)
    items = list(
        Feed(
            ViewBatches(
                src,
                _batches(split_range(0, len(params["image"]), r.group_size)),
                r.size,
                r.group_size,
                FixedParams(params),
            ),
            CPU,
            0,
        )
    )
    views = torch.cat([it["views"] for it in items])
    assert views.shape == (16, 3, 16, 16) and views.dtype == torch.uint8
    # the three channels are really rendered (the random images differ per channel)
    assert not torch.equal(views[:, 0], views[:, 1])
    # identity check: the center square of a 20x32 image, channel order kept (HWC -> CHW)
    center = render_views(center_params(src.sizes(), np.arange(8)), src.decode, 20, 1)
    assert center.shape == (8, 3, 20, 20)
    with np.load(rgb_npz) as z:
        expected = z["images"][:, :, 6:26, :].transpose(0, 3, 1, 2)
    assert np.array_equal(center.numpy(), expected)


def test_rgb_imagefolder_mixed_sizes(rgb_folder):
    from conftest import RGB_SIZES

    src = open_source(rgb_folder)
    assert sorted(map(tuple, src.sizes().tolist())) == sorted(RGB_SIZES)
    r = Recipe(mix="cutmix", images_per_group=4, crops_per_image=2, size=12, mix_prob=1.0)
    params = make_plan(r, src.sizes(), 3)
    whole = render_views(params, src.decode, r.size, r.group_size)
    assert whole.shape == (16, 3, 12, 12) and whole.dtype == torch.uint8
    one_by_one = torch.cat(
        [render_views({k: a[s : s + 8] for k, a in params.items()}, src.decode, r.size, 8) for s in (0, 8)]
    )
    assert torch.equal(whole, one_by_one)
    # each view's crop comes from its own image: with mixing off, a view equals that image rendered alone
    plain = {**params, "mix": np.zeros_like(params["mix"])}
    unmixed = render_views(plain, src.decode, r.size, r.group_size)
    for j in range(16):
        alone = render_views({k: a[j : j + 1] for k, a in plain.items()}, src.decode, r.size, 1)
        assert torch.equal(unmixed[j], alone[0]), j
