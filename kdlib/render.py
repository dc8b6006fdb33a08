"""Render: the one function that turns view params and decoded images into pixels.

Precompute, train, verify and eval all call `render_decoded`, so for the same params and source bytes
the teacher and the student see identical uint8 tensors. It is split in two halves so that
each runs where it is cheapest:

- `decode_batch` (DataLoader workers, CPU): decode each distinct image of a batch once and
  stack same-shape images; nothing is resized here.
- `render_decoded` (wherever the tensors are: the accelerator in the main process, or the CPU):
  cut every crop of the batch with torchvision's `roi_align` (bilinear, adaptive sampling
  that averages when a crop is shrunk) in one vectorised call per image shape, flip, and mix
  in float32 on the unrounded crops; round to uint8 once.

Each output pixel depends only on its own box and image, so batch composition, worker count
and thread count cannot change a view. On one kind of device the result is bit-identical;
CPU and CUDA roi_align differ by at most 1 LSB on a few pixels (measured on an H200: 699 of
38.5 M), which is why a store records the device kind it was rendered on (`RENDERER`).

With the `pil-draft` decoder, a JPEG whose every box is shrunk at least 2x is decoded at
1/2, 1/4 or 1/8 scale in the DCT domain and its boxes are scaled to match (aligned=True keeps
pixel centres consistent). It changes pixels, so the decoder is recorded in the store too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.ops import roi_align

from .plan import MIX_CUTMIX, MIX_MIXUP

__all__ = ["RENDERER", "DECODERS", "Decoded", "Draft", "decode_batch", "draft_scales", "param_tensors",
           "render_decoded", "render_views"]

RENDERER = "roi_align-1"  # the crop-resize + mix arithmetic; bump if it changes pixels
DECODERS = ("pil", "pil-draft")
_DRAFT_SCALES = (8, 4, 2)


@dataclass
class Decoded:
    """The distinct images of a batch, decoded once: one uint8 stack [n, C, H, W] per image shape,
    the views cut from each stack, each view's slot in its stack, and the factor from source
    pixels to decoded pixels (1 unless the image was draft-decoded). Index lists are made on the
    host, so rendering on a device never waits on a mask."""

    stacks: list[torch.Tensor]
    members: list[torch.Tensor]  # int64 [V_b]: the views whose image is in stacks[b]
    slot: torch.Tensor  # int64 [V]
    scale: torch.Tensor  # float32 [V]: decoded pixels per source pixel

    def _map(self, f: Callable[[torch.Tensor], torch.Tensor]) -> "Decoded":
        return Decoded([f(s) for s in self.stacks], [f(m) for m in self.members], f(self.slot), f(self.scale))

    def to(self, device: torch.device, non_blocking: bool = False) -> "Decoded":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Decoded":  # DataLoader(pin_memory=True) calls this on custom types
        return self._map(torch.Tensor.pin_memory)


Draft = Callable[[int, int], tuple[np.ndarray, int]]  # (id, scale asked) -> (pixels, scale applied)


def draft_scales(params: dict[str, np.ndarray], size: int) -> dict[int, int]:
    """image id -> DCT downscale (2, 4 or 8) allowed for it: every box cut from that image in this
    batch is shrunk by at least that factor, so nothing finer than the decoded grid is ever sampled."""
    ids = params["image"].astype(np.int64)
    shrink = np.minimum(params["box"][:, 2], params["box"][:, 3]).astype(np.float64) / size
    least: dict[int, float] = {}
    for i, s in zip(ids.tolist(), shrink.tolist()):
        least[i] = min(least.get(i, s), s)
    return {i: next(d for d in _DRAFT_SCALES if s >= d) for i, s in least.items() if s >= 2}


def decode_batch(params: dict[str, np.ndarray], decode: Callable[[int], np.ndarray], size: int | None = None,
                 draft: Draft | None = None) -> Decoded:
    """Decode each distinct image of `params["image"]` once (the CPU half of rendering).

    `decode(i)` returns uint8 [C, H, W]. With `draft` (the pil-draft decoder), an image whose
    boxes are all shrunk 2x or more is decoded smaller by `draft(i, scale)` instead."""
    ids = params["image"].astype(np.int64).tolist()
    drafts = draft_scales(params, size) if draft is not None and size else {}
    where: dict[int, tuple[int, int, float]] = {}
    buckets: dict[tuple[int, ...], list[np.ndarray]] = {}
    for i in ids:
        if i in where:
            continue
        scale = 1
        if i in drafts:
            img, scale = draft(i, drafts[i])
        else:
            img = decode(i)
        bucket = buckets.setdefault(img.shape, [])
        where[i] = (list(buckets).index(img.shape), len(bucket), 1.0 / scale)
        bucket.append(img)
    stack_of = np.array([where[i][0] for i in ids], np.int64)
    return Decoded([torch.from_numpy(np.stack(b)) for b in buckets.values()],
                   [torch.from_numpy(np.flatnonzero(stack_of == b)) for b in range(len(buckets))],
                   torch.tensor([where[i][1] for i in ids], dtype=torch.int64),
                   torch.tensor([where[i][2] for i in ids], dtype=torch.float32))


def param_tensors(params: dict[str, np.ndarray], group_size: int) -> dict[str, torch.Tensor]:
    """The params render needs, as CPU tensors, with the index lists of flipped / mixed views
    computed on the host (so rendering on a device never waits on a boolean mask)."""
    v = len(params["image"])
    if v % group_size:
        raise ValueError(f"render needs whole groups: {v} views, group size {group_size}")
    group_start = np.arange(v) // group_size * group_size
    mix = params["mix"].astype(np.int64)
    mixup, cut = np.flatnonzero(mix == MIX_MIXUP), np.flatnonzero(mix == MIX_CUTMIX)
    partner = group_start + params["partner"].astype(np.int64)
    return {
        "box": torch.from_numpy(params["box"].astype(np.float32)),
        "flip": torch.from_numpy(np.flatnonzero(params["flip"])),
        "mixup": torch.from_numpy(mixup), "mixup_partner": torch.from_numpy(partner[mixup]),
        "mixup_lam": torch.from_numpy(params["lam"][mixup].astype(np.float32)).view(-1, 1, 1, 1),
        "cut": torch.from_numpy(cut), "cut_partner": torch.from_numpy(partner[cut]),
        "cutbox": torch.from_numpy(params["cutbox"][cut].astype(np.int64)),
    }


def render_decoded(p: dict[str, torch.Tensor], images: Decoded, size: int) -> torch.Tensor:
    """Views as uint8 [V, C, size, size] on the device of `images` (the device half of rendering).

    `p` comes from `param_tensors` and lives on the same device."""
    return _flip_mix_round(p, _crop_resize(p["box"], images, size), size)


def _flip_mix_round(p: dict[str, torch.Tensor], crops: torch.Tensor, size: int) -> torch.Tensor:
    """Flip, mix (in float32, on the unrounded crops) and round to uint8, in place on `crops`."""
    if len(p["flip"]):
        crops.index_copy_(0, p["flip"], crops.index_select(0, p["flip"]).flip(-1))
    # Mixed views read their partners' unmixed (flipped) crops: compute every mix first, then write.
    mixed = []
    if len(p["mixup"]):
        lam = p["mixup_lam"]
        own, partner = crops.index_select(0, p["mixup"]), crops.index_select(0, p["mixup_partner"])
        # lam * own + (1 - lam) * partner, in place on the copies: the same three roundings, fewer passes
        mixed.append((p["mixup"], own.mul_(lam).add_(partner.mul_(1.0 - lam))))
    if len(p["cut"]):
        own, partner = crops.index_select(0, p["cut"]), crops.index_select(0, p["cut_partner"])
        mixed.append((p["cut"], torch.where(_box_mask(p["cutbox"], size), partner, own)))
    for index, values in mixed:
        crops.index_copy_(0, index, values)
    return crops.round_().clamp_(0, 255).to(torch.uint8)


def render_views(params: dict[str, np.ndarray], decode: Callable[[int], np.ndarray], size: int,
                 group_size: int) -> torch.Tensor:
    """Decode each distinct image of the batch once, then render on the CPU."""
    return render_decoded(param_tensors(params, group_size), decode_batch(params, decode), size)


def _crop_resize(box: torch.Tensor, images: Decoded, size: int) -> torch.Tensor:
    """float32 [V, C, size, size]: each view's box (top, left, h, w in source pixels) cut from its
    image and resized by roi_align, one call per image shape."""
    top, left, h, w = box.unbind(1)
    s = images.scale
    # aligned=True: pixel centres at +0.5, so box [left, left + w) covers exactly w source pixels.
    rois = torch.stack([images.slot.to(torch.float32), left * s, top * s, (left + w) * s, (top + h) * s], dim=1)
    if len(images.stacks) == 1:
        return roi_align(images.stacks[0].float(), rois, output_size=(size, size), spatial_scale=1.0,
                         sampling_ratio=-1, aligned=True)
    first = images.stacks[0]
    out = torch.empty((len(box), first.shape[1], size, size), dtype=torch.float32, device=first.device)
    for stack, views in zip(images.stacks, images.members):
        out.index_copy_(0, views, roi_align(stack.float(), rois.index_select(0, views), output_size=(size, size),
                                            spatial_scale=1.0, sampling_ratio=-1, aligned=True))
    return out


def _box_mask(cutbox: torch.Tensor, size: int) -> torch.Tensor:
    """bool [V, 1, size, size]: inside each view's cutmix box (top, left, h, w in output pixels)."""
    ar = torch.arange(size, device=cutbox.device)
    rows = (ar >= cutbox[:, 0:1]) & (ar < (cutbox[:, 0] + cutbox[:, 2]).unsqueeze(1))
    cols = (ar >= cutbox[:, 1:2]) & (ar < (cutbox[:, 1] + cutbox[:, 3]).unsqueeze(1))
    return (rows[:, :, None] & cols[:, None, :]).unsqueeze(1)
