"""The feed: where pixels are made and handed to the model.

DataLoader workers read params (and stored soft labels) and decode images; `render` turns them
into views. Where it runs is one decision, made here and recorded in a store:

- `device` (the default with CUDA): the main process copies the decoded images (pinned memory,
  non_blocking) to the accelerator and renders there, batched. Measured on an H200: 128k
  views/s, against 2.2k from 14 CPU workers rendering.
- `workers` (the default on a CPU-only machine with workers): each worker renders its batch, so
  rendering runs in parallel with the model instead of in front of it.

Both make the same bytes: the store's renderer (`kdlib.render`) decides the arithmetic, and on a
CPU both places run Pillow's C resample for `pil-bilinear-1` (the batched integer taps of
`render_decoded` are for accelerators, where they give the same bytes).
The feed keeps one batch ready ahead of the one the model is working on (on CUDA its copy and
render run on a side stream, so they overlap the model's kernels), and one iterator (one set of
workers) lives for the whole run.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from .errors import ConfigError
from .render import pillow_renders, render_decoded, render_decoded_pil
from .views import ViewBatches

__all__ = ["RENDER_PLACES", "render_place", "render_device", "Feed"]

RENDER_PLACES = ("auto", "device", "workers")


def render_place(choice: str, device: torch.device, workers: int) -> str:
    """Where views are rendered: on the accelerator when there is one, else in the workers (if any)."""
    if choice not in RENDER_PLACES:
        raise ConfigError(f"--render {choice!r} is unknown; choose one of {RENDER_PLACES}")
    if choice == "auto":
        return "device" if device.type != "cpu" or workers == 0 else "workers"
    if choice == "workers" and workers == 0:
        return "device"  # no workers: the main process renders, on the CPU it runs on
    return choice


def render_device(choice: str, device: torch.device, workers: int) -> str:
    """The kind of device (`cpu`, `cuda`) that renders the views: what a store records of its pixels."""
    return "cpu" if render_place(choice, device, workers) == "workers" else device.type


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, dict):
        return [t for v in x.values() for t in _tensors(v)]
    if isinstance(x, torch.Tensor):
        return [x]
    return []


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    if isinstance(x, torch.Tensor) or hasattr(x, "pin_memory"):
        return x.to(device, non_blocking=True)
    return x


class Feed:
    """Items of `data` with every tensor on `device` and `item["views"]` (uint8) rendered.

    Where the pixels are finished is decided here, once, when the feed is made: the dataset the
    workers run is `data.staged(stage)` (a new one; nothing is changed on `data` afterwards), and
    the main process's part, if any, is one function chosen with it. `item["image"]` stays on the
    CPU as well (`item["image_cpu"]`) for host-side bookkeeping."""

    def __init__(self, data: ViewBatches, device: torch.device, workers: int, render: str = "auto") -> None:
        self.device = device
        self.place = render_place(render, device, workers)
        pillow = pillow_renders(data.renderer)
        if self.place == "workers":
            stage = "worker-pillow" if pillow else "worker"
        else:  # the main process renders: Pillow's C code on a CPU, the batched arithmetic on an accelerator
            stage = "pillow-main" if device.type == "cpu" and pillow else "device"
        self.data = data.staged(stage)
        self.render_device = render_device(render, device, workers)  # what a store records of its pixels
        self._finish = {"device": self._render_on_device, "pillow-main": self._render_with_pillow}.get(stage)
        self.loader = DataLoader(
            self.data,
            batch_size=None,
            shuffle=False,
            num_workers=workers,
            prefetch_factor=4 if workers else None,
            pin_memory=device.type == "cuda",
            persistent_workers=False,
        )
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def __len__(self) -> int:
        return len(self.data)

    def _prepare(self, item: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        """The batch on the device, rendered; on CUDA with the event that marks it done on the side stream."""
        if self.stream is None:
            return self._place(item), None
        with torch.cuda.stream(self.stream):
            item = self._place(item)
            done = torch.cuda.Event()
            done.record(self.stream)
        return item, done

    def _place(self, item: dict[str, Any]) -> dict[str, Any]:
        image = item["image"]
        params = item.pop("params", None)  # host-side numpy params: never copied to the device
        item = _to(item, self.device)
        item["image_cpu"] = image
        if self._finish is not None:
            item["views"] = self._finish(item, params)
        return item

    def _render_on_device(self, item: dict[str, Any], params: Any) -> torch.Tensor:
        return render_decoded(item.pop("render"), item.pop("decoded"), self.data.size, self.data.renderer)

    def _render_with_pillow(self, item: dict[str, Any], params: dict[str, Any]) -> torch.Tensor:
        # the DataLoader turned the numpy params into (CPU) tensors: back to numpy for Pillow's path
        params = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in params.items()}
        item.pop("render")
        d = self.data
        return render_decoded_pil(params, item.pop("decoded"), d.size, d.group_size, d.draft)

    def _hand_over(self, item: dict[str, Any], done: Any) -> dict[str, Any]:
        """The model's stream waits for this batch's copy and render (not for the next one's), and
        the allocator learns that its tensors are used there."""
        if done is not None:
            main = torch.cuda.current_stream(self.device)
            main.wait_event(done)
            for t in _tensors(item):
                if t.device.type == "cuda":
                    t.record_stream(main)
        return item

    def __iter__(self) -> Iterator[dict[str, Any]]:
        it = iter(self.loader)
        ahead = next(it, None)
        ready = None if ahead is None else self._prepare(ahead)
        while ready is not None:
            current = ready
            ahead = next(it, None)  # the next batch is copied and rendered while the model runs this one
            ready = None if ahead is None else self._prepare(ahead)
            yield self._hand_over(*current)
