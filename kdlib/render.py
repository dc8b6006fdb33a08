"""Render: how view params and decoded images become pixels.

Precompute, train, verify and eval all render through this module (`render_pil` in a worker or on
a CPU, `render_decoded` on an accelerator), so for the same params and source bytes the teacher
and the student see identical uint8 tensors. It is split in two halves so that
each runs where it is cheapest:

- `decode_batch` (DataLoader workers, CPU): decode each distinct image of a batch once and
  stack same-shape images; nothing is resized here.
- `render_decoded` (wherever the tensors are: the accelerator in the main process, or the CPU):
  cut and resize every crop of the batch, flip, and mix, batched.

A renderer is named and recorded in the store (`meta.render.renderer`); a store is replayed
with the renderer that wrote it:

- `pil-bilinear-1` (new stores): Pillow's bilinear resample of the box (`Image.resize(...,
  box=...)`: a triangle filter widened when the crop is shrunk, fixed-point integer weights,
  horizontal pass then vertical, each rounded to uint8), then flip, MixUp in float32 on the
  uint8 crops (rounded once), CutMix as a paste. A DataLoader worker runs Pillow's own C code
  (`render_pil`, as cheap per view as torchvision's standard pipeline); an accelerator runs
  the same integer arithmetic as batched gathers (`_resample`), so CPU and CUDA pixels are
  bit-identical, not merely close.
- `roi_align-1` (stores written before it): torchvision's `roi_align` (bilinear, adaptive
  sampling) in float32, flip, mix on the unrounded crops, round once. CPU and CUDA differ by
  at most 1 LSB on a few pixels (measured on an H200: 699 of 38.5 M).

Each output pixel depends only on its own box and image, so batch composition, worker count
and thread count cannot change a view.

With the `pil-draft` decoder, a JPEG whose every box is shrunk at least 2x is decoded at
1/2, 1/4 or 1/8 scale in the DCT domain and its boxes are scaled to match (aligned=True keeps
pixel centres consistent). It changes pixels, so the decoder is recorded in the store too.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision.ops import roi_align

from .errors import StoreError
from .plan import MIX_CUTMIX, MIX_MIXUP, MIX_NONE
from .source import pil_image

__all__ = [
    "RENDERER",
    "RENDERERS",
    "check_renderer",
    "pillow_agrees",
    "pillow_renders",
    "DECODERS",
    "Decoded",
    "Draft",
    "decode_batch",
    "draft_scales",
    "param_tensors",
    "flip_mix",
    "render_decoded",
    "render_decoded_pil",
    "render_pil",
    "render_views",
]

RENDERERS = ("pil-bilinear-1", "roi_align-1")  # the crop-resize + mix arithmetic; a new id if it changes pixels
RENDERER = RENDERERS[0]  # what new stores are rendered with
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

    def _map(self, f: Callable[[torch.Tensor], torch.Tensor]) -> Decoded:
        return Decoded([f(s) for s in self.stacks], [f(m) for m in self.members], f(self.slot), f(self.scale))

    def to(self, device: torch.device, non_blocking: bool = False) -> Decoded:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> Decoded:  # DataLoader(pin_memory=True) calls this on custom types
        return self._map(torch.Tensor.pin_memory)


Draft = Callable[[int, int], tuple[np.ndarray, int]]  # (id, scale asked) -> (pixels, scale applied)


def check_renderer(name: str) -> str:
    """`name` if this kdlib knows the renderer, else a StoreError saying to upgrade."""
    if name not in RENDERERS:
        raise StoreError(
            f"renderer {name!r} is unknown to this kdlib (it knows {list(RENDERERS)}): the store was "
            "written by another version; upgrade kdlib to replay it"
        )
    return name


def draft_scales(params: dict[str, np.ndarray], size: int) -> dict[int, int]:
    """image id -> DCT downscale (2, 4 or 8) allowed for it: every box cut from that image in this
    batch is shrunk by at least that factor, so nothing finer than the decoded grid is ever sampled."""
    ids = params["image"].astype(np.int64)
    shrink = np.minimum(params["box"][:, 2], params["box"][:, 3]).astype(np.float64) / size
    least: dict[int, float] = {}
    for i, s in zip(ids.tolist(), shrink.tolist()):
        least[i] = min(least.get(i, s), s)
    return {i: next(d for d in _DRAFT_SCALES if s >= d) for i, s in least.items() if s >= 2}


def decode_batch(
    params: dict[str, np.ndarray],
    decode: Callable[[int], np.ndarray],
    size: int | None = None,
    draft: Draft | None = None,
) -> Decoded:
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
    return Decoded(
        [torch.from_numpy(np.stack(b)) for b in buckets.values()],
        [torch.from_numpy(np.flatnonzero(stack_of == b)) for b in range(len(buckets))],
        torch.tensor([where[i][1] for i in ids], dtype=torch.int64),
        torch.tensor([where[i][2] for i in ids], dtype=torch.float32),
    )


def param_tensors(
    params: dict[str, np.ndarray],
    images: Decoded,
    size: int,
    group_size: int,
    renderer: str = RENDERER,
    taps: bool = True,
) -> dict[str, torch.Tensor]:
    """What `render_decoded` needs besides the images, as CPU tensors made on the host: the boxes,
    the index lists of flipped / mixed views (so rendering on a device never waits on a boolean
    mask) and, for `pil-bilinear-1`, the resample taps of each view's decoded image (`taps=False`
    when Pillow will render instead)."""
    out = _mix_tensors(params, group_size)
    if renderer != "roi_align-1" and taps:
        out.update(resample_taps(params, images, size))
    return out


def _mix_tensors(params: dict[str, np.ndarray], group_size: int) -> dict[str, torch.Tensor]:
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
        "mixup": torch.from_numpy(mixup),
        "mixup_partner": torch.from_numpy(partner[mixup]),
        "mixup_lam": torch.from_numpy(params["lam"][mixup].astype(np.float32)).view(-1, 1, 1, 1),
        "cut": torch.from_numpy(cut),
        "cut_partner": torch.from_numpy(partner[cut]),
        "cutbox": torch.from_numpy(params["cutbox"][cut].astype(np.int64)),
    }


def render_decoded(p: dict[str, torch.Tensor], images: Decoded, size: int, renderer: str = RENDERER) -> torch.Tensor:
    """Views as uint8 [V, C, size, size] on the device of `images` (the device half of rendering).

    `p` comes from `param_tensors` with the same renderer, on the same device."""
    if renderer == "roi_align-1":
        return _flip_mix_round(p, _crop_resize(p["box"], images, size), size)
    return flip_mix(p, _resample(p, images, size), size)


def flip_mix(p: dict[str, torch.Tensor], crops: torch.Tensor, size: int) -> torch.Tensor:
    """Flip, then mix: the one implementation of both, for every renderer and place, in place on `crops`.

    Mixed views read their partners' unmixed (flipped) crops. MixUp is computed in float32 on the crops
    as the renderer made them (unrounded floats for roi_align-1, uint8 values for pil-bilinear-1) and,
    for uint8 crops, rounded once back into them; CutMix pastes the partner's pixels."""
    if len(p["flip"]):
        crops.index_copy_(0, p["flip"], crops.index_select(0, p["flip"]).flip(-1))
    mixed = []  # every mix is computed before any is written
    if len(p["mixup"]):
        lam = p["mixup_lam"]
        own, partner = crops.index_select(0, p["mixup"]).float(), crops.index_select(0, p["mixup_partner"]).float()
        # lam * own + (1 - lam) * partner, in place on the copies: the same three roundings, fewer passes
        m = own.mul_(lam).add_(partner.mul_(1.0 - lam))
        mixed.append((p["mixup"], m if crops.is_floating_point() else m.round_().to(crops.dtype)))
    if len(p["cut"]):
        own, partner = crops.index_select(0, p["cut"]), crops.index_select(0, p["cut_partner"])
        mixed.append((p["cut"], torch.where(_box_mask(p["cutbox"], size), partner, own)))
    for index, values in mixed:
        crops.index_copy_(0, index, values)
    return crops


def _flip_mix_round(p: dict[str, torch.Tensor], crops: torch.Tensor, size: int) -> torch.Tensor:
    """roi_align-1: flip and mix the unrounded float crops, then round once to uint8."""
    return flip_mix(p, crops, size).round_().clamp_(0, 255).to(torch.uint8)


def render_views(
    params: dict[str, np.ndarray],
    decode: Callable[[int], np.ndarray],
    size: int,
    group_size: int,
    renderer: str = RENDERER,
) -> torch.Tensor:
    """Decode each distinct image of the batch once, then render on the CPU."""
    images = decode_batch(params, decode)
    return render_decoded(param_tensors(params, images, size, group_size, renderer), images, size, renderer)


def _crop_resize(box: torch.Tensor, images: Decoded, size: int) -> torch.Tensor:
    """float32 [V, C, size, size]: each view's box (top, left, h, w in source pixels) cut from its
    image and resized by roi_align, one call per image shape."""
    top, left, h, w = box.unbind(1)
    s = images.scale
    # aligned=True: pixel centres at +0.5, so box [left, left + w) covers exactly w source pixels.
    rois = torch.stack([images.slot.to(torch.float32), left * s, top * s, (left + w) * s, (top + h) * s], dim=1)
    if len(images.stacks) == 1:
        return roi_align(
            images.stacks[0].float(), rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True
        )
    first = images.stacks[0]
    out = torch.empty((len(box), first.shape[1], size, size), dtype=torch.float32, device=first.device)
    for stack, views in zip(images.stacks, images.members):
        out.index_copy_(
            0,
            views,
            roi_align(
                stack.float(),
                rois.index_select(0, views),
                output_size=(size, size),
                spatial_scale=1.0,
                sampling_ratio=-1,
                aligned=True,
            ),
        )
    return out


def _box_mask(cutbox: torch.Tensor, size: int) -> torch.Tensor:
    """bool [V, 1, size, size]: inside each view's cutmix box (top, left, h, w in output pixels)."""
    ar = torch.arange(size, device=cutbox.device)
    rows = (ar >= cutbox[:, 0:1]) & (ar < (cutbox[:, 0] + cutbox[:, 2]).unsqueeze(1))
    cols = (ar >= cutbox[:, 1:2]) & (ar < (cutbox[:, 1] + cutbox[:, 3]).unsqueeze(1))
    return (rows[:, :, None] & cols[:, None, :]).unsqueeze(1)


# --- pil-bilinear-1 -------------------------------------------------------------------------------

_BITS = 22  # Pillow's PRECISION_BITS for 8-bit images: weights in fixed point with 22 fraction bits


def _axis_taps(
    length: np.ndarray, lo: np.ndarray, hi: np.ndarray, out: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pillow's bilinear coefficients (`precompute_coeffs` + `normalize_coeffs_8bpc` in Resample.c)
    for resampling [lo, hi) of an axis of `length` pixels onto `out` pixels, for every view at once.

    Returns the source pixels [first, stop) each output pixel reads (int64 [V, out] each), the
    source pixel of each tap (int64 [V, out, K], clamped into the image where the weight is 0) and
    the integer weights (int32 [V, out, K]). Same float64 operations in the same order as Pillow,
    so the same integers."""
    scale = (hi - lo).astype(np.float64) / out  # Pillow: (double)(in1 - in0) with float in0, in1
    filterscale = np.maximum(scale, 1.0)
    support = filterscale  # the bilinear filter's support is 1, widened by the shrink factor
    k = int(np.ceil(support.max())) * 2 + 1
    center = lo.astype(np.float64)[:, None] + (np.arange(out) + 0.5) * scale[:, None]
    first = np.maximum(np.trunc(center - support[:, None] + 0.5), 0.0)
    count = np.minimum(np.trunc(center + support[:, None] + 0.5), length[:, None].astype(np.float64)) - first
    x = first[..., None] + np.arange(k)
    w = np.maximum(1.0 - np.abs((x - center[..., None] + 0.5) * (1.0 / filterscale)[:, None, None]), 0.0)
    w[np.arange(k) >= count[..., None]] = 0.0
    total = np.zeros_like(center)
    for j in range(k):  # summed in Pillow's order: the normalised weights depend on it
        total += w[..., j]
    w = np.where(total[..., None] != 0.0, w / np.where(total == 0.0, 1.0, total)[..., None], w)
    weight = np.trunc(0.5 + w * (1 << _BITS)).astype(np.int32)
    index = np.minimum(x, (length - 1)[:, None, None]).astype(np.int64)
    return first.astype(np.int64), (first + count).astype(np.int64), index, weight


def _source_boxes(box: np.ndarray, scale: np.ndarray) -> tuple[np.ndarray, ...]:
    """(x0, y0, x1, y1) float32 in decoded pixels: the box Pillow is given (it keeps C floats)."""
    top, left, h, w = (box[:, j].astype(np.float32) for j in range(4))
    s = scale.astype(np.float32)
    return left * s, top * s, (left + w) * s, (top + h) * s


def resample_taps(params: dict[str, np.ndarray], images: Decoded, size: int) -> dict[str, torch.Tensor]:
    """The integer taps of `pil-bilinear-1` for every view of a batch, made on the host where the
    images were decoded.

    The resample is Pillow's bilinear `resize` done as two single-axis calls, each rounded to
    uint8: the band of source rows the box needs (`_band`) resized horizontally, then that band
    resized vertically with the box shifted into it. `rows` [V, R] are the band's source rows,
    `hidx`/`hw` [V, size, Kx] the horizontal taps, `vidx`/`vw` [V, size, Ky] the vertical taps
    within the band."""
    v = len(params["image"])
    dims = np.empty((v, 2), np.int64)  # each view's decoded (height, width)
    for stack, members in zip(images.stacks, images.members):
        dims[members.numpy()] = stack.shape[2:]
    x0, y0, x1, y1 = _source_boxes(params["box"], images.scale.numpy())
    first, last = _band(dims[:, 0], y0, y1, size)
    _, _, hidx, hweight = _axis_taps(dims[:, 1], x0, x1, size)
    _, _, vidx, vweight = _axis_taps(last - first, y0 - first.astype(np.float32), y1 - first.astype(np.float32), size)
    span = int((last - first).max()) if v else 1
    rows = np.minimum(first[:, None] + np.arange(span), (dims[:, 0] - 1)[:, None])
    return {
        "rows": torch.from_numpy(rows),
        "hidx": torch.from_numpy(hidx),
        "hw": torch.from_numpy(hweight),
        "vidx": torch.from_numpy(vidx),
        "vw": torch.from_numpy(vweight),
    }


def _band(height: np.ndarray, y0: np.ndarray, y1: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """[first, last) source rows that resampling [y0, y1) onto `size` rows reads (Pillow's ybox)."""
    first, stop, _, _ = _axis_taps(height, y0, y1, size)
    return first[:, 0], stop[:, -1]


_TAPS = ("rows", "hidx", "hw", "vidx", "vw")


def _resample(p: dict[str, torch.Tensor], images: Decoded, size: int) -> torch.Tensor:
    """uint8 [V, C, size, size]: the two integer passes of every view, as batched gathers on the
    device of `images` (exact integer arithmetic: the same bytes on a CPU and a GPU)."""
    if len(images.stacks) == 1:
        return _resample_stack(images.stacks[0], images.slot, *(p[t] for t in _TAPS))
    first = images.stacks[0]
    out = torch.empty((len(images.slot), first.shape[1], size, size), dtype=torch.uint8, device=first.device)
    for stack, views in zip(images.stacks, images.members):
        out.index_copy_(
            0,
            views,
            _resample_stack(stack, images.slot.index_select(0, views), *(p[t].index_select(0, views) for t in _TAPS)),
        )
    return out


def _resample_stack(
    stack: torch.Tensor,
    slot: torch.Tensor,
    rows: torch.Tensor,
    hidx: torch.Tensor,
    hw: torch.Tensor,
    vidx: torch.Tensor,
    vw: torch.Tensor,
) -> torch.Tensor:
    c = stack.shape[1]
    v, r, s = len(slot), rows.shape[1], hidx.shape[1]
    half = 1 << (_BITS - 1)
    band = stack[slot[:, None], :, rows].permute(0, 2, 1, 3)  # [V, C, R, W]: only the rows each view reads
    acc = torch.full((v, c, r, s), half, dtype=torch.int32, device=stack.device)
    for j in range(hidx.shape[2]):
        acc += band.gather(3, hidx[:, None, None, :, j].expand(v, c, r, s)).int() * hw[:, None, None, :, j]
    mid = (acc >> _BITS).clamp_(0, 255)  # each pass is rounded to uint8, as Pillow stores it
    acc = torch.full((v, c, s, s), half, dtype=torch.int32, device=stack.device)
    for j in range(vidx.shape[2]):
        acc += mid.gather(2, vidx[:, None, :, j, None].expand(v, c, s, s)) * vw[:, None, :, j, None]
    return (acc >> _BITS).clamp_(0, 255).to(torch.uint8)


ImageDecode = Callable[[int, int], tuple[Image.Image, int]]  # (id, draft scale asked) -> (image, scale applied)


def render_pil(
    params: dict[str, np.ndarray], image: ImageDecode, size: int, group_size: int, draft: bool = False
) -> torch.Tensor:
    """`pil-bilinear-1` on the CPU, view by view with Pillow's C resample: what a DataLoader worker
    runs. uint8 [V, C, size, size], identical to `render_decoded(..., "pil-bilinear-1")`."""
    v = len(params["image"])
    if v % group_size:
        raise ValueError(f"render needs whole groups: {v} views, group size {group_size}")
    ids = params["image"].astype(np.int64).tolist()
    drafts = draft_scales(params, size) if draft else {}
    decoded = {i: image(i, drafts.get(i, 1)) for i in dict.fromkeys(ids)}
    scale = np.array([1.0 / decoded[i][1] for i in ids], np.float32)
    x0, y0, x1, y1 = _source_boxes(params["box"], scale)
    heights = np.array([decoded[i][0].height for i in ids], np.int64)
    first, last = _band(heights, y0, y1, size)
    top, bottom = y0 - first.astype(np.float32), y1 - first.astype(np.float32)
    channels = len(decoded[ids[0]][0].getbands())
    out = np.empty((v, channels, size, size), np.uint8)
    bilinear = Image.Resampling.BILINEAR
    for j, i in enumerate(ids):
        im, a, b = decoded[i][0], int(first[j]), int(last[j])
        # One axis per call, so that Pillow cannot reorder the passes (its versions differ there).
        band = im.crop((0, a, im.width, b)).resize(
            (size, b - a), bilinear, box=(float(x0[j]), 0.0, float(x1[j]), b - a)
        )
        crop = band.resize((size, size), bilinear, box=(0.0, float(top[j]), size, float(bottom[j])))
        out[j] = np.asarray(crop).reshape(size, size, channels).transpose(2, 0, 1)  # HWC -> CHW while in cache
    return flip_mix(_mix_tensors(params, group_size), torch.from_numpy(out), size)


def render_decoded_pil(
    params: dict[str, np.ndarray], images: Decoded, size: int, group_size: int, draft: bool = False
) -> torch.Tensor:
    """`render_pil` over images already decoded on the CPU (the main process rendering on a CPU
    device): the same Pillow calls on the same pixels as a worker makes."""
    stack_of = np.empty(len(images.slot), np.int64)
    for b, members in enumerate(images.members):
        stack_of[members.numpy()] = b
    view_of = {i: v for v, i in reversed(list(enumerate(params["image"].astype(np.int64).tolist())))}

    def image(i: int, scale: int) -> tuple[Image.Image, int]:  # decode_batch applied the same draft scale
        v = view_of[i]
        pixels = images.stacks[stack_of[v]][images.slot[v]].numpy()
        return pil_image(pixels), round(1.0 / float(images.scale[v]))

    return render_pil(params, image, size, group_size, draft)


def pillow_renders(renderer: str) -> bool:
    """Whether Pillow's C code can render `renderer` here (the fast CPU path)."""
    return renderer == "pil-bilinear-1" and pillow_agrees()


@functools.cache
def pillow_agrees() -> bool:
    """Whether this process's Pillow computes `pil-bilinear-1` exactly, checked once on a probe
    batch against kdlib's own integer implementation. Pillow's resample arithmetic has been stable
    for years, but a build that rounds differently must not change a store's pixels: if it
    disagrees, the CPU renders with `_resample` instead (slower, same bytes) and says so once."""
    rng = np.random.default_rng(0)
    n, size, agree = 12, 29, True
    for img in (rng.integers(0, 256, (3, 61, 97), dtype=np.uint8), rng.integers(0, 256, (1, 83, 45), dtype=np.uint8)):
        hw = np.array(img.shape[1:], np.float64)
        h, w = hw[0] * rng.uniform(0.05, 1, n), hw[1] * rng.uniform(0.05, 1, n)  # shrunk and enlarged
        box = np.stack([rng.uniform(0, hw[0] - h), rng.uniform(0, hw[1] - w), h, w], 1).astype(np.float32)
        box[::3] = np.floor(box[::3]).clip(min=1)  # whole-pixel boxes too
        v = np.arange(n)
        params = {
            "image": np.zeros(n, np.int64),
            "box": box,
            "flip": v % 3 == 0,
            "partner": (v + 1) % 2,
            "mix": np.where(v % 4 == 1, MIX_MIXUP, np.where(v % 4 == 2, MIX_CUTMIX, MIX_NONE)),
            "lam": rng.uniform(0, 1, n).astype(np.float32),
            "cutbox": np.tile([3, 5, 11, 13], (n, 1)),
        }
        pil = render_pil(params, lambda i, s, img=img: (pil_image(img), 1), size, 2)
        agree &= torch.equal(pil, render_views(params, lambda i, img=img: img, size, 2))
    if not agree:
        import PIL

        warnings.warn(
            f"Pillow {PIL.__version__} resamples differently from kdlib's renderer pil-bilinear-1; "
            "rendering with kdlib's own implementation on the CPU (same pixels, slower)",
            stacklevel=2,
        )
    return agree
