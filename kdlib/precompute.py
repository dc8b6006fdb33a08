"""Precompute: run the teacher once over the planned views and store its soft labels.

1. open the source, the recipe and the teacher; create (or reopen, to resume or extend) the store;
2. for each epoch, plan it, and for every chunk not yet committed and owned by this rank:
   DataLoader workers decode and render, the teacher runs in inference mode, top-k is taken
   on the device, and a writer thread writes and commits the chunk while the teacher goes on;
3. rank 0 marks the epoch done in meta.json once every chunk of it is committed;
4. the teacher's predictions on the test split (center views) are stored too, so that
   `kdlib eval` can report a student's agreement with the teacher without loading it; `meta.test`
   records the views they were made on (size, center crop, decoder), where eval measures agreement.

Run on many processes with `accelerate launch -m kdlib precompute ...`: each rank owns the
chunks c with c % world == rank, so the store is the same whatever the world size.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather
from tqdm import tqdm  # not tqdm.auto: its asyncio tqdm iterates a DataLoader twice (tqdm#1598)

from ._version import __version__
from .attention import parse_layers
from .errors import ConfigError, StoreError
from .feed import Feed, check_fits, render_device
from .plan import center_params, views_per_epoch
from .recipe import Recipe, load_recipe
from .render import DECODERS, RENDERER
from .runtime import process_state
from .softlabel import encode, id_dtype, to_codec
from .source import open_source, save_source_index
from .source_base import using_storage_options
from .store import FORMAT_VERSION, Store, StoreMeta, create_store, open_store
from .store.codecs import SAMPLE, ParamsCodec, active_codecs, check_names, sampled_kind
from .teacher import DEFAULT_GRID, Teacher, load_teacher
from .views import Batch, FixedParams, PlanParams, ViewBatches, split_range

__all__ = ["PrecomputeConfig", "auto_full_sample", "precompute", "PIXEL_SAMPLE"]

PIXEL_SAMPLE = 8  # rendered views of epoch 0 kept in the store, so verify can measure pixel parity


@dataclass
class PrecomputeConfig:
    """Everything `kdlib precompute` takes (see `kdlib precompute -h`); `columns` names extra column kinds (registered codecs) to store."""

    teacher: str
    data: str
    out: str
    recipe: str | None = None
    epochs: int = 1
    k: int | None = None  # top-k logits per view; None: 10, or every class when fewer
    batch_size: int = 256
    workers: int = 2
    limit: int | None = None
    chunk_views: int = 4096
    backend: str = "zarr"
    weights: str | None = None
    seed: int | None = None
    test: bool = True
    param_packing: str = "none"  # or packed: uint16 boxes, lambda on a 1/65535 grid (24 -> 16 B/view)
    logit_codec: str = "fp16"  # or q8: 8-bit top-k logits (half the label bytes at k = 10)
    full_sample: float | None = None  # fraction of views (the first of each chunk) that also keep full logits;
    # None: auto_full_sample(k, classes)
    precision: str | None = None  # teacher forward: fp32, tf32 or bf16; None: bf16 on CUDA, fp32 on the CPU
    decode: str = "pil"  # or pil-draft: JPEGs shrunk 2-8x in the DCT domain when every box allows it
    render: str = "auto"  # where views are rendered: device, workers, auto (see kdlib.feed)
    attention: str | None = None  # teacher layers whose attention maps are stored (comma-separated)
    attention_grid: int = DEFAULT_GRID  # maps pooled to G x G
    attention_codec: str = "fp16"  # or q8
    mean: str | None = None  # the teacher's input contract when its weights do not define one ("0.485,0.456,0.406")
    std: str | None = None
    class_map: str | None = None  # file mapping the data's classes to teacher outputs (kdlib.classmap)
    trust_code: bool = False  # let a run dir's config name a factory to import
    cpu: bool = False  # run on the CPU even when a GPU is present
    columns: tuple[str, ...] = field(default_factory=tuple)  # extra column kinds to store (registered codecs)
    labels: str = "topk"  # or sampled: `samples` draws per view from softmax(logits / sample_temperature) (RS-KD)
    samples: int = 10
    sample_temperature: float = 1.0
    # fsspec's options for s3://... stores and data (`--storage-options`; default: $KDLIB_STORAGE_OPTIONS and
    # the AWS_* variables); never written into the store (they may hold credentials)
    storage_options: dict[str, Any] | None = field(default=None, repr=False)


LABEL_KINDS = ("topk", "sampled")


DEFAULT_K = 10  # top-k logits per view unless --k says otherwise (every class when there are fewer)


def _label_kind(cfg: PrecomputeConfig, num_classes: int) -> tuple[int, list[str]]:
    """(slots per view, meta.codecs entries) of the soft labels `cfg` asks for, checked."""
    if cfg.labels not in LABEL_KINDS:
        raise ConfigError(f"--labels {cfg.labels!r} is unknown; choose one of {LABEL_KINDS}")
    if cfg.labels == "topk":
        if cfg.k is None:
            return min(DEFAULT_K, num_classes), []
        if isinstance(cfg.k, bool) or not isinstance(cfg.k, numbers.Integral) or not 1 <= cfg.k <= num_classes:
            raise ConfigError(
                f"--k {cfg.k!r}: top-k keeps k of the {num_classes} classes' logits per view, 1 <= k <= "
                f"{num_classes}; choose a smaller k (--k {num_classes} keeps them all)"
            )
        return int(cfg.k), []
    s = cfg.samples
    if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= num_classes:
        raise ConfigError(
            f"--samples {s!r}: sampled labels draw S classes per view, 1 <= S <= {num_classes} (the class count); "
            "choose a smaller S"
        )
    if cfg.logit_codec != "fp16":
        raise ConfigError("--logits q8 codes top-k distances; sampled labels keep fp16 logits: drop --logits q8")
    return s, [sampled_kind(cfg.sample_temperature)]  # checks the temperature (> 0, finite)


def auto_full_sample(k: int, num_classes: int) -> float:
    """Default share of views that keep all logits: 1 %, less with many classes, so that the sample
    costs at most a tenth of the top-k values (ImageNet, k = 10: 0.1 %, 2 B/view instead of 20)."""
    return min(0.01, 0.1 * k / num_classes)


def _round_to_groups(n: int, group_size: int, what: str, state: PartialState) -> int:
    r = max(group_size, n // group_size * group_size)
    if r != n:
        state.print(f"note: {what}={n} rounded to {r}, a multiple of the group size {group_size}")
    return r


def precompute(cfg: PrecomputeConfig) -> Store:
    """Run the teacher once over the recipe's views and store its soft labels (see the module docstring)."""
    with using_storage_options(cfg.storage_options):
        return _precompute(cfg)


def _precompute(cfg: PrecomputeConfig) -> Store:
    state = process_state(cfg.cpu)
    device = state.device
    if cfg.decode not in DECODERS:
        raise ConfigError(f"--decode {cfg.decode!r} is unknown; choose one of {DECODERS}")
    columns = check_names(list(cfg.columns), "precompute columns")
    source = open_source(cfg.data, "train", cfg.limit)
    k, label_codecs = _label_kind(cfg, source.num_classes)  # sampled: k is S, the slots per view
    recipe: Recipe = load_recipe(cfg.recipe, seed=cfg.seed)
    teacher = load_teacher(
        cfg.teacher,
        source,
        device=device,
        precision=cfg.precision,
        weights=cfg.weights,
        mean=cfg.mean,
        std=cfg.std,
        class_map=cfg.class_map,
        trust_code=cfg.trust_code,
        size=recipe.size,
    )
    if layers := parse_layers(cfg.attention):
        teacher.tap(layers, cfg.attention_grid, cfg.attention_codec)
    g = recipe.group_size
    full_sample = auto_full_sample(k, source.num_classes) if cfg.full_sample is None else cfg.full_sample
    if not 0 <= full_sample <= 1:
        raise ConfigError(f"full_sample={full_sample} must be a fraction in [0, 1]")
    meta = StoreMeta(
        format_version=FORMAT_VERSION,
        backend=cfg.backend,
        recipe=recipe.digest_dict(),
        source={**source.describe(), "data": cfg.data, "limit": cfg.limit},
        teacher=teacher.identity(),
        num_classes=source.num_classes,
        k=k,
        id_dtype=np.dtype(id_dtype(source.num_classes)).name,
        views_per_epoch=views_per_epoch(recipe, len(source)),
        group_size=g,
        chunk_views=(chunk_views := _round_to_groups(cfg.chunk_views, g, "chunk_views", state)),
        logit_codec=cfg.logit_codec,
        param_packing=cfg.param_packing,
        # with every class kept (k >= classes) a full-logit sample would only duplicate the labels
        sample_views=0 if k >= source.num_classes else min(chunk_views, math.ceil(chunk_views * full_sample)),
        render={
            "device": render_device(cfg.render, device, cfg.workers),
            "decoder": cfg.decode,
            "renderer": (renderer := _renderer_of(cfg.out)),
        },
        heads=teacher.heads,
        attention=teacher.attention,
        codecs=label_codecs + columns,
        kdlib_version=__version__,
    )
    batch = _round_to_groups(cfg.batch_size, g, "batch_size", state)
    # a batch of views must fit where it is rendered: refused now, before the store is made (issue 20 row 4)
    check_fits(batch, g, source.channels, recipe.size, renderer, device, cfg.workers, cfg.render)

    if state.is_main_process:
        store = create_store(cfg.out, meta)  # refuses a store written for something else
    state.wait_for_everyone()
    if not state.is_main_process:
        store = open_store(cfg.out)

    if (
        state.is_main_process
    ):  # the index it planned with, beside the store (on disk or in its bucket): train never rescans
        save_source_index(source, f"{store.url.rstrip('/')}/index")
    # Every batch this rank still owes, over all remaining epochs: one feed (one set of workers) for the run.
    epochs = list(range(store.meta.epochs_done, cfg.epochs))
    if state.is_main_process:
        for epoch in epochs:
            store.prepare_epoch(epoch)
    state.wait_for_everyone()
    mine = [c for c in range(meta.chunks_per_epoch) if c % state.num_processes == state.process_index]
    done = {e: store.committed_chunks(e) for e in epochs}
    todo = {e: [c for c in mine if c not in done[e]] for e in epochs}
    plan = PlanParams(recipe, source.sizes(), meta.param_packing)  # packed params are quantized before rendering
    for epoch in epochs:
        if done[epoch]:  # on every rank, so that all of them refuse together
            store.check_plan(epoch, plan.epoch(epoch), done[epoch])  # a resumed epoch must not mix two plans
    batches = [Batch(e, a, b) for e in epochs for c in todo[e] for a, b in split_range(*meta.chunk_range(c), batch)]
    feed = Feed(
        ViewBatches(source, batches, recipe.size, g, plan, draft=cfg.decode == "pil-draft", renderer=renderer),
        device,
        cfg.workers,
        cfg.render,
    )
    items = iter(feed)
    for epoch in epochs:
        if todo[epoch]:
            _run_epoch(
                store,
                teacher,
                items,
                plan.epoch(epoch),
                epoch,
                todo[epoch],
                batch,
                state,
                skipped=len(mine) - len(todo[epoch]),
            )
        state.wait_for_everyone()
        if state.is_main_process:
            if not store.epoch_complete(epoch):
                raise RuntimeError(f"epoch {epoch} of {cfg.out} is incomplete after every rank finished")
            store.write_meta(store.meta.replace(epochs_done=epoch + 1))
        state.wait_for_everyone()
        store.meta = Store.read_meta(cfg.out)

    if cfg.test:  # every rank predicts its share of the test split on its device; the main process writes
        _store_test_predictions(store, teacher, cfg, recipe, state, batch)
    state.wait_for_everyone()
    store = open_store(cfg.out)
    m = store.meta
    state.print(
        f"store {store.url}: {m.epochs_done} epochs x {m.views_per_epoch} views, k={m.k}, teacher {m.teacher['id']}"
    )
    return store


def _renderer_of(url: str) -> str:
    """The renderer of the store being resumed at `url` (its pixels must not change), else the current one."""
    try:
        return Store.read_meta(url).rendered["renderer"]
    except StoreError:  # none there yet; an unreadable one is refused by create_store with its reason
        return RENDERER


def _run_epoch(
    store: Store,
    teacher: Teacher,
    items: Iterator[dict[str, Any]],
    params: dict[str, np.ndarray],
    epoch: int,
    chunks: list[int],
    batch: int,
    state: PartialState,
    skipped: int,
) -> None:
    meta = store.meta
    codecs = [c for c in active_codecs(meta) if not isinstance(c, ParamsCodec)]  # what a teacher forward fills
    total = sum(b - a for a, b in (meta.chunk_range(c) for c in chunks))
    pending: dict[int, list[dict[str, torch.Tensor]]] = {}
    writes: list[Future] = []
    desc = f"precompute epoch {epoch}" + (f" (resuming: {skipped} chunks already done)" if skipped else "")
    bar = tqdm(total=total, desc=desc, unit="view", disable=not state.is_local_main_process)
    t0, seen = time.time(), 0
    with ThreadPoolExecutor(max_workers=1) as writer:
        while seen < total:
            item = next(items)
            start, stop = item["start"], item["stop"]
            c = start // meta.chunk_views
            out = teacher.forward(item["views"])
            out.first_view = (epoch, start)  # sampled labels key their draws on the view
            cols: dict[str, torch.Tensor] = {}
            for codec in codecs:  # soft labels, heads, maps, extra kinds: on the device; the writer copies and checks
                cols.update(codec.encode(out, meta))
            a, b = meta.chunk_range(c)
            # the first sample_views views of each chunk also keep every logit (fp16), so that
            # `kdlib inspect` measures what top-k truncation costs instead of guessing
            cols.update(SAMPLE.encode_rows(out, max(0, min(a + meta.sample_views, stop) - start)))
            if epoch == 0 and start == 0 and state.is_main_process:
                store.write_pixels(item["views"][:PIXEL_SAMPLE].cpu().numpy(), epoch=0, start=0)
            pending.setdefault(c, []).append(cols)
            seen += stop - start
            bar.update(stop - start)
            if stop == b:  # the chunk's last batch: hand it to the writer
                parts = pending.pop(c)
                plan_cols = ParamsCodec().pack({k: v[a:b] for k, v in params.items()}, meta)
                while len(writes) >= 2:  # bound memory: at most two chunks in flight
                    writes.pop(0).result()
                writes.append(
                    writer.submit(_write_and_log, store, epoch, c, plan_cols, parts, codecs, state.process_index)
                )
        for f in writes:
            f.result()
    bar.close()
    if state.is_local_main_process:
        rate = total / max(time.time() - t0, 1e-9)
        tqdm.write(f"epoch {epoch}: {len(chunks)} chunks, {rate:.0f} views/s on rank {state.process_index}")


def _write_and_log(
    store: Store,
    epoch: int,
    chunk: int,
    cols: dict[str, Any],
    parts: list[dict[str, torch.Tensor]],
    codecs: list,
    rank: int,
) -> None:
    """In the writer thread: the device-to-host copy of the chunk's labels, the checks, the write, the commit."""
    host = {k: torch.cat([p[k] for p in parts]).cpu().numpy() for k in parts[0]}
    for codec in codecs:
        codec.check(host, store.meta)
    cols.update(host)
    store.write_chunk(epoch, chunk, cols)
    store.log_chunk(epoch, chunk, rank, teacher_batches=len(parts))


def _store_test_predictions(
    store: Store, teacher: Teacher, cfg: PrecomputeConfig, recipe: Recipe, state: PartialState, batch: int
) -> None:
    try:
        test = open_source(cfg.data, "test", cfg.limit)
    except Exception as exc:  # a source without a test split still makes a valid store
        if state.is_main_process:
            print(f"note: no test split for {cfg.data} ({exc}); eval will not report teacher agreement")
        return
    if store.meta.test is not None and store.meta.test["source"]["fingerprint"] == test.fingerprint():
        return
    n, world, device = len(test), state.num_processes, state.device
    share = -(-n // world)
    lo, hi = min(n, state.process_index * share), min(n, (state.process_index + 1) * share)
    params = FixedParams(center_params(test.sizes(), np.arange(n), recipe.center_fraction))
    batches = [Batch(0, a, b) for a, b in split_range(lo, hi, batch)]
    feed = Feed(
        ViewBatches(
            test,
            batches,
            recipe.size,
            1,
            params,
            draft=cfg.decode == "pil-draft",
            renderer=store.meta.rendered["renderer"],
        ),
        device,
        cfg.workers,
        cfg.render,
    )
    parts = [
        encode(teacher.logits(item["views"]), store.meta.k)
        for item in tqdm(feed, desc="teacher on test split", unit="batch", disable=not state.is_local_main_process)
    ]
    k = min(store.meta.k, store.meta.num_classes)
    # ids as int64 and values as float32 for the collective (not every backend moves uint16 / fp16);
    # equal shares, the last one padded, cut back to n after the gather
    cols = {
        "ids": torch.zeros((share, k), dtype=torch.int64, device=device),
        "logits": torch.zeros((share, k), dtype=torch.float32, device=device),
        "lse": torch.zeros(share, dtype=torch.float32, device=device),
    }
    for name, col in cols.items():
        if parts:
            mine = torch.cat([p[name] for p in parts])
            col[: len(mine)] = mine.to(col.dtype)
        if world > 1:
            cols[name] = gather(col)
    if state.is_main_process:
        labels = {
            "ids": cols["ids"][:n].to(getattr(torch, store.meta.id_dtype)),
            "logits": cols["logits"][:n].to(torch.float16),
            "lse": cols["lse"][:n],
        }
        store.write_test(
            {c: v.cpu().numpy() for c, v in to_codec(labels, store.meta.logit_codec).items()}, test.describe()
        )
        # the views they were made on, so that eval measures agreement on these very views (a store
        # without this record used the recipe's: eval falls back to it)
        views = {"size": recipe.size, "center_fraction": recipe.center_fraction, "decoder": cfg.decode}
        store.write_meta(store.meta.replace(test={**store.meta.test, **views}))
