"""The feed: where pixels are made and handed to the model.

The main process reads params (and stored soft labels, each chunk once), DataLoader workers decode
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

Before the first batch the feed knows what a batch of views costs where it is made (`feed_bytes`:
uint8 views in flight, the renderer's working copies, the model's float32 inputs) and refuses a
batch that cannot fit in the memory there (`check_fits`), suggesting one that does: a recipe's
`size: 4096` is one line, not an allocator's traceback. Decoded images and the model's activations
are not known in advance; half of the memory is left for them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from .errors import ConfigError
from .render import pillow_renders, render_decoded, render_decoded_pil
from .views import ViewBatches

__all__ = [
    "RENDER_PLACES",
    "render_place",
    "render_device",
    "feed_bytes",
    "memory_available",
    "check_fits",
    "check_feed_fits",
    "Feed",
]

RENDER_PLACES = ("auto", "device", "workers")
PREFETCH = 4  # batches each DataLoader worker keeps ready
MEMORY_SHARE = 0.5  # of the memory available, what views may take: the rest for decoded images and the model
_GIB = 1 << 30


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


def _stage(place: str, device: torch.device, renderer: str) -> str:
    """How far a DataLoader worker takes the pixels (`kdlib.views.STAGES`) for this place and renderer."""
    pillow = pillow_renders(renderer)
    if place == "workers":
        return "worker-pillow" if pillow else "worker"
    # the main process renders: Pillow's C code on a CPU, the batched arithmetic on an accelerator
    return "pillow-main" if device.type == "cpu" and pillow else "device"


def _work_bytes(stage: str, renderer: str) -> int:
    """Bytes per view pixel the renderer holds while it renders a batch, besides the uint8 views."""
    if stage in ("worker-pillow", "pillow-main"):
        return 0  # Pillow resamples one view at a time straight into the uint8 views
    if renderer == "roi_align-1":
        return 4  # float32 crops of the whole batch
    return 12  # pil-bilinear-1's batched taps: an int32 accumulator and two int32 temporaries per pass


def feed_bytes(
    views: int, channels: int, size: int, renderer: str, device: torch.device, workers: int, render: str = "auto"
) -> dict[str, int]:
    """Bytes that batches of `views` views need at once, by where they are held ("cpu", or the
    accelerator's name): uint8 views (the batch the model runs, the one ready ahead, and those the
    workers keep ready when they render), the renderer's working copies of the batch it renders
    and the model's float32 inputs. Decoded images are not counted (their sizes vary)."""
    place = render_place(render, device, workers)
    stage = _stage(place, device, renderer)
    pixels = int(views) * int(channels) * int(size) * int(size)
    here = str(device) if device.type != "cpu" else "cpu"
    need = {here: pixels * (2 + 4)}  # two batches of uint8 views in the feed, the model's float32 copy
    if place == "workers":  # each worker renders one batch and keeps PREFETCH ready, in the host's memory
        need["cpu"] = need.get("cpu", 0) + pixels * workers * (PREFETCH + _work_bytes(stage, renderer))
    else:
        need[here] += pixels * _work_bytes(stage, renderer)
    return need


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_room() -> int | None:
    """What the cgroup's memory limit leaves (v2, then v1), when one is set."""
    for limit, usage in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            cap, used = Path(limit).read_text().strip(), Path(usage).read_text().strip()
        except OSError:
            continue
        if cap.isdigit() and used.isdigit() and int(cap) < 1 << 60:  # "max" or a huge v1 number: no limit
            return max(0, int(cap) - int(used))
    return None


def memory_available(device: torch.device) -> int | None:
    """Bytes that can still be allocated on `device`: the host's available memory (within its cgroup's
    limit) for the CPU, free plus cached-but-unused memory on CUDA; None where it is not measured."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type != "cpu":
        return None
    found = [m for m in (_meminfo_available(), _cgroup_room()) if m is not None]
    if not found:
        try:
            found = [os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")]
        except (ValueError, OSError, AttributeError):
            return None
    return min(found)


def _gib(n: float) -> str:
    return f"{n / _GIB:.1f} GiB" if n >= _GIB / 10 else f"{n / (1 << 20):.1f} MiB"


def check_fits(
    views: int,
    group_size: int,
    channels: int,
    size: int,
    renderer: str,
    device: torch.device,
    workers: int,
    render: str = "auto",
) -> None:
    """Refuse (ConfigError, one line) batches of `views` views at `size` px that need more than
    MEMORY_SHARE of the memory where they are held, naming a batch size that fits."""
    need = feed_bytes(views, channels, size, renderer, device, workers, render)
    per_view = feed_bytes(1, channels, size, renderer, device, workers, render)
    rooms = {where: memory_available(torch.device(where)) for where in need}
    # the largest batch of whole groups that fits everywhere views are held
    fit = min((int(MEMORY_SHARE * r // per_view[w]) for w, r in rooms.items() if r is not None), default=views)
    fit = fit // group_size * group_size
    for where, nbytes in need.items():
        room = rooms[where]
        if room is None or nbytes <= MEMORY_SHARE * room:
            continue
        workers_too = " (or fewer --workers)" if render_place(render, device, workers) == "workers" and workers else ""
        advice = (
            f"use --batch-size {fit} or less{workers_too}, or a smaller size in the recipe"
            if fit >= group_size
            else f"even one group of {group_size} view{'s' if group_size > 1 else ''} does not fit: "
            "use a smaller size in the recipe"
        )
        raise ConfigError(
            f"a batch of {views} views of {size}x{size} px ({channels} channel{'s' if channels > 1 else ''}) "
            f"needs {_gib(nbytes)} on the {where} (uint8 views in flight, the renderer's working copies, "
            f"float32 model inputs) and the {where} has {_gib(room)} available, of which at most "
            f"{MEMORY_SHARE:.0%} may go to views (the rest is for decoded images and the model): {advice}"
        )


def check_feed_fits(data: ViewBatches, device: torch.device, workers: int, render: str = "auto") -> None:
    """`check_fits` for the largest batch of `data`, as a `Feed` of it would render it."""
    largest = max((b.stop - b.start for b in data.batches), default=0)
    check_fits(largest, data.group_size, data.source.channels, data.size, data.renderer, device, workers, render)


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
        stage = _stage(self.place, device, data.renderer)
        check_feed_fits(data, device, workers, render)  # before any worker starts or any pixel is made
        self.data = data.staged(stage)
        self.render_device = render_device(render, device, workers)  # what a store records of its pixels
        self._finish = {"device": self._render_on_device, "pillow-main": self._render_with_pillow}.get(stage)
        self.loader = DataLoader(
            self.data,
            batch_size=None,
            sampler=self.data.keys(),  # params and stored labels read here, once; workers decode
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
        item = self.data.merge(item)
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
