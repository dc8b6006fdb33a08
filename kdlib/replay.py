"""Replay: a store's views for one rank's share of every global batch, in training order.

What a student's loop consumes. `kdlib train` is one consumer; a user's own loop is another::

    import kdlib
    replay = kdlib.Replay.from_store("shards/run", batch_size=256, epochs=100, device="cuda")
    for batch in replay:                      # one rank's share of one global batch
        loss = kdlib.losses.kl(student(batch.inputs), batch.teacher_logits)

The global order is fixed by the store (DESIGN invariant 6): global batch s of an epoch is views
[s*B, (s+1)*B) of that epoch's plan, and rank r of N gets the r-th run of whole groups of it, so N
processes with batch B see what one process with batch B sees. More epochs than stored cycle the
stored ones (epoch e replays stored epoch e mod stored_epochs). `start_step` resumes mid-run.
Pixels are rendered where the feed decides (`kdlib.feed`: the accelerator when there is one).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .errors import ConfigError
from .feed import Feed, check_feed_fits, render_device
from .runtime import process_state
from .store import Store, open_store
from .targets import StoreTargets, Targets
from .views import Batch, rank_slice, split_range

__all__ = ["Replay", "ReplayBatch", "rank_batches"]


def rank_batches(
    views_per_epoch: int,
    batch_size: int,
    group_size: int,
    rank: int,
    world: int,
    epochs: int,
    start_step: int = 0,
    drop_last: bool = True,
) -> list[Batch]:
    """This rank's share of every global batch from `start_step` on, over `epochs` training epochs.

    `drop_last=False` keeps an epoch's last, smaller global batch (whole groups still; one process)."""
    if batch_size % (group_size * world):
        raise ConfigError(
            f"--batch-size {batch_size} must be a multiple of group size {group_size} "
            f"x processes {world}, so every process gets whole groups"
        )
    steps = views_per_epoch // batch_size if drop_last else -(-views_per_epoch // batch_size)
    if steps == 0:
        raise ConfigError(f"--batch-size {batch_size} is larger than an epoch ({views_per_epoch} views)")
    global_batches = split_range(0, min(steps * batch_size, views_per_epoch), batch_size)
    first = start_step // steps
    return [
        Batch(e, *rank_slice(a, b, rank, world, group_size))
        for e in range(first, epochs)
        for a, b in global_batches[(start_step - e * steps if e == first else 0) :]
    ]


@dataclass
class ReplayBatch:
    """One step's views for this rank, with what the store says about them.

    `item` holds everything the feed gives (on the device): `label`, `partner_label`, `lam` (the
    views' labels and mix weights), `image` (source ids), the stored soft label `ids`, `logits`
    (float top-k) and `lse`, each DIH head's `h{j}_*`, each attention map `at{l}`, and the columns
    of any extra column kind."""

    step: int  # global step, 0-based, counted from the first epoch
    epoch: int  # training epoch
    views: Tensor  # uint8 [b, C, H, W] on the device: exactly the pixels the teacher saw
    item: dict[str, Any]
    _replay: Replay = field(repr=False)

    @property
    def inputs(self) -> Tensor:
        """float32 views normalised for the student: (views / 255 - mean) / std (the replay's mean/std)."""
        mean, std = self._replay.normalisation()
        return (self.views.float() / 255.0 - mean) / std

    @property
    def teacher_logits(self) -> Tensor:
        """Dense float32 teacher logits [b, C] from the soft labels: the top-k in place, the tail at one
        constant carrying the mass the lse says it has (`kdlib.softlabel.reconstruct`)."""
        return self._replay.targets.logits(self.item, self.views.device)

    @property
    def soft_labels(self) -> dict[str, Tensor]:
        """The stored soft label: top-k `ids` (int64), `logits` (float32) and `lse` (float32)."""
        return {k: self.item[k] for k in ("ids", "logits", "lse")}

    @property
    def labels(self) -> tuple[Tensor, Tensor, Tensor]:
        """(label, partner_label, lam): each view's own label, its mixing partner's and its own weight."""
        return self.item["label"], self.item["partner_label"], self.item["lam"]

    @property
    def teacher_maps(self) -> list[Tensor]:
        """The stored attention maps of these views, one float32 [b, G*G] per tapped teacher layer."""
        return self._replay.targets.maps(self.item, self.views.device)


class Replay:
    """An iterable of `ReplayBatch`: this rank's share of every global batch of `epochs` epochs.

    Made over a source of targets (`kdlib.targets`; `from_store` for a store). `rank` / `world`
    default to accelerate's process state (so `accelerate launch` splits the work), `device` to its
    device. `mean`/`std` (per channel, [0, 1] units) give `ReplayBatch.inputs`; default: the data's
    statistics."""

    def __init__(
        self,
        targets: Targets,
        *,
        batch_size: int,
        epochs: int | None = None,
        start_step: int = 0,
        device: torch.device | str | None = None,
        rank: int | None = None,
        world: int | None = None,
        workers: int = 2,
        render: str = "auto",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        drop_last: bool = True,
    ) -> None:
        if rank is None or world is None or device is None:
            state = process_state()
            rank = state.process_index if rank is None else rank
            world = state.num_processes if world is None else world
            device = state.device if device is None else device
        if not 0 <= rank < world:
            raise ConfigError(f"rank {rank} is not in [0, world {world})")
        self.targets, self.batch_size, self.rank, self.world = targets, int(batch_size), int(rank), int(world)
        self.device, self.workers, self.render = torch.device(device), int(workers), render
        self.epochs = int(epochs) if epochs is not None else (targets.stored_epochs or 1)
        self.start_step, self.drop_last = int(start_step), bool(drop_last)
        self.group_size = targets.recipe.group_size
        # the sizes, and that a batch of views fits where it is rendered, are checked now, not at the first step
        first = rank_batches(
            targets.views, self.batch_size, self.group_size, self.rank, self.world, 1, 0, self.drop_last
        )
        check_feed_fits(targets.dataset(first[:1]), self.device, self.workers, self.render)
        self.mean, self.std = mean, std
        self._norm: tuple[Tensor, Tensor] | None = None

    def normalisation(self) -> tuple[Tensor, Tensor]:
        """(mean, std) as [1, C, 1, 1] float32 on the device: the ones given, else the data's statistics."""
        if self._norm is None:
            mean, std = (
                (self.mean, self.std)
                if self.mean is not None and self.std is not None
                else self.targets.source.mean_std()
            )
            self._norm = tuple(
                torch.tensor([float(v) for v in x], dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
                for x in (mean, std)
            )
        return self._norm

    @classmethod
    def from_store(
        cls,
        store: Store | str,
        *,
        batch_size: int,
        epochs: int | None = None,
        data: str | None = None,
        limit: int | None = None,
        stored_epochs: int | None = None,
        storage_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Replay:
        """The replay of a store (a path, an fsspec URL or an open `Store`); `data` names its source
        when the path in its meta.json is not where the images are here; `storage_options` are fsspec's
        for an object store (default: `$KDLIB_STORAGE_OPTIONS` and the `AWS_*` variables). Other
        arguments as `Replay`."""
        store = open_store(store, storage_options) if isinstance(store, str) else store
        return cls(StoreTargets(store, data, limit, stored_epochs), batch_size=batch_size, epochs=epochs, **kwargs)

    @property
    def store(self) -> Store | None:
        """The store replayed (None when the targets are an online teacher or labels)."""
        return self.targets.store

    @property
    def num_classes(self) -> int:
        """Classes of the soft labels (and of the student)."""
        return self.targets.num_classes

    @property
    def source(self):
        """The source whose images are rendered."""
        return self.targets.source

    @property
    def recipe(self):
        """The recipe the views were planned with."""
        return self.targets.recipe

    @property
    def steps_per_epoch(self) -> int:
        """Global steps per epoch: whole global batches only (and the last, smaller one without `drop_last`)."""
        n = self.targets.views
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def total_steps(self) -> int:
        """Global steps over all `epochs`."""
        return self.steps_per_epoch * self.epochs

    @property
    def render_device(self) -> str:
        """The kind of device that renders this replay's views (`cpu` when DataLoader workers do)."""
        return render_device(self.render, self.device, self.workers)

    def __len__(self) -> int:
        return self.total_steps - self.start_step

    def feed(self) -> Feed:
        """The feed of every remaining step: one set of workers lives from the first batch to the last."""
        batches = rank_batches(
            self.targets.views,
            self.batch_size,
            self.group_size,
            self.rank,
            self.world,
            self.epochs,
            self.start_step,
            self.drop_last,
        )
        return Feed(self.targets.dataset(batches), self.device, self.workers, self.render)

    def __iter__(self) -> Iterator[ReplayBatch]:
        step = self.start_step
        for item in self.feed():
            yield ReplayBatch(step, step // self.steps_per_epoch, item["views"], item, self)
            step += 1
