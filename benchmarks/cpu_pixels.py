"""8. CPU milliseconds per view: kdlib's decode / cut / flip + mix / round next to torchvision's standard
pipelines, measured side by side on one thread in one run (issue 10).

    .venv/bin/python benchmarks/cpu_pixels.py                       # 256-px JPEGs -> 224-px views
    .venv/bin/python benchmarks/cpu_pixels.py --jpeg 500x375        # photo-sized JPEGs (ImageNet-like)

Rows (each the median over --rounds of a pass over --views views, ms per view):
- a worker's share when rendering on the device: read the params and decode (`ViewBatches` item, no render);
- kdlib's CPU-only path, as a DataLoader worker runs it for new stores (renderer pil-bilinear-1: decode with
  Pillow, Pillow's resample of each box, flip, MixUp on --mix-prob of views), also with `--decode pil-draft`;
- the same renderer's batched integer implementation (what the accelerator runs), here on the CPU;
- the older renderer roi_align-1 (stores written before pil-bilinear-1): decode + roi_align cut + flip / mix /
  round in float32, each part timed alone too;
- torchvision's standard PIL pipeline: open + RGB + RandomResizedCrop(224) + RandomHorizontalFlip + PILToTensor;
- torchvision v2 on uint8 tensors: decode_jpeg + RandomResizedCrop(224, antialias) + flip.
Crops are drawn from the same law in both (inception crop, scale 0.08-1) but not the same boxes.

Then (`--where-rounds`, default 2) where to render on a CPU-only machine: `kdlib train` from a store of
those views (resnet8 teacher and student, 2 workers), with `--render device` (the main process renders,
workers decode) against `--render workers` (each worker renders its batch), alternating, whole-epoch views/s.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import time
from pathlib import Path

import _common as C
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jpeg", default="256x256", help="source JPEG size WxH")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--views", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--mix-prob", type=float, default=1.0, help="share of views mixed (worst case 1.0)")
    ap.add_argument("--where-rounds", type=int, default=2, help="rounds of the render-place comparison (0: skip)")
    ap.add_argument("--keep", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)  # CPU ms per view: one core's work, as a DataLoader worker does it
    w, h = (int(x) for x in args.jpeg.split("x"))

    from PIL import Image
    from torchvision import transforms as T
    from torchvision.io import decode_jpeg
    from torchvision.transforms import v2

    from kdlib.plan import make_plan
    from kdlib.recipe import Recipe
    from kdlib.render import _crop_resize, _flip_mix_round, decode_batch, param_tensors, render_decoded, render_pil
    from kdlib.source import open_source
    from kdlib.views import Batch, FixedParams, ViewBatches

    work = C.tmpdir(args.keep, "cpu-pixels-")
    images = C.fmnist_rgb(args.views, max(w, h))
    paths = [work / "jpegs" / f"c{i % 2}" / f"{i:05d}.jpg" for i in range(len(images))]  # 2 classes
    for path, img in zip(paths, images):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).resize((w, h), Image.BILINEAR).save(path, quality=90)
    src = open_source(str(work / "jpegs"))
    r = Recipe(size=args.size, scale=(0.08, 1.0), mix="mixup", mix_prob=args.mix_prob, images_per_group=2)
    p = make_plan(r, src.sizes(), 0)
    v = len(p["image"])
    blobs = [p.read_bytes() for p in paths]

    def per_view(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3 / v

    ds = ViewBatches(src, [Batch(0, 0, v)], r.size, r.group_size, FixedParams(p), stage="device")  # a worker's share
    tv_pil = T.Compose([T.RandomResizedCrop(args.size), T.RandomHorizontalFlip(), T.PILToTensor()])
    tv_v2 = v2.Compose([v2.RandomResizedCrop(args.size, antialias=True), v2.RandomHorizontalFlip()])
    dec = decode_batch(p, src.decode, r.size)
    old = "roi_align-1"
    pt_old = param_tensors(p, dec, r.size, r.group_size, old)
    crops = _crop_resize(pt_old["box"], dec, r.size)
    fns = {
        "worker share, render on device (params + decode + taps)": lambda: ds[0],
        "kdlib CPU path: decode + render (pil-bilinear-1, in a worker)": lambda: render_pil(
            p, src.decode_image, r.size, r.group_size
        ),
        "kdlib CPU path, pil-draft": lambda: render_pil(p, src.decode_image, r.size, r.group_size, draft=True),
        "pil-bilinear-1 as the accelerator runs it (batched integer taps), on the CPU": lambda: render_decoded(
            param_tensors(p, dec, r.size, r.group_size), dec, r.size
        ),
        "decode (PIL, full)": lambda: decode_batch(p, src.decode, r.size),
        "decode (pil-draft)": lambda: decode_batch(p, src.decode, r.size, src.decode_draft),
        "roi_align-1: cut (roi_align, float32)": lambda: _crop_resize(pt_old["box"], dec, r.size),
        "roi_align-1: flip + mix + round": lambda: _flip_mix_round(pt_old, crops.clone(), r.size),
        "roi_align-1: decode + render": lambda: render_decoded(
            pt_old, decode_batch(p, src.decode, r.size), r.size, old
        ),
        "torchvision PIL: RandomResizedCrop + flip": lambda: [
            tv_pil(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs[:v]
        ],
        "torchvision v2 uint8: decode_jpeg + RandomResizedCrop + flip": lambda: [
            tv_v2(decode_jpeg(torch.frombuffer(b, dtype=torch.uint8))) for b in blobs[:v]
        ],
    }
    times: dict[str, list[float]] = {k: [] for k in fns}
    for rnd in range(args.rounds):
        for name in C.order(rnd, list(fns)):
            times[name].append(per_view(fns[name]))
    med = {k: statistics.median(t) for k, t in times.items()}
    base = med["torchvision PIL: RandomResizedCrop + flip"]
    rows = [[k, f"{med[k]:.3f}", C.spread(times[k]), f"{med[k] / base:.2f}"] for k in fns]
    table = C.md_table(["one thread, per view", "ms", "spread", "x torchvision PIL"], rows)
    print(
        f"{args.views} JPEGs {w}x{h} -> {args.size} px, {v} views, MixUp on {args.mix_prob:.0%}; "
        f"{C.device_label(C.machine_info())}\n"
    )
    print(table)
    results = {"ms_per_view": med, "rounds": times}
    if args.where_rounds:
        torch.set_num_threads(len(os.sched_getaffinity(0)))
        where = render_place_rates(work, str(work / "jpegs"), r, args.where_rounds, max(r.group_size, min(32, v // 4)))
        results["render_place_views_per_s"] = where
        rows = [[k, f"{C.median(x):.1f}", C.spread(x)] for k, x in where.items()]
        extra = C.md_table(["kdlib train from a store, 2 workers", "views/s", "spread"], rows)
        print("\n" + extra)
        table += "\n\n" + extra
    C.write_result(
        f"cpu_pixels-{w}x{h}" if (w, h) != (256, 256) else "cpu_pixels",
        C.machine_info(),
        vars(args),
        results,
        table,
        args.out,
    )


def render_place_rates(work: Path, data: str, recipe, rounds: int, batch: int) -> dict[str, list[float]]:
    """Whole-epoch views/s of `kdlib train` from one store with the views rendered in the main
    process or in the 2 workers (resnet8 student)."""
    import json

    from kdlib.models import build_model
    from kdlib.precompute import PrecomputeConfig, precompute
    from kdlib.rundir import save_model
    from kdlib.train import TrainConfig, train

    rpath = work / "recipe.json"
    rpath.write_text(json.dumps(recipe.to_dict()))
    teacher = work / "teacher"
    torch.manual_seed(0)
    save_model(build_model("resnet8", 2, 3, [0.5] * 3, [0.25] * 3), teacher)
    store = work / "store"
    with C.quiet():
        precompute(
            PrecomputeConfig(
                teacher=str(teacher),
                data=data,
                recipe=str(rpath),
                out=str(store),
                k=1,
                batch_size=batch,
                workers=2,
                test=False,
            )
        )
    rates: dict[str, list[float]] = {"--render device (main process)": [], "--render workers": []}
    for rnd in range(rounds):
        for name in C.order(rnd, list(rates)):
            out = work / f"run-{rnd}"
            cfg = TrainConfig(
                out=str(out),
                shards=str(store),
                student="resnet8",
                batch_size=batch,
                workers=2,
                eval=False,
                checkpoint_every=0,
                render="device" if "device" in name else "workers",
            )
            rates[name].append(C.timed_train(train, cfg, out, batch, skip=2)["views_per_s"])
    return rates


if __name__ == "__main__":
    main()
