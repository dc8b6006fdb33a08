"""8. CPU milliseconds per view: kdlib's decode / cut / flip + mix / round next to torchvision's standard
pipelines, measured side by side on one thread in one run (issue 10).

    .venv/bin/python benchmarks/cpu_pixels.py                       # 256-px JPEGs -> 224-px views
    .venv/bin/python benchmarks/cpu_pixels.py --jpeg 500x375        # photo-sized JPEGs (ImageNet-like)

Rows (each the median over --rounds of a pass over --views views, ms per view):
- a worker's share when rendering on the device: read the params and decode (`ViewBatches` item, no render);
- kdlib's CPU-only path: decode + render (roi_align cut, flip, MixUp on --mix-prob of views, round to uint8),
  with each part timed alone too, and with `--decode pil-draft`;
- torchvision's standard PIL pipeline: open + RGB + RandomResizedCrop(224) + RandomHorizontalFlip + PILToTensor;
- torchvision v2 on uint8 tensors: decode_jpeg + RandomResizedCrop(224, antialias) + flip.
Crops are drawn from the same law in both (inception crop, scale 0.08-1) but not the same boxes.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import _common as C


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jpeg", default="256x256", help="source JPEG size WxH")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--views", type=int, default=96)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--mix-prob", type=float, default=1.0, help="share of views mixed (worst case 1.0)")
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
    from kdlib.render import _crop_resize, _flip_mix_round, decode_batch, param_tensors, render_decoded
    from kdlib.source import open_source
    from kdlib.views import Batch, FixedParams, ViewBatches

    work = C.tmpdir(args.keep, "cpu-pixels-")
    images = C.fmnist_rgb(args.views, max(w, h))
    root = work / "jpegs" / "c0"
    root.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img).resize((w, h), Image.BILINEAR).save(root / f"{i:05d}.jpg", quality=90)
    src = open_source(str(work / "jpegs"))
    r = Recipe(size=args.size, scale=(0.08, 1.0), mix="mixup", mix_prob=args.mix_prob, images_per_group=2)
    p = make_plan(r, src.sizes(), 0)
    v = len(p["image"])
    blobs = [(root / f"{i:05d}.jpg").read_bytes() for i in range(len(src))]

    def per_view(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3 / v

    ds = ViewBatches(src, [Batch(0, 0, v)], r.size, r.group_size, FixedParams(p))
    tv_pil = T.Compose([T.RandomResizedCrop(args.size), T.RandomHorizontalFlip(), T.PILToTensor()])
    tv_v2 = v2.Compose([v2.RandomResizedCrop(args.size, antialias=True), v2.RandomHorizontalFlip()])
    dec = decode_batch(p, src.decode, r.size)
    pt = param_tensors(p, r.group_size)
    crops = _crop_resize(pt["box"], dec, r.size)
    fns = {
        "worker share, render on device (params + decode)": lambda: ds[0],
        "decode (PIL, full)": lambda: decode_batch(p, src.decode, r.size),
        "decode (pil-draft)": lambda: decode_batch(p, src.decode, r.size, src.decode_draft),
        "cut (roi_align, float32)": lambda: _crop_resize(pt["box"], dec, r.size),
        "flip + mix + round": lambda: _flip_mix_round(pt, crops.clone(), r.size),
        "kdlib CPU path (decode + render)": lambda: render_decoded(pt, decode_batch(p, src.decode, r.size), r.size),
        "kdlib CPU path, pil-draft": lambda: render_decoded(
            pt, decode_batch(p, src.decode, r.size, src.decode_draft), r.size),
        "torchvision PIL: RandomResizedCrop + flip": lambda: [
            tv_pil(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs[:v]],
        "torchvision v2 uint8: decode_jpeg + RandomResizedCrop + flip": lambda: [
            tv_v2(decode_jpeg(torch.frombuffer(b, dtype=torch.uint8))) for b in blobs[:v]],
    }
    times: dict[str, list[float]] = {k: [] for k in fns}
    for rnd in range(args.rounds):
        for name in C.order(rnd, list(fns)):
            times[name].append(per_view(fns[name]))
    med = {k: statistics.median(t) for k, t in times.items()}
    base = med["torchvision PIL: RandomResizedCrop + flip"]
    rows = [[k, f"{med[k]:.3f}", C.spread(times[k]), f"{med[k] / base:.2f}"] for k in fns]
    table = C.md_table(["one thread, per view", "ms", "spread", "x torchvision PIL"], rows)
    print(f"{args.views} JPEGs {w}x{h} -> {args.size} px, {v} views, MixUp on {args.mix_prob:.0%}; "
          f"{C.device_label(C.machine_info())}\n")
    print(table)
    C.write_result(f"cpu_pixels-{w}x{h}" if (w, h) != (256, 256) else "cpu_pixels", C.machine_info(),
                   vars(args), {"ms_per_view": med, "rounds": times}, table, args.out)


if __name__ == "__main__":
    main()
