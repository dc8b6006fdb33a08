"""Render: the one function that turns view params and decoded images into pixels.

Precompute and train both call `render` (through `render_views`), so for the same params
and source bytes the teacher and the student see identical uint8 tensors. The crop-resize
is torchvision's `roi_align` (bilinear, with adaptive sampling that averages when a crop is
shrunk): it cuts every crop of a batch in one vectorised call, and each output pixel
depends only on its own box and image, so batch composition, worker count and thread
count cannot change a view. Mixing is done in float32 on the unrounded crops and rounded
to uint8 once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torchvision.ops import roi_align

from .plan import MIX_CUTMIX, MIX_MIXUP

__all__ = ["render", "render_views"]


def render(params: dict[str, np.ndarray], images: Sequence[np.ndarray], size: int, group_size: int) -> torch.Tensor:
    """Views as uint8 [V, C, size, size] for V = len(params["image"]) views (whole groups).

    `images[j]` is the decoded image (uint8 [C, H, W]) of view j; views cut from the same
    image may share one array (that is how a group decodes each image once).
    """
    v = len(params["image"])
    if v % group_size:
        raise ValueError(f"render needs whole groups: {v} views, group size {group_size}")
    crops = _crop_resize(params["box"], images, size)
    flip = torch.from_numpy(params["flip"].astype(bool))
    if flip.any():
        crops[flip] = crops[flip].flip(-1)

    mix = torch.from_numpy(params["mix"].astype(np.int64))
    if bool((mix != 0).any()):
        group_start = torch.arange(v) // group_size * group_size
        partner = crops[group_start + torch.from_numpy(params["partner"].astype(np.int64))]
        lam = torch.from_numpy(params["lam"]).view(v, 1, 1, 1)
        mixed_up = lam * crops + (1.0 - lam) * partner
        inside = _box_mask(params["cutbox"], size)
        cut = torch.where(inside, partner, crops)
        crops = torch.where((mix == MIX_MIXUP).view(v, 1, 1, 1), mixed_up,
                            torch.where((mix == MIX_CUTMIX).view(v, 1, 1, 1), cut, crops))
    return crops.round_().clamp_(0, 255).to(torch.uint8)


def render_views(params: dict[str, np.ndarray], decode: Callable[[int], np.ndarray], size: int,
                 group_size: int) -> torch.Tensor:
    """Decode each distinct image of the batch once, then `render`."""
    ids = params["image"]
    decoded: dict[int, np.ndarray] = {}
    images = []
    for i in ids.tolist():
        if i not in decoded:
            decoded[i] = decode(i)
        images.append(decoded[i])
    return render(params, images, size, group_size)


def _crop_resize(box: np.ndarray, images: Sequence[np.ndarray], size: int) -> torch.Tensor:
    """float32 [V, C, size, size]: each view's box cut from its image and resized by roi_align."""
    v = len(images)
    channels = images[0].shape[0]
    out = torch.empty((v, channels, size, size), dtype=torch.float32)
    # roi_align takes one input tensor, so views are bucketed by image shape (one bucket for
    # same-size sources like Fashion-MNIST); within a bucket each distinct array is stacked once.
    buckets: dict[tuple[int, ...], list[int]] = {}
    for j, img in enumerate(images):
        buckets.setdefault(img.shape, []).append(j)
    top, left, h, w = (box[:, i].astype(np.float32) for i in range(4))
    rois = np.stack([np.zeros(v, np.float32), left, top, left + w, top + h], axis=1)
    for views in buckets.values():
        slot_of: dict[int, int] = {}
        stack = []
        index = np.empty(len(views), np.float32)
        for n, j in enumerate(views):
            key = id(images[j])
            if key not in slot_of:
                slot_of[key] = len(stack)
                stack.append(images[j])
            index[n] = slot_of[key]
        batch = torch.from_numpy(np.stack(stack)).float()
        r = torch.from_numpy(rois[views])
        r[:, 0] = torch.from_numpy(index)
        # aligned=True: pixel centres at +0.5, so box [left, left + w) covers exactly w source pixels.
        out[torch.as_tensor(views)] = roi_align(batch, r, output_size=(size, size), spatial_scale=1.0,
                                               sampling_ratio=-1, aligned=True)
    return out


def _box_mask(cutbox: np.ndarray, size: int) -> torch.Tensor:
    """bool [V, 1, size, size]: inside each view's cutmix box."""
    b = torch.from_numpy(cutbox.astype(np.int64))
    ar = torch.arange(size)
    rows = (ar >= b[:, 0:1]) & (ar < (b[:, 0] + b[:, 2]).unsqueeze(1))
    cols = (ar >= b[:, 1:2]) & (ar < (b[:, 1] + b[:, 3]).unsqueeze(1))
    return (rows[:, :, None] & cols[:, None, :]).unsqueeze(1)
