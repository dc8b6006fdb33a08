"""Batches of rendered views for a DataLoader, from a plan (precompute, online) or a store (train).

An item is a whole batch (a range of views, always whole groups), so each worker decodes
each image of a group once and renders the batch in one vectorised call. Params come
either from plan arrays held in memory or from a store, read chunk by chunk inside the
worker (`ChunkCache`), so no process holds an epoch it does not need.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .plan import PARAM_FIELDS
from .render import render_views
from .source import Source
from .extras import item_columns
from .store import ChunkCache, Store

__all__ = ["ViewBatches", "split_range", "rank_slice", "loader"]


def split_range(start: int, stop: int, step: int) -> list[tuple[int, int]]:
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
    """Item i: views [ranges[i]) rendered, with their params (and stored soft labels, if any)."""

    def __init__(self, source: Source, ranges: list[tuple[int, int]], size: int, group_size: int, *,
                 params: dict[str, np.ndarray] | None = None, store: Store | None = None,
                 epoch: int | None = None) -> None:
        if (params is None) == (store is None):
            raise ValueError("give exactly one of params (a plan) or store")
        self.source, self.ranges, self.size, self.group_size = source, ranges, size, group_size
        self.params, self.store, self.epoch = params, store, epoch
        self._labels = source.labels()
        self._cache: ChunkCache | None = None

    def __len__(self) -> int:
        return len(self.ranges)

    def __getitem__(self, i: int) -> dict[str, Any]:
        start, stop = self.ranges[i]
        if self.params is not None:
            cols = {k: a[start:stop] for k, a in self.params.items()}
        else:
            if self._cache is None:
                self._cache = ChunkCache(self.store)
            cols = self._cache.views(self.epoch, start, stop)
        p = {k: cols[k] for k in PARAM_FIELDS}
        views = render_views(p, self.source.decode, self.size, self.group_size)
        image = p["image"].astype(np.int64)
        group_start = np.arange(len(image)) // self.group_size * self.group_size
        partner_image = image[group_start + p["partner"].astype(np.int64)]
        out = {"index": i, "start": start, "stop": stop, "views": views,
               "label": torch.from_numpy(self._labels[image]),
               "partner_label": torch.from_numpy(self._labels[partner_image]),
               "lam": torch.from_numpy(p["lam"].copy()),
               "image": torch.from_numpy(image)}
        for k in ("ids", "logits", "lse"):
            if k in cols:
                a = cols[k]
                out[k] = torch.from_numpy(a.astype(np.int64) if k == "ids" else a.copy())
        out.update(item_columns(cols))  # DIH head labels h{j}_*, attention maps at{l} (issue 13)
        return out


def loader(dataset: ViewBatches, workers: int) -> DataLoader:
    """In order, one item per batch; workers render ahead while the model runs."""
    return DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers,
                      persistent_workers=False, prefetch_factor=4 if workers else None)
