"""ImageFolder start-up at ImageNet scale (issue 11, item 5): first scan rate and `train --shards` start-up.

    .venv/bin/python benchmarks/index_scan.py                  # 100,000 small JPEGs, 100 classes
    .venv/bin/python benchmarks/index_scan.py --files 5000     # a quick try

1. writes a synthetic ImageFolder of --files small JPEGs (a few distinct encodings of varied sizes,
   copied: header reading does not care what the pixels are);
2. first scan: listing (names, bytes, mtimes) + every image size, with an empty index cache;
   the same files through PIL's Image.open serially (kdlib's reader before this issue), on a subset;
3. second open: listing + sizes from the index;
4. precompute a store over the whole folder (a tiny teacher: this measures start-up, not a network);
5. `kdlib train --shards` as a user runs it, from process start to its first step written to
   steps.jsonl, with the user index cache off (the store's own index is what it reads).

Files just written are in the page cache, so scan rates are warm-cache rates; a cold disk adds its
read latency per file (threads overlap those reads). Writes benchmarks/results/index_scan.json.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _common import REPO, machine_info, md_table, quiet, tmpdir, write_result


def tiny_teacher(num_classes: int, in_channels: int):
    """A trained-from-scratch stand-in: the benchmark measures start-up, not a network."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes)
    )


def make_folder(root: Path, files: int, classes: int) -> float:
    from PIL import Image

    rng = np.random.default_rng(0)
    blobs = []
    for i in range(16):
        h, w = 24 + 3 * (i % 5), 28 + 2 * (i % 7)
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG", quality=85)
        blobs.append(buf.getvalue())
    t0 = time.perf_counter()
    for c in range(classes):
        (root / f"class{c:04d}").mkdir(parents=True, exist_ok=True)
    for i in range(files):
        (root / f"class{i % classes:04d}" / f"img{i:07d}.jpg").write_bytes(blobs[i % len(blobs)])
    return time.perf_counter() - t0


def pil_serial(paths: list[str]) -> float:
    from PIL import Image

    t0 = time.perf_counter()
    for p in paths:
        with Image.open(p) as im:
            im.size
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--pil-subset", type=int, default=20_000, help="files timed through PIL's Image.open")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--keep", default=None, help="keep the folder, store and runs here")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    machine = machine_info()
    work = tmpdir(args.keep, "index_scan")
    data, cache = work / "data", work / "index-cache"
    shutil.rmtree(cache, ignore_errors=True)
    os.environ["KDLIB_INDEX_CACHE"] = str(cache)
    results: dict = {}
    if not (data / "class0000").is_dir():
        results["write_s"] = round(make_folder(data, args.files, args.classes), 2)
        print(f"wrote {args.files} JPEGs in {results['write_s']} s", flush=True)

    from kdlib.source import ImageFolderSource, open_source

    t0 = time.perf_counter()
    src = open_source(str(data))
    t1 = time.perf_counter()
    src.mean_std()  # 2,000 decodes: what a from-scratch model is normalised with, kept in the index too
    t2 = time.perf_counter()
    src.sizes()  # every header, then the index is written
    t3 = time.perf_counter()
    assert isinstance(src, ImageFolderSource) and len(src) == args.files, len(src)
    results.update(
        listing_s=round(t1 - t0, 3),
        stats_s=round(t2 - t1, 3),
        first_sizes_s=round(t3 - t2, 3),
        first_scan_files_per_s=round(args.files / (t3 - t2 + t1 - t0)),
    )
    subset = [src._path(i) for i in range(0, len(src), max(1, len(src) // args.pil_subset))][: args.pil_subset]
    pil = pil_serial(subset)
    results["pil_serial_files_per_s"] = round(len(subset) / pil)
    t0 = time.perf_counter()
    again = open_source(str(data))
    again.sizes()
    again.mean_std()
    results["second_open_s"] = round(time.perf_counter() - t0, 3)
    print(results, flush=True)

    from kdlib.precompute import PrecomputeConfig, precompute

    recipe = work / "recipe.yaml"
    recipe.write_text(
        "name: scan\nsize: 24\ncrop: inception\nscale: [0.5, 1.0]\nflip: true\nmix: none\n"
        "images_per_group: 1\ncrops_per_image: 1\nseed: 0\n"
    )
    store = work / "store"
    sys.path.insert(0, str(Path(__file__).parent))
    t0 = time.perf_counter()
    with quiet():  # resumes (nothing to do) when --keep already holds the finished store
        precompute(
            PrecomputeConfig(
                teacher="index_scan:tiny_teacher",
                data=str(data),
                out=str(store),
                recipe=str(recipe),
                k=5,
                batch_size=1024,
                chunk_views=16384,
                workers=args.workers,
                test=False,
            )
        )
    results["precompute_s"] = round(time.perf_counter() - t0, 1)
    print(f"precompute {results['precompute_s']} s", flush=True)

    # what train does with the data before its first step, in this process (imports already paid)
    from kdlib.store import open_store, open_store_source

    os.environ["KDLIB_INDEX_CACHE"] = "off"  # only the store's own index
    t0 = time.perf_counter()
    opened = open_store_source(open_store(str(store)))  # listing, index, fingerprint check
    opened.mean_std()
    results["train_data_startup_s"] = round(time.perf_counter() - t0, 3)

    run = work / "run"
    shutil.rmtree(run, ignore_errors=True)
    env = {**os.environ, "KDLIB_INDEX_CACHE": "off", "PYTHONPATH": f"{REPO}{os.pathsep}{Path(__file__).parent}"}
    cmd = [
        sys.executable,
        "-m",
        "kdlib",
        "train",
        "--shards",
        str(store),
        "--student",
        "index_scan:tiny_teacher",
        "--out",
        str(run),
        "--batch-size",
        "64",
        "--epochs",
        "1",
        "--workers",
        "0",
        "--no-eval",
        "--cpu",
    ]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    steps = run / "steps.jsonl"
    try:
        while proc.poll() is None and not (steps.is_file() and steps.stat().st_size):
            time.sleep(0.05)
        first_step = time.perf_counter() - t0
    finally:
        proc.terminate()
        err = proc.communicate(timeout=60)[1]
    if not steps.is_file():
        raise SystemExit(f"train did not reach a step:\n{err[-2000:]}")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import kdlib.train"], env=env, capture_output=True, check=True)
    results.update(train_first_step_s=round(first_step, 2), import_s=round(time.perf_counter() - t0, 2))

    scale = 1_281_167 / args.files
    first = results["listing_s"] + results["first_sizes_s"]
    rows = [
        ["files", f"{args.files:,}", f"1,281,167 (x{scale:.1f}, linear)"],
        ["first scan: listing + every size, s", f"{first:.2f}", f"{first * scale:.0f}"],
        ["  listing (names, bytes, mtimes), s", f"{results['listing_s']:.2f}", f"{results['listing_s'] * scale:.0f}"],
        ["  first scan rate, files/s", f"{results['first_scan_files_per_s']:,}", ""],
        [
            "  PIL Image.open serial (before this issue), files/s",
            f"{results['pil_serial_files_per_s']:,}",
            f"{1_281_167 / results['pil_serial_files_per_s']:.0f} s",
        ],
        ["pixel statistics (2,000 decodes, once), s", f"{results['stats_s']:.2f}", f"{results['stats_s']:.2f}"],
        [
            "second open (listing + index), s",
            f"{results['second_open_s']:.2f}",
            f"{results['second_open_s'] * scale:.0f}",
        ],
        [
            "`train --shards` data start-up (store, source, index, fingerprint), s",
            f"{results['train_data_startup_s']:.2f}",
            f"{results['train_data_startup_s'] * scale:.0f}",
        ],
        ["`kdlib train --shards` process start to first step, s", f"{results['train_first_step_s']:.2f}", ""],
        ["  of which `import kdlib.train` (torch, accelerate, torchvision), s", f"{results['import_s']:.2f}", ""],
    ]
    table = md_table(["", "measured", "ImageNet-1k"], rows)
    print(table)
    path = write_result("index_scan", machine, vars(args), results, table, args.out)
    print(f"wrote {path}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
