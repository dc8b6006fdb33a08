"""Verify: re-render stored views, re-run the teacher, and compare with what the store says.

Two checks, both reported:

- pixels: the store keeps a few views as its renderer made them (`meta.render.pixels`); they are
  rendered again here and compared. With the `pil-bilinear-1` renderer (integer arithmetic) they
  must be identical on any device. With `roi_align-1` they must be identical on the same kind of
  device; on another kind (a store written on a GPU, checked on a CPU, or the other way) they may
  differ by 1 LSB on a small share of pixels (measured on an H200: 0.002 %), never more.
  Version-1 stores have no pixel sample: only the logits are checked.
- logits: the teacher runs on the replayed views in the store's precision. On the machine that
  wrote the store, agreement must be total and the logit error within the storage rounding of the
  logit codec (fp16, or q8's 1/32 nat) plus the precision's own noise (invariant 3).

Views are whole groups spread evenly over every stored epoch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .errors import ConfigError, StoreMismatchError
from .feed import Feed
from .runtime import process_state
from .store import ChunkCache, Store, open_store, open_store_source
from .store.codecs import TeacherOutput, Tolerance, active_codecs
from .teacher import load_teacher
from .views import Batch, FixedParams, ViewBatches, split_range

__all__ = ["verify", "pixel_parity", "FP16_RTOL", "CROSS_DEVICE_PIXELS"]

FP16_RTOL = 2.0**-11  # half an fp16 ulp, relative: the rounding of stored logits
# Plus the difference between two teacher runs of the same views (batch composition picks other kernels):
ABS_TOL = {"fp32": 2e-3, "tf32": 5e-2, "bf16": 1e-1}
REL_TOL = {"fp32": 0.0, "tf32": 2.0**-9, "bf16": 2.0**-6}
CROSS_DEVICE_ABS_TOL = 5e-2  # another device kind: other kernels and a few pixels 1 LSB apart
CROSS_DEVICE_PIXELS = 1e-3  # share of pixels allowed to differ (by at most 1) across device kinds


def pixel_parity(stored: np.ndarray, fresh: np.ndarray) -> dict[str, Any]:
    """How far re-rendered views are from the stored pixel sample: max difference and share differing."""
    diff = np.abs(stored.astype(np.int16) - fresh.astype(np.int16))
    return {
        "views": int(len(stored)),
        "max_pixel_diff": int(diff.max(initial=0)),
        "pixels_differing": float((diff > 0).mean()) if diff.size else 0.0,
    }


def _render(
    store: Store, source, device: torch.device, cols: dict[str, np.ndarray], batch_size: int, draft: bool
) -> list[dict[str, Any]]:
    params = FixedParams(cols)
    meta = store.meta
    batches = [Batch(0, a, b) for a, b in split_range(0, len(cols["image"]), batch_size)]
    return list(
        Feed(
            ViewBatches(
                source,
                batches,
                int(meta.recipe["size"]),
                meta.group_size,
                params,
                draft=draft,
                renderer=meta.rendered["renderer"],
            ),
            device,
            workers=0,
        )
    )


def verify(
    shards: str,
    teacher: str,
    views: int = 256,
    weights: str | None = None,
    data: str | None = None,
    min_agreement: float | None = None,
    batch_size: int = 256,
    device: str | None = None,
    mean: str | None = None,
    std: str | None = None,
    class_map: str | None = None,
    trust_code: bool = False,
    cpu: bool = False,
    limit: int | None = None,
) -> dict[str, Any]:
    """Re-render `views` stored views (and the stored pixel sample), re-run `teacher` on them and
    compare with what the store says: a report whose `ok` says whether replay is exact (invariant 3).

    `device` ("cpu" or "cuda") or `cpu` choose where; default: the process state's device."""
    store = open_store(shards)
    meta = store.meta
    if meta.epochs_done == 0:
        raise StoreMismatchError(f"store {shards} has no complete epoch to verify")
    source = open_store_source(store, data, limit)
    if device not in (None, "cpu", "cuda"):
        raise ConfigError(f"--device {device!r}: choose cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible here; drop --device (or use --device cpu)")
    state = process_state(cpu or device == "cpu")
    dev = torch.device(device) if device else state.device
    # The teacher's contract comes from its weights, else from flags, else from the --mean/--std (and
    # class map) the store's teacher was given, when with them it is that teacher (same digest); a store
    # made with another normalisation or class map than one given here is refused, not silently adopted.
    model = load_teacher(
        teacher,
        source,
        device=dev,
        precision=meta.precision,
        weights=weights,
        mean=mean,
        std=std,
        class_map=class_map,
        trust_code=trust_code,
        recorded=meta.teacher,
        recorded_in=shards,
    )
    model.check_store(meta, shards)
    if meta.attention:  # the maps of every forward, to compare with the stored ones
        model.tap(meta.attention["layers"], meta.attention["grid"], meta.attention["codec"])
    rendered = meta.rendered
    same_kind = rendered["device"] == dev.type
    draft = rendered["decoder"] == "pil-draft"
    precision = meta.precision
    if min_agreement is None:  # across device kinds or in reduced precision a near-tie may flip
        min_agreement = 1.0 if same_kind and precision == "fp32" else 0.99

    g = meta.group_size
    cache = ChunkCache(store)
    result: dict[str, Any] = {
        "store": shards,
        "rendered_on": rendered["device"],
        "replayed_on": dev.type,
        "decoder": rendered["decoder"],
        "precision": precision,
    }
    pixels_ok = True
    sample = store.read_pixels()
    if sample is not None:
        info, stored = sample
        n = -(-info["views"] // g) * g
        cols = cache.views(info["epoch"], info["start"], info["start"] + n)
        fresh = torch.cat([it["views"].cpu() for it in _render(store, source, dev, cols, batch_size, draft)])
        parity = pixel_parity(stored, fresh[: len(stored)].numpy())
        exact = same_kind or rendered["renderer"] == "pil-bilinear-1"  # integer resample: the same bytes anywhere
        pixels_ok = (
            parity["max_pixel_diff"] == 0
            if exact
            else (parity["max_pixel_diff"] <= 1 and parity["pixels_differing"] <= CROSS_DEVICE_PIXELS)
        )
        result["pixels"] = {**parity, "ok": pixels_ok}

    groups_per_epoch = meta.views_per_epoch // g
    n_groups = min(-(-views // g), groups_per_epoch * meta.epochs_done)
    picks = np.linspace(0, groups_per_epoch * meta.epochs_done - 1, n_groups).round().astype(np.int64)
    parts = [
        cache.views(int(p // groups_per_epoch), int(p % groups_per_epoch) * g, int(p % groups_per_epoch + 1) * g)
        for p in picks
    ]
    cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    fresh = TeacherOutput.cat(
        [model.forward(it["views"]).cpu() for it in _render(store, source, dev, cols, batch_size, draft)]
    )

    abs_tol = ABS_TOL.get(precision, ABS_TOL["bf16"]) + (0.0 if same_kind else CROSS_DEVICE_ABS_TOL)
    tol = Tolerance(min_agreement, abs_tol, FP16_RTOL + REL_TOL.get(precision, REL_TOL["bf16"]))
    report: dict[str, Any] = {"heads": [], "attention": []}
    ok = pixels_ok
    for codec in active_codecs(meta):  # soft labels, heads, maps and any extra kind, each checked by its codec
        checked = codec.verify(fresh, cols, meta, tol)
        if checked is not None:
            ok &= bool(checked.pop("ok"))
            report.update(checked)
    result.update(
        {
            "views": int(len(cols["image"])),
            "epochs": meta.epochs_done,
            **report,
            "logit_codec": meta.logit_codec,
            "min_agreement": min_agreement,
            "ok": bool(ok),
        }
    )
    return result
