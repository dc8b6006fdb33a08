"""GPU: one command (issue 10). On one GPU, side by side, at 224 px from 256-px JPEGs and from photo-sized
JPEGs (500x375, quality 90): the bare ceilings, kdlib's precompute / cached / online training, multi-crop,
and online KD run the standard way, with every ratio issue 10 sets a target for.

    python3 benchmarks/gpu.py                          # one H100/H200, 16 cores (sized for < 8 min; not yet run there)
    .venv/bin/python benchmarks/gpu.py --device cpu --tiny   # the same code end to end on a CPU (1-4 min)

Data: an ImageFolder per JPEG size, made here with a process pool (procedural photo-like images: smooth
colour fields at three scales plus sensor-like noise, so that the files weigh what photos weigh: ~100 KB
at 500x375 q90, as ImageNet's do; the mean size is in the result). --classes class folders (1000: the
teacher's head is ImageNet's). Models are random-init (speed does not depend on weights); the teacher is
saved once as a run directory and shared by precompute, online training, the bare forward and the
competitor. Recipe: inception crop (area 8-100 %), flip, MixUp (--mix, --mix-prob) with a partner in
groups of 8 images x 1 crop; the multi-crop recipe is the same with 4 images x --crops crops.

Measured in each of --rounds rounds (parts and datasets interleaved A,B / B,A), per JPEG size:

- bare ceilings, on the device, no data loading: the teacher forward (`kdlib.teacher.teacher_logits`,
  bf16 + channels_last on CUDA) on uint8 224-px batches already on the device; one student step (forward,
  KL, backward, clip 1.0, AdamW; bf16 autocast + channels_last on CUDA, as `train` runs it) on the same
  batch; ideal speed-up of a cache over online KD = (t_teacher + t_student) / t_student.
- kdlib's loader alone: `kdlib.feed.Feed` over `ViewBatches` of a plan (workers decode, the views are
  rendered on the device), no model, --epochs epochs.
- render alone: `kdlib.render.render_decoded` on decoded batches already on the device; and with the
  pinned host-to-device copy of the decoded batch in front of it (what the feed adds per batch).
- `kdlib.precompute.precompute` (1 epoch, fresh store each round) vs the bare teacher: target >= 0.9.
- `kdlib.train.train` from a store (cached) vs the bare student step: target >= 0.9.
- `train` with the teacher in memory (online); cached / online vs the ideal speed-up: target >= 0.9.
- the competitor: online KD as timm runs it: torchvision `ImageFolder` + RandomResizedCrop + flip +
  ToTensor + Normalize, `DataLoader` (--workers workers, pinned memory, persistent workers, shuffle), the
  same teacher and student nets, bf16 autocast + channels_last, no_grad teacher, KL, clip, AdamW (no host
  sync per step); cached / competitor vs the ideal speed-up: target >= 0.9.
- whole-epoch vs steady rate of cached and online training: target >= 0.9, judged on the epochs after the
  first (one feed serves a run, so later epochs are what a long run is made of); the first epoch's rate and
  its start-up seconds (worker start, first batches) are shown beside it. On epochs as short as the
  defaults', the workers' prefetch during the epoch-end checkpoint (outside the loop's clock) can lift a
  later epoch above the steady rate; raise --images for a tighter check.
- photo-sized JPEGs only: cached training from a c = --crops store (images decoded once per c views) vs
  plain CE training (`train(loss="ce")`, c = 1) from the same JPEGs: target >= 1.19x (FKD's gain).

Steady rates: each loop's steps are timestamped (kdlib's loops: a subclass of the progress bar they use,
which records each `update`), with one device synchronisation at the first and the last stamp of the
window only (no per-step sync); the window leaves out the first --skip steps of each epoch (default
workers + 2: the first batch of every worker arrives at once, a burst that would flatter the rate).
Whole-epoch rates: `metrics.jsonl` of train, precompute's own printed epoch rate, the loader's wall time.
Start-up outside the loops (opening the source, building models) is not timed; the per-image mean/std that
`train` and `precompute` compute on every call (up to 2000 full decodes) is memoised across calls here.
Ratios are the median over rounds of each round's own ratio. Every size is a flag; --only picks parts;
--max-minutes (7.5) starts no round that would end past it, and the result says how many rounds ran.
Writes <--out-dir>/gpu-<card>.json (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import multiprocessing as mp
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import _common as C
import numpy as np

PARTS = ("bare", "loader", "render", "precompute", "cached", "online", "competitor", "multicrop")
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
TARGETS = {"precompute": 0.9, "cached": 0.9, "online_eff": 0.9, "competitor_eff": 0.9, "whole": 0.9, "multicrop": 1.19}
# full (one H100/H200, 16 cores) and --tiny (a CPU, a few dozen images) defaults
SIZES = {
    "images": (8192, 48),
    "batch_size": (256, 16),
    "workers": (14, 2),
    "teacher": ("resnet50", "resnet14"),
    "student": ("resnet18", "resnet8"),
    "classes": (1000, 10),
    "size": (224, 64),
    "jpegs": ("256x256,500x375", "80x80,160x120"),
    "rounds": (2, 1),
    "epochs": (2, 2),
    "bare_steps": (20, 2),
}


# -- data ----------------------------------------------------------------------------------
_NOISE: dict[tuple[int, int], np.ndarray] = {}


def _photo(seed: int, w: int, h: int) -> np.ndarray:
    """uint8 [h, w, 3]: colour fields at three scales + noise (one noise plane per process, shifted per image)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    if (w, h) not in _NOISE:
        _NOISE[(w, h)] = np.random.default_rng(w * 7919 + h).normal(0, 20, (h + 97, w + 97, 3)).astype(np.float32)
    y, x = rng.integers(0, 97, 2)
    out = _NOISE[(w, h)][y : y + h, x : x + w] + 128.0
    for cells, amp in ((4, 90), (16, 45), (64, 25)):
        grid = rng.integers(0, 256, (max(2, cells * h // w), cells, 3), dtype=np.uint8)
        up = np.asarray(Image.fromarray(grid).resize((w, h), Image.BICUBIC), np.float32)
        out += (amp / 127.5) * (up - 127.5)
    return np.clip(out, 0, 255).astype(np.uint8)


def _write_jpeg(job: tuple[str, int, int, int, int]) -> int:
    from PIL import Image

    path, seed, w, h, quality = job
    Image.fromarray(_photo(seed, w, h)).save(path, quality=quality)
    return os.path.getsize(path)


def make_jpegs(root: Path, n: int, w: int, h: int, classes: int, quality: int, procs: int) -> dict[str, Any]:
    """An ImageFolder of n JPEGs of w x h in `classes` folders, written by a process pool."""
    t0 = time.perf_counter()
    for c in range(min(classes, n)):
        (root / f"c{c:04d}").mkdir(parents=True, exist_ok=True)
    jobs = [(str(root / f"c{i % classes:04d}" / f"{i:06d}.jpg"), w * 1_000_003 + i, w, h, quality) for i in range(n)]
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    with ctx.Pool(max(1, procs)) as pool:
        sizes = pool.map(_write_jpeg, jobs, chunksize=max(1, n // (8 * max(1, procs))))
    return {
        "root": str(root),
        "images": n,
        "width": w,
        "height": h,
        "quality": quality,
        "mean_kb": float(np.mean(sizes)) / 1e3,
        "seconds": time.perf_counter() - t0,
    }


# -- clocks --------------------------------------------------------------------------------
class Stamps:
    """Timestamps of one loop (one epoch): t[i] after step i, n[i] views of step i; the device is
    synchronised before stamp `skip` and before the last stamp only."""

    def __init__(self, skip: int, total_steps: int | None, sync: Callable[[], None]) -> None:
        self.t: list[float] = []
        self.n: list[int] = []
        self.skip, self.total, self.sync = skip, total_steps, sync
        self.t0 = time.perf_counter()

    def step(self, n: int) -> None:
        if len(self.t) == self.skip or (self.total is not None and len(self.t) + 1 >= self.total):
            self.sync()
        self.t.append(time.perf_counter())
        self.n.append(n)


def steady(runs: list[Stamps], skip: int) -> float:
    """Views/s over every epoch's steps after stamp `skip` (fewer steps: after the second-to-last)."""
    views, secs = 0, 0.0
    for run in runs:
        if len(run.t) < 2:
            continue
        k = min(skip, len(run.t) - 2)
        views += sum(run.n[k + 1 :])
        secs += run.t[-1] - run.t[k]
    return views / secs if secs > 0 else float("nan")


@contextlib.contextmanager
def bar_clock(module: Any, skip: int, batch: int, sync: Callable[[], None]) -> Iterator[list[Stamps]]:
    """Stamps of a kdlib loop: its progress-bar class (`module.tqdm`) replaced by a subclass that
    records every `update` (train: one per step; precompute: one per teacher batch)."""
    base = module.tqdm
    runs: list[Stamps] = []

    class Clocked(base):  # type: ignore[misc, valid-type]
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            total = kw.get("total")
            steps = None if total is None else (total if kw.get("unit") == "step" else -(-total // batch))
            self._stamps = Stamps(skip, steps, sync)
            runs.append(self._stamps)

        def update(self, n: int = 1) -> Any:
            self._stamps.step(batch if n == 1 and getattr(self, "unit", "") == "step" else n)
            return super().update(n)

    module.tqdm = Clocked
    try:
        yield runs
    finally:
        module.tqdm = base


@contextlib.contextmanager
def memo_mean_std() -> Iterator[None]:
    """Source.mean_std memoised per (root, split, images) for the whole run: same values, decoded once."""
    from kdlib.source import Source

    original = Source.mean_std
    cache: dict[tuple, Any] = {}

    def mean_std(self):  # type: ignore[no-untyped-def]
        key = (type(self).__name__, getattr(self, "root", None), self.split, len(self))
        if key not in cache:
            cache[key] = original(self)
        return list(cache[key][0]), list(cache[key][1])

    Source.mean_std = mean_std
    try:
        yield
    finally:
        Source.mean_std = original


# -- the bench -----------------------------------------------------------------------------
class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        import torch

        self.torch, self.args, self.work = torch, args, work
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        from kdlib.precision import default_precision

        self.precision = default_precision(self.device)
        self.mixed = "bf16" if self.cuda else "no"
        self.batch = args.batch_size

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def clean(self) -> None:
        gc.collect()
        if self.cuda:
            self.torch.cuda.empty_cache()

    def skip(self, steps: int) -> int:
        s = self.args.skip if self.args.skip is not None else self.args.workers + 2
        return max(0, min(s, steps // 2))

    # recipes and models
    def recipes(self) -> tuple[str, str]:
        from kdlib.recipe import Recipe

        base = Recipe(
            name="gpu-c1",
            size=self.args.size,
            crop="inception",
            scale=(0.08, 1.0),
            flip=True,
            mix=self.args.mix,
            mix_prob=self.args.mix_prob,
            lam="maxbeta",
            images_per_group=8,
            crops_per_image=1,
            seed=0,
        )
        multi = base.replace(name=f"gpu-c{self.args.crops}", images_per_group=4, crops_per_image=self.args.crops)
        paths = []
        for r in (base, multi):
            p = self.work / f"{r.name}.json"
            p.write_text(json.dumps(r.to_dict(), indent=1))
            paths.append(str(p))
        return paths[0], paths[1]

    def save_teacher(self) -> str:
        from kdlib.models import build_model
        from kdlib.rundir import save_model

        self.torch.manual_seed(0)
        out = self.work / "teacher"
        save_model(build_model(self.args.teacher, self.args.classes, 3, IMAGENET_MEAN, IMAGENET_STD), out)
        return str(out)

    # bare ceilings
    def bare(self, teacher_dir: str) -> dict[str, float]:
        torch = self.torch
        from kdlib.losses import get_loss
        from kdlib.models import build_model
        from kdlib.precision import precision_context, prepare_model, teacher_logits
        from kdlib.resolve import load_model

        dev, steps = self.device, self.args.bare_steps
        g = torch.Generator().manual_seed(0)
        views = torch.randint(0, 256, (self.batch, 3, self.args.size, self.args.size), dtype=torch.uint8, generator=g)
        views = views.to(dev)
        if self.cuda:
            views = views.contiguous(memory_format=torch.channels_last)
        teacher = prepare_model(load_model(teacher_dir).eval(), dev)
        student = build_model(self.args.student, self.args.classes, 3, IMAGENET_MEAN, IMAGENET_STD).to(dev)
        if self.cuda:
            student = student.to(memory_format=torch.channels_last)
        student.train()
        target = teacher_logits(teacher, views, dev, self.precision).clone()
        kl = get_loss("kl", temperature=1.0)
        opt = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=5e-4)

        def teacher_step() -> None:
            teacher_logits(teacher, views, dev, self.precision)

        def student_step() -> None:
            with precision_context(self.precision, dev):
                logits = student(views)
            loss = kl(logits.float(), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()

        out = {}
        for name, fn in (("teacher", teacher_step), ("student", student_step)):
            for _ in range(3):
                fn()
            self.sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            self.sync()
            out[f"{name}_s_per_batch"] = (time.perf_counter() - t0) / steps
            out[f"{name}_views_per_s"] = self.batch / out[f"{name}_s_per_batch"]
        out["ideal_speedup"] = (out["teacher_s_per_batch"] + out["student_s_per_batch"]) / out["student_s_per_batch"]
        del teacher, student, opt
        self.clean()
        return out

    # kdlib's loader alone
    def loader(self, data: str, recipe_path: str) -> dict[str, Any]:
        from kdlib.feed import Feed
        from kdlib.plan import views_per_epoch
        from kdlib.recipe import load_recipe
        from kdlib.source import open_source
        from kdlib.views import Batch, PlanParams, ViewBatches, split_range

        recipe = load_recipe(recipe_path)
        source = open_source(data, "train")
        steps = views_per_epoch(recipe, len(source)) // self.batch
        epochs = self.args.epochs
        batches = [Batch(e, a, b) for e in range(epochs) for a, b in split_range(0, steps * self.batch, self.batch)]
        feed = Feed(
            ViewBatches(source, batches, recipe.size, recipe.group_size, PlanParams(recipe, source.sizes())),
            self.device,
            self.args.workers,
        )
        skip = self.skip(steps)
        runs = []
        t_start = time.perf_counter()
        it = iter(feed)
        for _ in range(epochs):
            st = Stamps(skip, steps, self.sync)
            for _ in range(steps):
                item = next(it)
                assert item["views"].dtype == self.torch.uint8
                st.step(self.batch)
            runs.append(st)
        del it, feed
        first = runs[0].t[-1] - t_start
        later = [r.t[-1] - p.t[-1] for p, r in zip(runs, runs[1:])]
        return {
            "steady_views_per_s": steady(runs, skip),
            "place": "device" if self.cuda else "workers",
            "epoch0_views_per_s": steps * self.batch / first,
            "later_views_per_s": (len(later) * steps * self.batch / sum(later)) if later else None,
            "whole_views_per_s": epochs * steps * self.batch / (runs[-1].t[-1] - t_start),
            "steps": steps,
        }

    # render alone
    def render_items(self, data: str, recipe_path: str, n: int = 3) -> list[dict[str, Any]]:
        from kdlib.recipe import load_recipe
        from kdlib.source import open_source
        from kdlib.views import Batch, PlanParams, ViewBatches, split_range

        recipe = load_recipe(recipe_path)
        source = open_source(data, "train")
        ranges = split_range(0, len(source) // recipe.images_per_group * recipe.group_size, self.batch)[:n]
        ds = ViewBatches(
            source,
            [Batch(0, a, b) for a, b in ranges if b - a == self.batch],
            recipe.size,
            recipe.group_size,
            PlanParams(recipe, source.sizes()),
            stage="device",  # the worker's half only: decoded images and the host-side render tensors
        )
        items = [ds[i] for i in range(len(ds))]
        return [{"render": it["render"], "decoded": it["decoded"], "size": recipe.size} for it in items]

    def render(self, items: list[dict[str, Any]]) -> dict[str, float]:
        from kdlib.render import render_decoded

        dev, reps = self.device, max(3, self.args.bare_steps)
        on_dev = [({k: v.to(dev) for k, v in it["render"].items()}, it["decoded"].to(dev), it["size"]) for it in items]
        host = [
            (
                {k: (v.pin_memory() if self.cuda else v) for k, v in it["render"].items()},
                it["decoded"].pin_memory() if self.cuda else it["decoded"],
                it["size"],
            )
            for it in items
        ]
        out = {}
        for name, batches, copy in (("render", on_dev, False), ("copy_render", host, True)):

            def once(i: int) -> None:
                p, d, size = batches[i % len(batches)]
                if copy:
                    p = {k: v.to(dev, non_blocking=True) for k, v in p.items()}
                    d = d.to(dev, non_blocking=True)
                render_decoded(p, d, size)

            for i in range(2):
                once(i)
            self.sync()
            t0 = time.perf_counter()
            for i in range(reps):
                once(i)
            self.sync()
            out[f"{name}_views_per_s"] = reps * self.batch / (time.perf_counter() - t0)
        del on_dev, host
        self.clean()
        return out

    # kdlib precompute
    def precompute(self, data: str, recipe: str, teacher: str, out: Path, limit: int | None = None) -> dict[str, Any]:
        pre = importlib.import_module("kdlib.precompute")  # the module (kdlib.precompute is its function)
        from kdlib.plan import views_per_epoch
        from kdlib.recipe import load_recipe

        n = views_per_epoch(load_recipe(recipe), min(limit or 1 << 62, self.images_of(data)))
        skip = self.skip(-(-n // self.batch))
        cfg = pre.PrecomputeConfig(
            teacher=teacher,
            data=data,
            recipe=recipe,
            out=str(out),
            epochs=1,
            k=10,
            batch_size=self.batch,
            workers=self.args.workers,
            limit=limit,
            test=False,
        )
        t0 = time.perf_counter()
        with C.quiet() as log, bar_clock(pre, skip, self.batch, self.sync) as runs:
            pre.precompute(cfg)
        wall = time.perf_counter() - t0
        found = re.findall(r"epoch \d+: \d+ chunks, ([\d.]+) views/s", log.getvalue())
        run = max(runs, key=lambda r: len(r.t))
        self.clean()
        return {
            "steady_views_per_s": steady([run], skip),
            "epoch_views_per_s": float(found[-1]) if found else None,
            "call_wall_s": wall,
            "views": n,
        }

    def images_of(self, data: str) -> int:
        return sum(len(files) for _, _, files in os.walk(data))

    # kdlib train
    def train(self, out: Path, **kw: Any) -> dict[str, Any]:
        tr = importlib.import_module("kdlib.train")  # the module (kdlib.train is its function)

        cfg = tr.TrainConfig(
            out=str(out),
            student=self.args.student,
            epochs=self.args.epochs,
            batch_size=self.batch,
            workers=self.args.workers,
            eval=False,
            checkpoint_every=0,
            mixed_precision=self.mixed,
            cpu=not self.cuda,
            **kw,
        )
        steps_guess = self.args.images // self.batch
        skip = self.skip(steps_guess)
        t0 = time.perf_counter()
        with C.quiet(), bar_clock(tr, skip, self.batch, self.sync) as runs:
            tr.train(cfg)
        wall = time.perf_counter() - t0
        recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
        recs = [r for r in recs if "views_per_s" in r]
        shutil.rmtree(out, ignore_errors=True)
        self.clean()
        v0, s0 = recs[0]["steps"] * self.batch, recs[0]["seconds"]
        later_v = sum(r["steps"] * self.batch for r in recs[1:])
        later_s = sum(r["seconds"] for r in recs[1:])
        rate = steady(runs, skip)
        return {
            "steady_views_per_s": rate,
            "epoch0_views_per_s": v0 / s0,
            "later_views_per_s": later_v / later_s if later_s else None,
            "startup_s": s0 - v0 / rate,
            "whole_views_per_s": (v0 + later_v) / (s0 + later_s),
            "per_epoch_views_per_s": [r["views_per_s"] for r in recs],
            "call_wall_s": wall,
        }

    # the competitor: online KD the standard way
    def competitor(self, data: str, teacher_dir: str) -> dict[str, Any]:
        torch = self.torch
        import torchvision
        from torch.utils.data import DataLoader
        from torchvision import transforms as T

        from kdlib.losses import get_loss
        from kdlib.models import build_model
        from kdlib.precision import precision_context
        from kdlib.resolve import load_model

        dev = self.device
        to_tensor = (
            T.ToTensor() if hasattr(T, "ToTensor") else T.Compose([T.PILToTensor(), T.ConvertImageDtype(torch.float32)])
        )
        tf = T.Compose(
            [
                T.RandomResizedCrop(self.args.size),
                T.RandomHorizontalFlip(),
                to_tensor,
                T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )
        ds = torchvision.datasets.ImageFolder(data, transform=tf)
        w = self.args.workers
        dl = DataLoader(
            ds,
            batch_size=self.batch,
            shuffle=True,
            num_workers=w,
            pin_memory=self.cuda,
            drop_last=True,
            persistent_workers=w > 0,
            generator=torch.Generator().manual_seed(0),
        )
        teacher = load_model(teacher_dir).net.to(dev).eval()
        torch.manual_seed(0)
        student = build_model(self.args.student, self.args.classes, 3, IMAGENET_MEAN, IMAGENET_STD).net.to(dev)
        if self.cuda:
            teacher = teacher.to(memory_format=torch.channels_last)
            student = student.to(memory_format=torch.channels_last)
        student.train()
        kl = get_loss("kl", temperature=1.0)
        opt = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=5e-4)
        steps = len(dl)
        skip = self.skip(steps)
        runs = []
        t_start = time.perf_counter()
        epoch_s = []
        for _ in range(self.args.epochs):
            t_e = time.perf_counter()
            st = Stamps(skip, steps, self.sync)
            for x, _y in dl:
                x = x.to(dev, non_blocking=True)
                if self.cuda:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.no_grad(), precision_context(self.precision, dev):
                    t = teacher(x)
                with precision_context(self.precision, dev):
                    s = student(x)
                loss = kl(s.float(), t.float())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
                opt.step()
                st.step(self.batch)
            runs.append(st)
            epoch_s.append(st.t[-1] - t_e)
        total = time.perf_counter() - t_start
        del dl, teacher, student, opt
        self.clean()
        later = sum(epoch_s[1:])
        return {
            "steady_views_per_s": steady(runs, skip),
            "epoch0_views_per_s": steps * self.batch / epoch_s[0],
            "later_views_per_s": (len(epoch_s) - 1) * steps * self.batch / later if later else None,
            "whole_views_per_s": len(epoch_s) * steps * self.batch / total,
        }


# -- summary -------------------------------------------------------------------------------
def med(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None and x == x]
    return C.median(xs) if xs else None


def per_round(a: list[dict] | None, b: list[dict] | None, f: Callable[[dict, dict], float | None]) -> list:
    if not a or not b:
        return []
    return [f(x, y) for x, y in zip(a, b)]


def verdict(value: float | None, target: float, cuda: bool) -> str:
    if value is None:
        return "—"
    if not cuda:
        return f">= {target}: n/a on CPU"
    return f">= {target}: {'met' if value >= target else 'MISSED'}"


def summarize(runs: dict[str, Any], sets: list[str], cuda: bool) -> tuple[list[list[Any]], dict[str, Any]]:
    bare = runs.get("bare") or []
    rows: list[list[Any]] = []
    summary: dict[str, Any] = {}

    def get(d: str, part: str) -> list[dict]:
        return runs["sets"][d].get(part) or []

    def row(
        label: str,
        values: dict[str, float | None],
        target: float | None = None,
        key: str | None = None,
        fmt: Callable[[float], str] = lambda v: f"{v:,.0f}",
    ) -> None:
        cells = [label] + ["—" if values.get(d) is None else fmt(values[d]) for d in sets]
        if target is None:
            cells.append("")
        else:
            shown = [values.get(d) for d in sets if values.get(d) is not None]
            worst = min(shown) if shown else None
            cells.append(verdict(worst, target, cuda))
        rows.append(cells)
        if key:
            summary[key] = {d: values.get(d) for d in sets}
            if target is not None:
                summary[key]["target"] = target
                summary[key]["met"] = (
                    None if not cuda else all(v >= target for v in values.values() if v is not None) if values else None
                )

    def per_set(part: str, field: str) -> dict[str, float | None]:
        """`field` of `part`'s runs, the median over rounds, for each JPEG set."""
        return {d: med([x[field] for x in get(d, part)]) for d in sets}

    ratio = lambda v: f"{v:.3f}"  # noqa: E731
    speed = lambda v: f"{v:.2f}x"  # noqa: E731
    t_views = med([b["teacher_views_per_s"] for b in bare])
    s_views = med([b["student_views_per_s"] for b in bare])
    ideal = med([b["ideal_speedup"] for b in bare])
    row("bare teacher forward, uint8 batches on the device, views/s", {d: t_views for d in sets}, key="bare_teacher")
    row("bare student step (fwd, KL, bwd, clip, AdamW), views/s", {d: s_views for d in sets}, key="bare_student")
    row("ideal speed-up (t_teacher + t_student) / t_student", {d: ideal for d in sets}, key="ideal", fmt=speed)
    row(
        "kdlib loader alone (Feed, no model), steady views/s",
        per_set("loader", "steady_views_per_s"),
        key="loader_steady",
    )
    row(
        "kdlib loader alone, whole run (incl. worker start), views/s",
        per_set("loader", "whole_views_per_s"),
        key="loader_whole",
    )
    row("render alone (decoded batch on the device), views/s", per_set("render", "render_views_per_s"), key="render")
    row(
        "pinned copy of the decoded batch + render, views/s",
        per_set("render", "copy_render_views_per_s"),
        key="copy_render",
    )
    row("precompute, steady views/s", per_set("precompute", "steady_views_per_s"), key="precompute_steady")
    row(
        "precompute, its own epoch rate (incl. start-up, writes), views/s",
        per_set("precompute", "epoch_views_per_s"),
        key="precompute_epoch",
    )
    row(
        "precompute / bare teacher (per round)",
        {
            d: med(
                per_round(get(d, "precompute"), bare, lambda a, b: a["steady_views_per_s"] / b["teacher_views_per_s"])
            )
            for d in sets
        },
        TARGETS["precompute"],
        "precompute_vs_bare",
        ratio,
    )
    row("cached train, steady views/s", per_set("cached", "steady_views_per_s"), key="cached_steady")
    row(
        "cached train / bare student step (per round)",
        {
            d: med(per_round(get(d, "cached"), bare, lambda a, b: a["steady_views_per_s"] / b["student_views_per_s"]))
            for d in sets
        },
        TARGETS["cached"],
        "cached_vs_bare",
        ratio,
    )
    row(
        "online train (teacher in memory), steady views/s", per_set("online", "steady_views_per_s"), key="online_steady"
    )
    for base, label in (("online", "online"), ("competitor", "competitor")):
        if base == "competitor":
            row(
                "competitor: online KD, torchvision ImageFolder loader, steady views/s",
                per_set("competitor", "steady_views_per_s"),
                key="competitor_steady",
            )
        row(
            f"cached / {label}, measured speed-up",
            {
                d: med(
                    per_round(
                        get(d, "cached"), get(d, base), lambda a, b: a["steady_views_per_s"] / b["steady_views_per_s"]
                    )
                )
                for d in sets
            },
            key=f"cached_over_{base}",
            fmt=speed,
        )
        eff = {}
        for d in sets:
            c, o = get(d, "cached"), get(d, base)
            eff[d] = (
                med(
                    [
                        x["steady_views_per_s"] / y["steady_views_per_s"] / b["ideal_speedup"]
                        for x, y, b in zip(c, o, bare)
                    ]
                )
                if c and o and bare
                else None
            )
        row(
            f"(cached / {label}) / ideal",
            eff,
            TARGETS[f"{base}_eff"],
            "online_efficiency" if base == "online" else "competitor_efficiency",
            ratio,
        )
    for name in ("cached", "online"):
        row(
            f"{name} train: whole epoch / steady, epochs after the first",
            {
                d: med(
                    [
                        x["later_views_per_s"] / x["steady_views_per_s"] if x["later_views_per_s"] else None
                        for x in get(d, name)
                    ]
                )
                for d in sets
            },
            TARGETS["whole"],
            f"{name}_whole_vs_steady",
            ratio,
        )
        row(
            f"{name} train: first epoch / steady (start-up, s)",
            {d: med([x["epoch0_views_per_s"] / x["steady_views_per_s"] for x in get(d, name)]) for d in sets},
            key=f"{name}_first_epoch_vs_steady",
            fmt=lambda v, name=name: f"{v:.3f}",
        )
        summary[f"{name}_startup_s"] = {d: med([x["startup_s"] for x in get(d, name)]) for d in sets}
        rows[-1][1 : 1 + len(sets)] = [
            c if c == "—" else f"{c} ({summary[f'{name}_startup_s'][d]:.1f} s)" for c, d in zip(rows[-1][1:], sets)
        ]
    row(
        "competitor: whole epoch / steady, epochs after the first",
        {
            d: med(
                [
                    x["later_views_per_s"] / x["steady_views_per_s"] if x["later_views_per_s"] else None
                    for x in get(d, "competitor")
                ]
            )
            for d in sets
        },
        key="competitor_whole_vs_steady",
        fmt=ratio,
    )
    mc = per_set("multicrop", "steady_views_per_s")
    if any(v is not None for v in mc.values()):
        crops = runs.get("crops", 4)
        row(f"cached train, c = {crops} crops per image, steady views/s", mc, key="multicrop_steady")
        row("plain CE train (c = 1, labels), steady views/s", per_set("ce", "steady_views_per_s"), key="ce_steady")
        row(
            f"cached c = {crops} / plain CE c = 1 (per round)",
            {
                d: med(
                    per_round(
                        get(d, "multicrop"),
                        get(d, "ce"),
                        lambda a, b: a["steady_views_per_s"] / b["steady_views_per_s"],
                    )
                )
                for d in sets
            },
            TARGETS["multicrop"],
            "multicrop_over_ce",
            speed,
        )
        row(
            f"precompute of the c = {crops} store (once, set-up), steady views/s",
            {d: (runs["sets"][d].get("multicrop_store") or {}).get("steady_views_per_s") for d in sets},
            key="multicrop_precompute",
        )
    rows = [r for r in rows if any(c != "—" for c in r[1 : 1 + len(sets)])]  # parts left out by --only
    return rows, summary


# -- main ----------------------------------------------------------------------------------
def card_name(device: Any, tiny: bool) -> str:
    import torch

    if device.type != "cuda":
        return f"{device.type}{'-tiny' if tiny else ''}"
    name = torch.cuda.get_device_name(device).lower()
    m = re.search(r"\b([a-z]{1,2}\d{2,4}[a-z]?)\b", name)
    card = m.group(1) if m else re.sub(r"[^a-z0-9]+", "-", name).strip("-")
    return card + ("-tiny" if tiny else "")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cuda:N or cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes for a CPU check (every default below shrinks)")
    ap.add_argument("--images", type=int, help="JPEGs per size (views per epoch) [8192; tiny 48]")
    ap.add_argument("--batch-size", type=int, help="[256; tiny 16]")
    ap.add_argument("--workers", type=int, help="DataLoader workers, kdlib and the competitor alike [14; tiny 2]")
    ap.add_argument("--teacher", help="teacher architecture (random init) [resnet50; tiny resnet14]")
    ap.add_argument("--student", help="student architecture [resnet18; tiny resnet8]")
    ap.add_argument("--classes", type=int, help="class folders and model heads [1000; tiny 10]")
    ap.add_argument("--size", type=int, help="view size, px [224; tiny 64]")
    ap.add_argument(
        "--jpegs",
        help="JPEG sizes WxH, comma-separated [256x256,500x375; tiny 80x80,160x120]; "
        "the multi-crop rows run on the last",
    )
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--rounds", type=int, help="[2; tiny 1]")
    ap.add_argument("--epochs", type=int, help="epochs per training / loader run (>= 2 for whole-epoch rows) [2]")
    ap.add_argument("--bare-steps", type=int, help="timed batches per bare measurement [20; tiny 2]")
    ap.add_argument(
        "--skip",
        type=int,
        default=None,
        help="steps of each epoch left out of steady rates [workers + 2, at most half the epoch]",
    )
    ap.add_argument("--crops", type=int, default=4, help="crops per image of the multi-crop store")
    ap.add_argument("--mix", default="mixup", choices=["none", "mixup", "cutmix", "both"])
    ap.add_argument("--mix-prob", type=float, default=1.0)
    ap.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {','.join(PARTS)}")
    ap.add_argument(
        "--max-minutes",
        type=float,
        default=7.5,
        help="start no round that the last one's length says would end after this (0: no limit)",
    )
    ap.add_argument("--jpeg-procs", type=int, default=None, help="processes making the JPEGs [all CPUs]")
    ap.add_argument("--keep", default=None, help="work directory to keep (JPEGs, stores; reused if present)")
    ap.add_argument("--out-dir", default=str(C.RESULTS), help="where gpu-<card>.json goes")
    ap.add_argument("--out", default=None, help="result JSON path (overrides --out-dir)")
    args = ap.parse_args()
    for key, (full, tiny) in SIZES.items():
        if getattr(args, key) is None:
            setattr(args, key, tiny if args.tiny else full)
    args.only = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = sorted(set(args.only) - set(PARTS))
    if unknown:
        ap.error(f"--only: unknown part(s) {unknown}; choose from {PARTS}")
    return args


def main() -> None:
    args = parse_args()
    t_begin = time.perf_counter()
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no CUDA device; use --device cpu --tiny for a CPU check")
    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "1"  # precompute's process state stays on the CPU too
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)

    work = C.tmpdir(args.keep, "gpu")
    try:
        run(args, work, device, t_begin)
    finally:
        if not args.keep:  # also when a run fails: the JPEGs and stores are large
            shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path, device: Any, t_begin: float) -> None:
    sets: list[str] = [s.strip() for s in args.jpegs.split(",") if s.strip()]
    procs = args.jpeg_procs or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    data: dict[str, dict[str, Any]] = {}
    for s in sets:
        w, h = (int(v) for v in s.split("x"))
        root = work / f"jpeg-{s}"
        if root.is_dir() and sum(1 for _ in root.rglob("*.jpg")) == args.images:
            data[s] = {
                "root": str(root),
                "images": args.images,
                "width": w,
                "height": h,
                "quality": args.quality,
                "mean_kb": float(np.mean([p.stat().st_size for p in root.rglob("*.jpg")])) / 1e3,
                "seconds": 0,
            }
        else:
            shutil.rmtree(root, ignore_errors=True)
            data[s] = make_jpegs(root, args.images, w, h, args.classes, args.quality, procs)
        print(
            f"{s}: {args.images} JPEGs, mean {data[s]['mean_kb']:.1f} KB, made in {data[s]['seconds']:.1f} s",
            flush=True,
        )

    machine = C.machine_info()
    bench = Bench(args, work)
    base_recipe, multi_recipe = bench.recipes()
    teacher_dir = bench.save_teacher()
    cuda = bench.cuda
    print(
        f"device {C.device_label(machine)}: teacher {args.teacher} and student {args.student} in "
        f"{bench.precision}{' + channels_last' if cuda else ''}, batch {args.batch_size}, {args.workers} workers, "
        f"{args.images} images x {args.epochs} epochs per run, {args.rounds} round(s)",
        flush=True,
    )

    def elapsed() -> str:
        return f"[{time.perf_counter() - t_begin:5.0f} s]"

    runs: dict[str, Any] = {"bare": [], "crops": args.crops, "sets": {s: {} for s in sets}}
    photo = sets[-1]
    with memo_mean_std():
        # set-up: the stores cached training replays (also the run's warm-up: CUDA, cuDNN, page cache)
        stores: dict[str, Path] = {}
        if "cached" in args.only:
            for s in sets:
                stores[s] = work / f"store-{s}"
                shutil.rmtree(stores[s], ignore_errors=True)
                r = bench.precompute(data[s]["root"], base_recipe, teacher_dir, stores[s])
                print(
                    f"{elapsed()} set-up: store for {s} ({r['views']} views), {r['steady_views_per_s']:.0f} views/s",
                    flush=True,
                )
        if "multicrop" in args.only:
            multi_store = work / f"store-{photo}-c{args.crops}"
            shutil.rmtree(multi_store, ignore_errors=True)
            r = bench.precompute(
                data[photo]["root"], multi_recipe, teacher_dir, multi_store, limit=max(4, args.images // args.crops)
            )
            runs["sets"][photo]["multicrop_store"] = r
            print(
                f"{elapsed()} set-up: c = {args.crops} store for {photo} ({r['views']} views), "
                f"{r['steady_views_per_s']:.0f} views/s",
                flush=True,
            )
        render_items = (
            {s: bench.render_items(data[s]["root"], base_recipe) for s in sets} if "render" in args.only else {}
        )

        round_s: list[float] = []
        for r in range(args.rounds):
            spent = time.perf_counter() - t_begin
            if r and args.max_minutes and spent + max(round_s) > 60 * args.max_minutes:
                print(
                    f"{elapsed()} stopping after {r} round(s): another would pass --max-minutes {args.max_minutes}",
                    flush=True,
                )
                break
            t_round = time.perf_counter()
            if "bare" in args.only:
                b = bench.bare(teacher_dir)
                runs["bare"].append(b)
                print(
                    f"{elapsed()} round {r} bare: teacher {b['teacher_views_per_s']:.0f}, student step "
                    f"{b['student_views_per_s']:.0f} views/s, ideal {b['ideal_speedup']:.2f}x",
                    flush=True,
                )
            for s in C.order(r, sets):
                root = data[s]["root"]
                parts = [p for p in PARTS[1:] if p in args.only and (p != "multicrop" or s == photo)]
                for part in C.order(r, parts):
                    out = work / f"run-{part}-{s}-{r}"
                    results: dict[str, dict] = {}
                    if part == "loader":
                        results["loader"] = bench.loader(root, base_recipe)
                    elif part == "render":
                        results["render"] = bench.render(render_items[s])
                    elif part == "precompute":
                        results["precompute"] = bench.precompute(root, base_recipe, teacher_dir, out)
                        shutil.rmtree(out, ignore_errors=True)
                    elif part == "cached":
                        results["cached"] = bench.train(out, shards=str(stores[s]), loss="kl")
                    elif part == "online":
                        results["online"] = bench.train(
                            out, teacher=teacher_dir, data=root, recipe=base_recipe, loss="kl"
                        )
                    elif part == "competitor":
                        results["competitor"] = bench.competitor(root, teacher_dir)
                    elif part == "multicrop":  # the pair, back to back in alternating order
                        for side in C.order(r, ["multicrop", "ce"]):
                            if side == "multicrop":
                                results[side] = bench.train(out, shards=str(multi_store), loss="kl")
                            else:
                                results[side] = bench.train(out, data=root, recipe=base_recipe, loss="ce")
                    for key, res in results.items():
                        runs["sets"][s].setdefault(key, []).append(res)
                        extra = "".join(
                            f", {k[: -len('_views_per_s')]} {v:.0f}"
                            for k, v in res.items()
                            if k.endswith("_views_per_s") and k != "steady_views_per_s" and isinstance(v, float)
                        )
                        main_rate = res.get("steady_views_per_s") or res.get("render_views_per_s")
                        print(
                            f"{elapsed()} round {r} {s} {key}: {main_rate:.0f} views/s"
                            f"{' steady' if 'steady_views_per_s' in res else ''}{extra}",
                            flush=True,
                        )
            round_s.append(time.perf_counter() - t_round)
        runs["rounds_done"] = len(round_s)

    rows, summary = summarize(runs, sets, cuda)
    headers = ["quantity (median of rounds)"] + [f"{s} JPEGs ({data[s]['mean_kb']:.0f} KB)" for s in sets] + ["target"]
    table = C.md_table(headers, rows)
    what = (
        f"{args.teacher} -> {args.student}, {bench.precision}{' + channels_last' if cuda else ''}, "
        f"{args.size} px, batch {args.batch_size}, {args.workers} workers, {args.images} images x {args.epochs} "
        f"epochs per run, {runs['rounds_done']} round(s), on {C.device_label(machine)}"
    )
    table = f"{what}\n\n{table}"
    if not cuda:
        table += "\n\nCPU run: a check that the command works end to end; targets are for one GPU (n/a on CPU)."
    print()
    print(table)
    card = card_name(device, args.tiny)
    out = args.out or str(Path(args.out_dir) / f"gpu-{card}.json")
    config = {
        **vars(args),
        "precision": bench.precision,
        "mixed_precision": bench.mixed,
        "data": data,
        "recipes": {
            "c1": json.loads(Path(base_recipe).read_text()),
            "multicrop": json.loads(Path(multi_recipe).read_text()),
        },
    }
    path = C.write_result(
        "gpu", machine, config, {**runs, "summary": summary, "total_wall_s": time.perf_counter() - t_begin}, table, out
    )
    print(f"\nwrote {path} ({time.perf_counter() - t_begin:.0f} s in all)")


if __name__ == "__main__":
    sys.exit(main())
