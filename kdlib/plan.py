"""The plan: every random choice of one epoch, drawn once, as arrays of view params.

`make_plan(recipe, sizes, epoch)` is a pure function. Its order *is* the training order:
views come in groups of m images x c crops (slot s = i*c + j is crop j of image i), and
each slot mixes with slot (s + c) mod g, i.e. the same crop of the next image in the group
(recipe `partner: reverse`: slot g - 1 - s, m even), which is never the same image. Mixing
draws are made per view, or once per group (`mix_share: group`). All draws come from generators keyed by
`SeedSequence([seed, epoch, stream])` (never `seed + epoch`), one stream per kind of
choice, so changing the mix law does not move the crops.

View params (one row per view, the columns the store keeps):

| field   | dtype   | shape | meaning |
| ------- | ------- | ----- | ------- |
| image   | uint32  | []    | source id |
| box     | int32   | [4]   | crop in source pixels: top, left, height, width |
| flip    | uint8   | []    | 1 = horizontal flip after the crop |
| partner | uint16  | []    | slot (within the group) this view mixes with |
| mix     | uint8   | []    | 0 none, 1 mixup, 2 cutmix |
| lam     | float32 | []    | weight of the view's own pixels (cutmix: its kept area fraction) |
| cutbox  | int16   | [4]   | cutmix box in output pixels: top, left, height, width (zeros otherwise) |
"""

from __future__ import annotations

import numpy as np

from .recipe import Recipe

__all__ = [
    "PARAM_FIELDS",
    "PACKED_FIELDS",
    "PACKINGS",
    "param_fields",
    "pack_params",
    "unpack_params",
    "MIX_NONE",
    "MIX_MIXUP",
    "MIX_CUTMIX",
    "make_plan",
    "center_params",
    "views_per_epoch",
    "slice_params",
]

PARAM_FIELDS: dict[str, tuple[str, tuple[int, ...]]] = {
    "image": ("uint32", ()),
    "box": ("int32", (4,)),
    "flip": ("uint8", ()),
    "partner": ("uint16", ()),
    "mix": ("uint8", ()),
    "lam": ("float32", ()),
    "cutbox": ("int16", (4,)),
}
# `--params packed`: the same params in fewer bytes (24 -> 16 B/view): boxes as uint16, cutmix boxes
# and partner slots as uint8, lambda on a 1/65535 grid as uint16. The plan is quantized *before*
# anything is rendered, so the packed value is the truth for both stages and costs no consistency.
PACKED_FIELDS: dict[str, tuple[str, tuple[int, ...]]] = {
    "image": ("uint32", ()),
    "box": ("uint16", (4,)),
    "flip": ("uint8", ()),
    "partner": ("uint8", ()),
    "mix": ("uint8", ()),
    "lam": ("uint16", ()),
    "cutbox": ("uint8", (4,)),
}
PACKINGS = ("none", "packed")
LAM_STEPS = 65535
MIX_NONE, MIX_MIXUP, MIX_CUTMIX = 0, 1, 2
_STREAM_ORDER, _STREAM_CROP, _STREAM_FLIP, _STREAM_MIX = 0, 1, 2, 3
_CROP_TRIES = 10  # torchvision's RandomResizedCrop tries 10 times, then falls back to a center crop
# TF's sample_distorted_bounding_box (tensorflow/core/kernels/image/sample_distorted_bounding_box_op.cc):
# max_attempts defaults to 100 (ops/image_ops.cc), which FunMatch's TF2 port and big_vision keep.
_TF_ATTEMPTS = 100
_TF_FIRST = 8  # attempts worked out for every view; the rest only for views whose first ones all failed
_TF_BLOCK = 16384  # views per block of draws: bounds memory at 100 attempts per view


def _rng(seed: int, epoch: int, stream: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, stream])))


def views_per_epoch(recipe: Recipe, num_images: int) -> int:
    """Whole groups only: the last num_images % m images of each shuffled epoch are left out."""
    return (num_images // recipe.images_per_group) * recipe.group_size


def make_plan(recipe: Recipe, sizes: np.ndarray, epoch: int) -> dict[str, np.ndarray]:
    """Draw all view params of `epoch` for a source whose image sizes are `sizes` [N, 2] (h, w)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    n = len(sizes)
    m, c, g = recipe.images_per_group, recipe.crops_per_image, recipe.group_size
    groups = n // m
    if groups == 0:
        raise ValueError(f"source has {n} images, fewer than one group of {m} (recipe {recipe.name!r})")
    order = _rng(recipe.seed, epoch, _STREAM_ORDER).permutation(n)[: groups * m]
    image = np.repeat(order, c).astype(np.uint32)  # slot i*c + j is crop j of image i
    v = len(image)
    hw = sizes[image]

    if recipe.crop == "inception":
        box = _inception_boxes(_rng(recipe.seed, epoch, _STREAM_CROP), hw, recipe.scale, recipe.ratio)
    elif recipe.crop == "inception_tf":
        box = _tf_boxes(
            _rng(recipe.seed, epoch, _STREAM_CROP), hw, recipe.scale, recipe.ratio, recipe.min_object_covered
        )
    else:
        box = _center_boxes(hw, recipe.center_fraction)

    flip = np.zeros(v, np.uint8)
    if recipe.flip:
        flip = (_rng(recipe.seed, epoch, _STREAM_FLIP).random(v) < 0.5).astype(np.uint8)

    slot = np.arange(v) % g
    partner = ((g - 1 - slot) if recipe.partner == "reverse" else (slot + c) % g).astype(np.uint16)
    mix, lam, cutbox = _draw_mix(_rng(recipe.seed, epoch, _STREAM_MIX), recipe, v)
    if g == 1:
        partner[:] = 0
    return {"image": image, "box": box, "flip": flip, "partner": partner, "mix": mix, "lam": lam, "cutbox": cutbox}


def center_params(sizes: np.ndarray, ids: np.ndarray, fraction: float = 1.0) -> dict[str, np.ndarray]:
    """Unmixed, unflipped square center views of `ids` (eval and the teacher's test predictions)."""
    ids = np.asarray(ids)
    v = len(ids)
    return {
        "image": ids.astype(np.uint32),
        "box": _center_boxes(np.asarray(sizes, np.int64)[ids], fraction),
        "flip": np.zeros(v, np.uint8),
        "partner": np.zeros(v, np.uint16),
        "mix": np.zeros(v, np.uint8),
        "lam": np.ones(v, np.float32),
        "cutbox": np.zeros((v, 4), np.int16),
    }


def param_fields(packing: str = "none") -> dict[str, tuple[str, tuple[int, ...]]]:
    """The view-param columns (name -> dtype, trailing shape) of a packing."""
    return PACKED_FIELDS if packing == "packed" else PARAM_FIELDS


def pack_params(params: dict[str, np.ndarray], packing: str) -> dict[str, np.ndarray]:
    """Params in the store's dtypes; raises ValueError naming a value that does not fit."""
    if packing == "none":
        return params
    out = dict(params)
    for name, limit in (("box", 65535), ("cutbox", 255), ("partner", 255)):
        if params[name].size and int(params[name].max()) > limit:
            raise ValueError(
                f"--params packed: {name} value {int(params[name].max())} exceeds {limit}; use --params none"
            )
        out[name] = params[name].astype(PACKED_FIELDS[name][0])
    out["lam"] = np.rint(params["lam"].astype(np.float64) * LAM_STEPS).astype(np.uint16)
    return out


def unpack_params(params: dict[str, np.ndarray], packing: str) -> dict[str, np.ndarray]:
    """Packed params back in the plan's dtypes (exactly what render was given at precompute)."""
    if packing == "none" or "lam" not in params:  # (test predictions carry no params)
        return params
    out = dict(params)
    for name in ("box", "cutbox", "partner"):
        out[name] = params[name].astype(PARAM_FIELDS[name][0])
    out["lam"] = (params["lam"].astype(np.float64) / LAM_STEPS).astype(np.float32)
    return out


def slice_params(params: dict[str, np.ndarray], start: int, stop: int) -> dict[str, np.ndarray]:
    """The view params of views [start, stop)."""
    return {k: a[start:stop] for k, a in params.items() if k in PARAM_FIELDS}


def _inception_boxes(
    rng: np.random.Generator, hw: np.ndarray, scale: tuple[float, float], ratio: tuple[float, float]
) -> np.ndarray:
    """torchvision's RandomResizedCrop.get_params, vectorised over views."""
    v = len(hw)
    h_img, w_img = hw[:, 0:1].astype(np.float64), hw[:, 1:2].astype(np.float64)
    area = h_img * w_img
    target = area * rng.uniform(scale[0], scale[1], size=(v, _CROP_TRIES))
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]), size=(v, _CROP_TRIES)))
    w = np.rint(np.sqrt(target * aspect))
    h = np.rint(np.sqrt(target / aspect))
    ok = (w > 0) & (h > 0) & (w <= w_img) & (h <= h_img)
    first = np.argmax(ok, axis=1)
    rows = np.arange(v)
    h, w = h[rows, first], w[rows, first]
    u_top, u_left = rng.random(v), rng.random(v)  # drawn for every view so draws never depend on `ok`
    top = np.floor(u_top * (h_img[:, 0] - h + 1))
    left = np.floor(u_left * (w_img[:, 0] - w + 1))
    box = np.stack([top, left, h, w], axis=1)

    # Fallback (no try fitted): a center crop with the aspect ratio clamped to the range.
    fallback = ~ok.any(axis=1)
    if fallback.any():
        hi, wi = h_img[fallback, 0], w_img[fallback, 0]
        in_ratio = wi / hi
        fw = np.where(in_ratio < ratio[0], wi, np.where(in_ratio > ratio[1], np.rint(hi * ratio[1]), wi))
        fh = np.where(in_ratio < ratio[0], np.rint(wi / ratio[0]), hi)
        box[fallback] = np.stack([(hi - fh) // 2, (wi - fw) // 2, fh, fw], axis=1)
    return box.astype(np.int32)


def _tf_boxes(
    rng: np.random.Generator,
    hw: np.ndarray,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    min_object_covered: float,
) -> np.ndarray:
    """TF's `sample_distorted_bounding_box` with no boxes given (the whole image is the object), vectorised
    over views: the law of FunMatch's TF2 port (`crop_resize.py`: min_object_covered 0.1, aspect (3/4, 4/3),
    area (0.05, 1)) and big_vision's `inception_crop` (min_object_covered 0, TF's aspect (0.75, 1.33)).
    Each view has 100 attempts and the first that passes wins; none passing gives the whole image. Every
    attempt's draws are made whether it is needed or not, so a view's box never depends on another's."""
    v = len(hw)
    box = np.empty((v, 4), np.int64)
    for a in range(0, v, _TF_BLOCK):
        b = min(a + _TF_BLOCK, v)
        u_aspect = rng.random((b - a, _TF_ATTEMPTS), dtype=np.float32)  # TF's RandFloat is float32
        u_height = rng.random((b - a, _TF_ATTEMPTS))
        u_offset = rng.random((b - a, 2))
        h_img, w_img = hw[a:b, 0], hw[a:b, 1]
        ok, h, w = _tf_attempts(
            h_img, w_img, u_aspect[:, :_TF_FIRST], u_height[:, :_TF_FIRST], scale, ratio, min_object_covered
        )
        late = np.flatnonzero(~ok.any(axis=1))  # rare: all first attempts failed; work out all 100 for these
        if len(late):
            late_ok, late_h, late_w = _tf_attempts(
                h_img[late], w_img[late], u_aspect[late], u_height[late], scale, ratio, min_object_covered
            )
            ok, h, w = (np.pad(x, ((0, 0), (0, _TF_ATTEMPTS - _TF_FIRST))) for x in (ok, h, w))
            ok[late], h[late], w[late] = late_ok, late_h, late_w
        first = np.argmax(ok, axis=1)
        rows = np.arange(b - a)
        found = ok[rows, first]
        h = np.where(found, h[rows, first], h_img).astype(np.int64)  # none passed: the whole image
        w = np.where(found, w[rows, first], w_img).astype(np.int64)
        # Uniform(H - h) draws in [0, H - h): a crop touches the bottom/right edge only when it spans the image
        top = np.floor(u_offset[:, 0] * (h_img - h)).astype(np.int64)
        left = np.floor(u_offset[:, 1] * (w_img - w)).astype(np.int64)
        box[a:b] = np.stack([top, left, h, w], axis=1)
    return box.astype(np.int32)


def _tf_attempts(
    h_img: np.ndarray,
    w_img: np.ndarray,
    u_aspect: np.ndarray,
    u_height: np.ndarray,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    min_object_covered: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GenerateRandomCrop + SatisfiesOverlapConstraints for attempts [V, A]: (passed, height, width).
    float32 where the kernel computes in float (lrintf = np.rint on float32, both round half to even)."""
    f32 = np.float32
    hf, wf = h_img[:, None].astype(f32), w_img[:, None].astype(f32)
    lo_r, hi_r = f32(ratio[0]), f32(ratio[1])
    aspect = u_aspect * (hi_r - lo_r) + lo_r
    min_area = f32(scale[0]) * wf * hf  # float * int * int, as the kernel's expression evaluates
    max_area = f32(scale[1]) * wf * hf
    height = np.rint(np.sqrt(min_area / aspect))
    max_h = np.rint(np.sqrt(max_area / aspect))
    # the widest height whose rounded width still fits: (W + 0.5 - 1e-7) / aspect in double, truncated
    cap = np.floor((w_img[:, None] + 0.5 - np.float64(f32(1e-7))) / aspect.astype(np.float64)).astype(f32)
    cap = np.where(np.rint(cap * aspect) > wf, cap - 1, cap)
    max_h = np.where(np.rint(max_h * aspect) > wf, cap, max_h)
    max_h = np.minimum(max_h, hf)
    height = np.minimum(height, max_h)
    # height += Uniform(max_h - height + 1), an integer uniform in [0, max_h - height] (0 when equal)
    height = height + np.floor(u_height * (max_h - height + 1).astype(np.float64)).astype(f32)
    width = np.rint(height * aspect)
    area = width * height
    small = area < min_area  # rounding left it too small: one row taller
    height = np.where(small, height + 1, height)
    width = np.where(small, np.rint(height * aspect), width)
    area = np.where(small, width * height, area)
    big = area > max_area  # too big: one row shorter
    height = np.where(big, height - 1, height)
    width = np.where(big, np.rint(height * aspect), width)
    area = np.where(big, width * height, area)
    ok = (area >= min_area) & (area <= max_area) & (width <= wf) & (height <= hf) & (width > 0) & (height > 0)
    # SatisfiesOverlapConstraints with the whole image as the one object: crop area / image area
    ok &= (area >= 1) & (area / (wf * hf) >= f32(min_object_covered))
    return ok, height, width


def _center_boxes(hw: np.ndarray, fraction: float) -> np.ndarray:
    side = np.maximum(1, np.rint(np.minimum(hw[:, 0], hw[:, 1]) * fraction)).astype(np.int64)
    top = (hw[:, 0] - side) // 2
    left = (hw[:, 1] - side) // 2
    return np.stack([top, left, side, side], axis=1).astype(np.int32)


def _draw_lambda(rng: np.random.Generator, law: str, alpha: float, v: int) -> np.ndarray:
    if law == "uniform":
        return rng.random(v)
    a = rng.beta(alpha, alpha, size=v)
    return np.maximum(a, 1 - a) if law == "maxbeta" else a


def _draw_mix(rng: np.random.Generator, recipe: Recipe, v: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mix = np.zeros(v, np.uint8)
    lam = np.ones(v, np.float32)
    cutbox = np.zeros((v, 4), np.int16)
    if recipe.mix == "none":
        return mix, lam, cutbox
    # Every draw is made for every view (then masked), so the stream never depends on earlier outcomes.
    # mix_share=group: one draw per group (mixed or not, kind, lambda, CutMix box), repeated over its views.
    g = recipe.group_size if recipe.mix_share == "group" else 1
    n = v // g
    cutbox = cutbox[:n]
    mixed = rng.random(n) < recipe.mix_prob
    kind = {
        "mixup": np.full(n, MIX_MIXUP),
        "cutmix": np.full(n, MIX_CUTMIX),
        "both": np.where(rng.random(n) < 0.5, MIX_MIXUP, MIX_CUTMIX),
    }[recipe.mix]
    mix = np.where(mixed, kind, MIX_NONE).astype(np.uint8)
    draw = _draw_lambda(rng, recipe.lam, recipe.alpha, n)

    # CutMix box (timm's rand_bbox): side sqrt(1 - lambda) of the output, center uniform, clipped.
    s = recipe.size
    cut = np.rint(s * np.sqrt(1.0 - draw))
    cy, cx = rng.integers(0, s, size=n), rng.integers(0, s, size=n)
    y0, y1 = np.clip(cy - cut // 2, 0, s), np.clip(cy + cut // 2, 0, s)
    x0, x1 = np.clip(cx - cut // 2, 0, s), np.clip(cx + cut // 2, 0, s)
    is_cut = mix == MIX_CUTMIX
    cutbox[is_cut] = np.stack([y0, x0, y1 - y0, x1 - x0], axis=1)[is_cut].astype(np.int16)
    cut_lam = 1.0 - (cutbox[:, 2].astype(np.float64) * cutbox[:, 3]) / (s * s)  # the area actually kept
    lam = np.where(mix == MIX_MIXUP, draw, np.where(is_cut, cut_lam, 1.0)).astype(np.float32)
    if g > 1:
        mix, lam, cutbox = (np.repeat(x, g, axis=0) for x in (mix, lam, cutbox))
    return mix, lam, cutbox
