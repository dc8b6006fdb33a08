"""The pil-bilinear-1 renderer (issue 10): Pillow's C resample in the workers and kdlib's batched integer
taps on an accelerator give the same bytes, for any box, image shape, channel count, flip, mix and decoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import smooth_jpegs
from PIL import Image

from kdlib.plan import MIX_CUTMIX, MIX_MIXUP, MIX_NONE, make_plan
from kdlib.recipe import Recipe
from kdlib.render import (
    RENDERER,
    Decoded,
    decode_batch,
    param_tensors,
    pillow_agrees,
    render_decoded,
    render_pil,
    render_views,
)
from kdlib.source import open_source


def _taps_render(params: dict[str, np.ndarray], images: list[np.ndarray], size: int, group_size: int) -> torch.Tensor:
    """The accelerator's implementation (run here on the CPU) over CHW arrays."""
    dec = decode_batch(params, lambda i: images[i])
    return render_decoded(param_tensors(params, dec, size, group_size), dec, size)


def _pil_image(a: np.ndarray) -> Image.Image:
    return Image.fromarray(a[0] if len(a) == 1 else a.transpose(1, 2, 0))


@pytest.mark.parametrize("channels", [1, 3])
def test_taps_equal_pillow_for_random_boxes(channels):
    """Shrinks and enlargements, fractional and whole boxes, images taller than wide (where one Pillow
    call may reorder its passes), tiny and photo-sized."""
    rng = np.random.default_rng(channels)
    for trial in range(40):
        h_img, w_img = (int(x) for x in rng.integers(6, 520, 2))
        img = rng.integers(0, 256, (channels, h_img, w_img), dtype=np.uint8)
        if trial % 2:  # smooth, like photos: rounding ties are likelier than in noise
            img = (np.cumsum(img.astype(np.int64), axis=2) // 8 % 256).astype(np.uint8)
        size, n = int(rng.integers(3, 160)), 4
        h, w = h_img * rng.uniform(0.01, 1, n), w_img * rng.uniform(0.01, 1, n)
        box = np.stack([rng.uniform(0, h_img - h), rng.uniform(0, w_img - w), h, w], 1).astype(np.float32)
        box[::2] = np.maximum(np.floor(box[::2]), 1)
        params = {
            "image": np.zeros(n, np.int64),
            "box": box,
            "flip": np.array([0, 1, 0, 1], bool),
            "partner": np.array([1, 0, 1, 0]),
            "mix": np.array([MIX_NONE, MIX_MIXUP, MIX_CUTMIX, MIX_NONE]),
            "lam": rng.uniform(0, 1, n).astype(np.float32),
            "cutbox": np.tile([size // 4, size // 3, size // 2, size // 2], (n, 1)),
        }
        pil = render_pil(params, lambda i, s: (_pil_image(img), 1), size, 2)
        taps = _taps_render(params, [img], size, 2)
        assert pil.shape == (n, channels, size, size)
        assert torch.equal(pil, taps), (trial, h_img, w_img, size, box)


def test_single_pillow_call_is_not_the_definition():
    """This Pillow runs the vertical pass first for some shapes when given both axes at once; the
    renderer fixes the order (horizontal, then vertical), so its pixels do not depend on that choice."""
    rng = np.random.default_rng(3)
    img = (np.cumsum(rng.integers(0, 256, (3, 300, 60), dtype=np.int64), axis=2) // 8 % 256).astype(np.uint8)
    box = np.array([[7.25, 3.5, 250.0, 41.75]], np.float32)
    params = {
        "image": np.zeros(1, np.int64),
        "box": box,
        "flip": np.zeros(1, bool),
        "partner": np.zeros(1, np.int64),
        "mix": np.zeros(1, np.int64),
        "lam": np.ones(1, np.float32),
        "cutbox": np.zeros((1, 4), np.int64),
    }
    ours = render_pil(params, lambda i, s: (_pil_image(img), 1), 50, 1)
    assert torch.equal(ours, _taps_render(params, [img], 50, 1))
    one_call = _pil_image(img).resize((50, 50), Image.Resampling.BILINEAR, box=(3.5, 7.25, 45.25, 257.25))
    diff = np.abs(np.asarray(one_call).transpose(2, 0, 1).astype(int) - ours[0].numpy().astype(int))
    assert diff.max() <= 1  # the same filter either way; only the order of the two roundings differs


def test_pinned_pillow_is_the_fast_path():
    """With the pinned Pillow the workers use its C code; a Pillow that disagreed would fall back to the taps."""
    assert RENDERER == "pil-bilinear-1" and pillow_agrees()


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> str:
    """Smooth JPEGs of photo-like sizes (landscape and portrait), 2 classes."""
    return smooth_jpegs(tmp_path_factory.mktemp("photos"), [(200, 150), (150, 200), (173, 97)], 12, seed=9, grid=(7, 6))


@pytest.mark.parametrize("draft", [False, True])
def test_worker_pillow_path_equals_taps_on_jpegs(photo_folder, draft):
    src = open_source(photo_folder)
    r = Recipe(mix="both", mix_prob=0.8, images_per_group=4, crops_per_image=2, size=40, scale=(0.05, 1.0))
    p = make_plan(r, src.sizes(), 1)
    p = {k: a[:48] for k, a in p.items()}
    pil = render_pil(p, src.decode_image, r.size, r.group_size, draft=draft)
    dec = decode_batch(p, src.decode, r.size, src.decode_draft if draft else None)
    taps = render_decoded(param_tensors(p, dec, r.size, r.group_size), dec, r.size)
    assert torch.equal(pil, taps)
    if draft:
        assert (dec.scale < 1).any()  # some images were draft-decoded
        assert not torch.equal(pil, render_pil(p, src.decode_image, r.size, r.group_size))


def test_both_renderers_stay_available():
    """Stores written with roi_align-1 replay with it; its pixels differ from pil-bilinear-1's."""
    src = open_source("fashion-mnist", "train", 64)
    r = Recipe(mix="none", images_per_group=2, size=20)
    p = {k: a[:16] for k, a in make_plan(r, src.sizes(), 0).items()}
    new = render_views(p, src.decode, r.size, r.group_size)
    old = render_views(p, src.decode, r.size, r.group_size, "roi_align-1")
    assert new.shape == old.shape and not torch.equal(new, old)
    assert (new.int() - old.int()).abs().float().mean() < 8  # the same crops, resampled by another filter


def test_decoded_class_is_what_taps_read():
    img = np.arange(3 * 5 * 7, dtype=np.uint8).reshape(3, 5, 7)
    dec = Decoded([torch.from_numpy(img)[None]], [torch.tensor([0])], torch.tensor([0]), torch.tensor([1.0]))
    params = {
        "image": np.zeros(1, np.int64),
        "box": np.array([[0, 0, 5, 7]], np.float32),
        "flip": np.zeros(1, bool),
        "partner": np.zeros(1, np.int64),
        "mix": np.zeros(1, np.int64),
        "lam": np.ones(1, np.float32),
        "cutbox": np.zeros((1, 4), np.int64),
    }
    # the whole image onto its own size is the identity, as in Pillow
    out = render_decoded(param_tensors(params, dec, 5, 1), dec, 5)
    assert out.shape == (1, 3, 5, 5)
    same = render_decoded(param_tensors({**params, "box": np.array([[0, 0, 5, 5]], np.float32)}, dec, 5, 1), dec, 5)
    assert torch.equal(same[0], torch.from_numpy(img[:, :, :5]))
