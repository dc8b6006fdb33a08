"""Batches of views for a DataLoader, from a plan (precompute, online), a store (train) or fixed params (eval).

An item is a whole batch (a range of views of one epoch, always whole groups). The loader's
process reads the batch's params (and stored soft labels) and hands the params to a worker, which
decodes each image of a group once and hands over the decoded images; `kdlib.feed` renders them
where the model runs. Params come from a `ParamReader`: the plan (a pure function of recipe, sizes
and epoch), a store read chunk by chunk (`ChunkCache`: each chunk once, read ahead of the batches),
or fixed params such as eval's center views.

One dataset spans every batch of a run (all epochs), so one DataLoader iterator, and one set of
workers, serves the whole run.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .plan import PARAM_FIELDS, make_plan, pack_params, unpack_params
from .recipe import Recipe
from .render import RENDERER, check_renderer, decode_batch, param_tensors, pillow_renders, render_decoded, render_pil
from .source import Source

__all__ = ["Batch", "ParamReader", "PlanParams", "FixedParams", "ViewBatches", "STAGES", "split_range", "rank_slice"]

# How far a worker takes an item's pixels, decided once by the feed (`kdlib.feed`) when it is made:
# "worker-pillow": the DataLoader worker renders with Pillow's C resample (pil-bilinear-1, Pillow agrees);
# "worker": the worker decodes and renders with `render_decoded` (roi_align-1, or a Pillow that disagrees);
# "device": the worker decodes and makes the host-side render tensors, the main process renders on its device;
# "pillow-main": the worker decodes, the main process renders with Pillow on its CPU (no taps to make).
STAGES = ("worker-pillow", "worker", "device", "pillow-main")


class Batch(NamedTuple):
    """Views [start, stop) of `epoch` (the epoch the params are read from)."""

    epoch: int
    start: int
    stop: int


class ParamReader(Protocol):
    """Where a batch's view params come from: the plan, a store (`kdlib.store.ChunkCache`), fixed params."""

    def views(self, epoch: int, start: int, stop: int) -> dict[str, np.ndarray]: ...

    def item_columns(self, cols: dict[str, np.ndarray]) -> dict[str, torch.Tensor]: ...

    # optional: `expect(batches)`, the batches about to be read, in order (a store reads ahead along them)


class PlanParams:
    """The plan's params of any epoch, drawn where they are read and kept for the current epoch.

    `packing` quantizes them as the store will (precompute renders what it stores)."""

    def __init__(self, recipe: Recipe, sizes: np.ndarray, packing: str = "none") -> None:
        self.recipe, self.sizes, self.packing = recipe, np.asarray(sizes), packing
        self._epoch: int | None = None
        self._plan: dict[str, np.ndarray] = {}

    def epoch(self, epoch: int) -> dict[str, np.ndarray]:
        if epoch != self._epoch:
            plan = make_plan(self.recipe, self.sizes, epoch)
            self._plan = (
                unpack_params(pack_params(plan, self.packing), self.packing) if self.packing != "none" else plan
            )
            self._epoch = epoch
        return self._plan

    def views(self, epoch: int, start: int, stop: int) -> dict[str, np.ndarray]:
        return {k: a[start:stop] for k, a in self.epoch(epoch).items()}

    def item_columns(self, cols: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {}


class FixedParams:
    """Params given in full (eval's center views); the epoch is ignored."""

    def __init__(self, params: dict[str, np.ndarray]) -> None:
        self.params = params

    def views(self, epoch: int, start: int, stop: int) -> dict[str, np.ndarray]:
        return {k: a[start:stop] for k, a in self.params.items()}

    def item_columns(self, cols: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return {}


class BatchKeys(Sampler):
    """`ViewBatches.key(i)` for i = 0, 1, ...: what a DataLoader hands its workers, read in its own process."""

    def __init__(self, data: ViewBatches) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        return (self.data.key(i) for i in range(len(self.data)))


def split_range(start: int, stop: int, step: int) -> list[tuple[int, int]]:
    """[start, stop) cut into consecutive ranges of at most `step`."""
    return [(a, min(a + step, stop)) for a in range(start, stop, step)]


def rank_slice(start: int, stop: int, rank: int, world: int, group_size: int) -> tuple[int, int]:
    """This rank's share of the global batch [start, stop): equal runs of whole groups, in rank order."""
    groups = (stop - start) // group_size
    per = groups // world
    if per * world != groups:
        raise ValueError(f"a batch of {groups} groups does not split evenly over {world} processes")
    a = start + rank * per * group_size
    return a, a + per * group_size


class ViewBatches(Dataset):
    """Item i: batch `batches[i]`: its params, decoded images, labels (and stored soft labels).

    Under a DataLoader the main process reads the params (`keys`, the loader's sampler: a store's chunk
    is read once there, whatever the number of workers), hands each worker its batch's params with the
    batch, keeps the stored columns (soft labels, heads, maps) and puts them back on the item the worker
    returns (`merge`). `data[i]` alone reads everything itself.

    `stage` (one of `STAGES`, chosen by the feed) says how far a worker takes the pixels: rendered
    views (`item["views"]`, uint8 on the CPU), or decoded images and what the main process needs to
    render them. `renderer` is the store's when replaying one (`meta.rendered["renderer"]`)."""

    def __init__(
        self,
        source: Source,
        batches: list[Batch],
        size: int,
        group_size: int,
        params: ParamReader,
        *,
        stage: str | None = None,
        draft: bool = False,
        renderer: str = RENDERER,
    ) -> None:
        self.source, self.batches, self.size, self.group_size = source, list(batches), size, group_size
        self.params, self.draft, self.renderer = params, draft, check_renderer(renderer)
        # standalone (no feed): rendered here, the way a worker renders
        self.stage = stage or ("worker-pillow" if pillow_renders(self.renderer) else "worker")
        if self.stage not in STAGES:
            raise ValueError(f"stage {self.stage!r} is not one of {STAGES}")
        self._labels = source.labels()
        self._held: dict[int, dict[str, torch.Tensor]] = {}  # stored columns of the batches handed out
        expect = getattr(self.params, "expect", None)  # optional: a reader that reads ahead
        if expect is not None:
            expect(self.batches)

    def staged(self, stage: str) -> ViewBatches:
        """The same batches, with the worker taking the pixels as far as `stage` (a new dataset)."""
        return ViewBatches(
            self.source,
            self.batches,
            self.size,
            self.group_size,
            self.params,
            stage=stage,
            draft=self.draft,
            renderer=self.renderer,
        )

    def __len__(self) -> int:
        return len(self.batches)

    def keys(self) -> BatchKeys:
        """The DataLoader's sampler: `key(i)` for every batch, in order, in the loader's (main) process."""
        return BatchKeys(self)

    def key(self, i: int) -> tuple[int, dict[str, np.ndarray]]:
        """Batch i's params, read here, for the worker that decodes it; its stored columns kept for `merge`."""
        epoch, start, stop = self.batches[i]
        cols = self.params.views(epoch, start, stop)
        self._held[i] = self.params.item_columns(cols)
        return i, {k: cols[k] for k in PARAM_FIELDS}

    def merge(self, item: dict[str, Any]) -> dict[str, Any]:
        """The item a worker made from `key(i)`, with batch i's stored columns back on it."""
        item.update(self._held.pop(int(item["index"]), {}))
        return item

    def __getitem__(self, key: int | tuple[int, dict[str, np.ndarray]]) -> dict[str, Any]:
        if isinstance(key, tuple):  # from `keys`: the params were read in the main process
            i, p = key
            stored: dict[str, torch.Tensor] = {}
        else:
            i = int(key)
            cols = self.params.views(*self.batches[i])
            p, stored = {k: cols[k] for k in PARAM_FIELDS}, self.params.item_columns(cols)
        epoch, start, stop = self.batches[i]
        image = p["image"].astype(np.int64)
        group_start = np.arange(len(image)) // self.group_size * self.group_size
        partner_image = image[group_start + p["partner"].astype(np.int64)]
        out: dict[str, Any] = {
            "index": i,
            "epoch": epoch,
            "start": start,
            "stop": stop,
            "label": torch.from_numpy(self._labels[image]),
            "partner_label": torch.from_numpy(self._labels[partner_image]),
            "lam": torch.from_numpy(p["lam"].copy()),
            "image": torch.from_numpy(image),
        }
        out.update(stored)  # stored soft labels, heads, maps, ... (kdlib.store.codecs)
        if self.stage == "worker-pillow":  # Pillow's C resample, straight from the decoder
            out["views"] = render_pil(p, self.source.decode_image, self.size, self.group_size, self.draft)
            return out
        decoded = decode_batch(p, self.source.decode, self.size, self.source.decode_draft if self.draft else None)
        # the integer taps only matter where `render_decoded` runs them (an accelerator, or a worker without Pillow)
        render = param_tensors(p, decoded, self.size, self.group_size, self.renderer, taps=self.stage != "pillow-main")
        if self.stage == "worker":
            out["views"] = render_decoded(render, decoded, self.size, self.renderer)
        else:
            out["render"], out["decoded"] = render, decoded
            if self.stage == "pillow-main":
                out["params"] = p  # Pillow's path reads the host params
        return out
