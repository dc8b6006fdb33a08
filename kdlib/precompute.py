"""Precompute: run the teacher once over the planned views and store its soft labels.

1. open the source, the recipe and the teacher; create (or reopen, to resume or extend) the store;
2. for each epoch, plan it, and for every chunk not yet committed and owned by this rank:
   DataLoader workers decode and render, the teacher runs in inference mode, top-k is taken
   on the device, and a writer thread writes and commits the chunk while the teacher goes on;
3. rank 0 marks the epoch done in meta.json once every chunk of it is committed;
4. the teacher's predictions on the test split (center views) are stored too, so that
   `kdlib eval` can report a student's agreement with the teacher without loading it.

Run on many processes with `accelerate launch -m kdlib precompute ...`: each rank owns the
chunks c with c % world == rank, so the store is the same whatever the world size.
"""

from __future__ import annotations

import json
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from tqdm import tqdm  # not tqdm.auto: its asyncio tqdm iterates a DataLoader twice (tqdm#1598)

from . import __version__
from ._dist import process_state
from .errors import ConfigError
from .models import Classifier, load_model, model_id, weights_digest
from .plan import center_params, make_plan, pack_params, unpack_params, views_per_epoch
from .recipe import Recipe, load_recipe
from .softlabel import encode, id_dtype, to_codec
from .source import Source, open_source
from .store import FORMAT_VERSION, Store, StoreMeta, create_store, open_store
from .views import ViewBatches, loader, split_range

__all__ = ["PrecomputeConfig", "auto_full_sample", "precompute", "teacher_logits"]


@dataclass
class PrecomputeConfig:
    teacher: str
    data: str
    out: str
    recipe: str | None = None
    epochs: int = 1
    k: int = 10
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


def auto_full_sample(k: int, num_classes: int) -> float:
    """Default share of views that keep all logits: 1 %, less with many classes, so that the sample
    costs at most a tenth of the top-k values (ImageNet, k = 10: 0.1 %, 2 B/view instead of 20)."""
    return min(0.01, 0.1 * k / num_classes)


def teacher_logits(teacher: Classifier, views: torch.Tensor, device: torch.device) -> torch.Tensor:
    """float32 logits of uint8 views; the one way every stage runs a teacher."""
    with torch.inference_mode():
        return teacher(views.to(device, non_blocking=True)).float()


def _round_to_groups(n: int, group_size: int, what: str) -> int:
    r = max(group_size, n // group_size * group_size)
    if r != n:
        print(f"note: {what}={n} rounded to {r}, a multiple of the group size {group_size}")
    return r


def _check_teacher(teacher: Classifier, source: Source, spec: str) -> None:
    cfg = teacher.config
    if cfg["num_classes"] != source.num_classes or cfg["in_channels"] != source.channels:
        raise ConfigError(f"teacher {spec} expects {cfg['in_channels']} channel(s) and {cfg['num_classes']} "
                          f"classes; source {source.name} has {source.channels} and {source.num_classes}")


def precompute(cfg: PrecomputeConfig) -> Store:
    state = process_state()
    source = open_source(cfg.data, "train", cfg.limit)
    recipe: Recipe = load_recipe(cfg.recipe, seed=cfg.seed)
    mean, std = source.mean_std()
    teacher = load_model(cfg.teacher, num_classes=source.num_classes, in_channels=source.channels,
                         mean=mean, std=std, weights=cfg.weights)
    _check_teacher(teacher, source, cfg.teacher)
    teacher.eval().to(state.device)
    g = recipe.group_size
    k = min(cfg.k, source.num_classes)
    full_sample = auto_full_sample(k, source.num_classes) if cfg.full_sample is None else cfg.full_sample
    if not 0 <= full_sample <= 1:
        raise ConfigError(f"full_sample={full_sample} must be a fraction in [0, 1]")
    meta = StoreMeta(
        format_version=FORMAT_VERSION, backend=cfg.backend, recipe=recipe.digest_dict(),
        source={**source.describe(), "data": cfg.data, "limit": cfg.limit},
        teacher={"id": model_id(cfg.teacher), "digest": weights_digest(teacher), "arch": teacher.config["arch"],
                 "config": teacher.config},
        num_classes=source.num_classes, k=k, id_dtype=np.dtype(id_dtype(source.num_classes)).name,
        views_per_epoch=views_per_epoch(recipe, len(source)), group_size=g,
        chunk_views=(chunk_views := _round_to_groups(cfg.chunk_views, g, "chunk_views")),
        logit_codec=cfg.logit_codec, param_packing=cfg.param_packing,
        # with every class kept (k >= classes) a full-logit sample would only duplicate the labels
        sample_views=0 if k >= source.num_classes else min(chunk_views, math.ceil(chunk_views * full_sample)),
        kdlib_version=__version__)
    batch = _round_to_groups(cfg.batch_size, g, "batch_size")

    if state.is_main_process:
        store = create_store(cfg.out, meta)  # refuses a store written for something else
    state.wait_for_everyone()
    if not state.is_main_process:
        store = open_store(cfg.out)
    log_path = f"{store.root}/logs/precompute-rank{state.process_index}.jsonl"
    store.fs.makedirs(f"{store.root}/logs", exist_ok=True)

    sizes = source.sizes()
    for epoch in range(cfg.epochs):
        if epoch < store.meta.epochs_done:
            continue
        if state.is_main_process:
            store.prepare_epoch(epoch)
        state.wait_for_everyone()
        done = store.committed_chunks(epoch)
        mine = [c for c in range(meta.chunks_per_epoch) if c % state.num_processes == state.process_index]
        todo = [c for c in mine if c not in done]
        if todo:
            # packed params are quantized before rendering: the stored value is what the teacher saw
            params = unpack_params(pack_params(make_plan(recipe, sizes, epoch), meta.param_packing), meta.param_packing)
            store.check_plan(epoch, params, done)  # a resumed epoch must not mix two plans
            _run_epoch(store, teacher, source, recipe, params, epoch, todo, batch, cfg.workers, state, log_path,
                       skipped=len(mine) - len(todo))
        state.wait_for_everyone()
        if state.is_main_process:
            if not store.epoch_complete(epoch):
                raise RuntimeError(f"epoch {epoch} of {cfg.out} is incomplete after every rank finished")
            store.write_meta(store.meta.replace(epochs_done=epoch + 1))
        state.wait_for_everyone()
        store.meta = Store.read_meta(cfg.out)

    if cfg.test and state.is_main_process:
        _store_test_predictions(store, teacher, cfg, recipe, state.device, batch)
    state.wait_for_everyone()
    return open_store(cfg.out)


def _run_epoch(store: Store, teacher: Classifier, source: Source, recipe: Recipe, params: dict[str, np.ndarray],
               epoch: int, chunks: list[int], batch: int, workers: int, state: PartialState, log_path: str,
               skipped: int) -> None:
    ranges, owner = [], []
    for c in chunks:
        a, b = store.meta.chunk_range(c)
        for r in split_range(a, b, batch):
            ranges.append(r)
            owner.append(c)
    data = ViewBatches(source, ranges, recipe.size, recipe.group_size, params=params)
    pending: dict[int, list[dict[str, torch.Tensor]]] = {}
    writes: list[Future] = []
    desc = f"precompute epoch {epoch}" + (f" (resuming: {skipped} chunks already done)" if skipped else "")
    bar = tqdm(total=sum(b - a for a, b in ranges), desc=desc, unit="view", disable=not state.is_local_main_process)
    t0 = time.time()
    with ThreadPoolExecutor(max_workers=1) as writer:
        for item, c in zip(loader(data, workers), owner):
            logits = teacher_logits(teacher, item["views"], state.device)
            labels = {k: v.cpu() for k, v in to_codec(encode(logits, store.meta.k), store.meta.logit_codec).items()}
            a, b = store.meta.chunk_range(c)
            # the first sample_views views of each chunk also keep every logit (fp16), so that
            # `kdlib inspect` measures what top-k truncation costs instead of guessing
            keep = max(0, min(a + store.meta.sample_views, item["stop"]) - item["start"])
            labels["full"] = logits[:keep].clamp(-65504, 65504).half().cpu()
            pending.setdefault(c, []).append(labels)
            bar.update(item["stop"] - item["start"])
            if item["stop"] == b:  # the chunk's last batch: hand it to the writer
                parts = pending.pop(c)
                cols: dict[str, Any] = pack_params({k: v[a:b] for k, v in params.items()}, store.meta.param_packing)
                cols.update({k: torch.cat([p[k] for p in parts]).numpy() for k in parts[0]})
                while len(writes) >= 2:  # bound memory: at most two chunks in flight
                    writes.pop(0).result()
                writes.append(writer.submit(_write_and_log, store, epoch, c, cols, log_path, len(parts)))
        for f in writes:
            f.result()
    bar.close()
    if state.is_local_main_process:
        rate = sum(b - a for a, b in ranges) / max(time.time() - t0, 1e-9)
        tqdm.write(f"epoch {epoch}: {len(chunks)} chunks, {rate:.0f} views/s on rank {state.process_index}")


def _write_and_log(store: Store, epoch: int, chunk: int, cols: dict[str, np.ndarray], log_path: str,
                   batches: int) -> None:
    store.write_chunk(epoch, chunk, cols)
    with store.fs.open(log_path, "a") as f:
        f.write(json.dumps({"epoch": epoch, "chunk": chunk, "teacher_batches": batches, "time": time.time()}) + "\n")


def _store_test_predictions(store: Store, teacher: Classifier, cfg: PrecomputeConfig, recipe: Recipe,
                            device: torch.device, batch: int) -> None:
    try:
        test = open_source(cfg.data, "test", cfg.limit)
    except Exception as exc:  # a source without a test split still makes a valid store
        print(f"note: no test split for {cfg.data} ({exc}); eval will not report teacher agreement")
        return
    if store.meta.test is not None and store.meta.test["source"]["fingerprint"] == test.fingerprint():
        return
    params = center_params(test.sizes(), np.arange(len(test)), recipe.center_fraction)
    data = ViewBatches(test, split_range(0, len(test), batch), recipe.size, 1, params=params)
    parts = []
    for item in tqdm(loader(data, cfg.workers), desc="teacher on test split", unit="batch"):
        labels = encode(teacher_logits(teacher, item["views"], device), store.meta.k)
        parts.append({k: v.cpu() for k, v in to_codec(labels, store.meta.logit_codec).items()})
    store.write_test({k: torch.cat([p[k] for p in parts]).numpy() for k in parts[0]}, test.describe())
