"""One set of images as an ImageFolder, webdataset tars and a Hugging Face dataset (issue 18, part 2), side by side.

    .venv/bin/python benchmarks/source_formats.py                   # 20,000 Fashion-MNIST train images
    .venv/bin/python benchmarks/source_formats.py --images 2000     # a quick try

1. precompute/convert_fashion_mnist.py writes the first --images train images in the three forms
   (identical PNG bytes; tars of --shard-size images);
2. per form, with an empty index cache: the first open (ImageFolder: listing + every header; wds: every
   tar's headers, its label members and each image's head; hf: load + every header), then a second
   open (the index from the cache);
3. random access as a DataLoader worker does it: --reads ids in one seeded random order, each read and
   decoded (`decode`), on one core, in --rounds interleaved rounds (the forms' order rotated each round);
   median rates and their ratios to the ImageFolder.

Files just written are in the page cache: these are warm-cache, local-disk rates (object storage adds a
request per image to the wds form). Writes benchmarks/results/source_formats.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
from _common import REPO, machine_info, md_table, median, order, tmpdir, write_result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--shard-size", type=int, default=2000)
    ap.add_argument("--reads", type=int, default=6000)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--keep", default=None, help="work folder to keep (default: a temporary one)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    machine = machine_info()
    work = tmpdir(args.keep, "source-formats")
    shutil.rmtree(work / "index-cache", ignore_errors=True)  # every first open builds its index
    os.environ["KDLIB_INDEX_CACHE"] = str(work / "index-cache")
    data = work / f"data-{args.images}-{args.shard_size}"
    if not (data / "forms.json").is_file():  # a kept --keep folder is converted once
        shutil.rmtree(data, ignore_errors=True)
        p = subprocess.run(
            [sys.executable, str(REPO / "precompute" / "convert_fashion_mnist.py"), "--out", str(data),
             "--format", "folder,wds,hf", "--limit", str(args.images), "--shard-size", str(args.shard_size)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        lines = [line.split(": --data ", 1) for line in p.stdout.splitlines()]
        (data / "forms.json").write_text(json.dumps({fmt: value.strip("'") for fmt, value in lines}))
    forms = json.loads((data / "forms.json").read_text())

    from kdlib.source import open_source

    ids = np.random.default_rng(0).permutation(min(args.images, 60000))[: args.reads]  # one order for every form
    results: dict[str, dict] = {}
    opened = {}
    for name in ("folder", "wds", "hf"):
        t = time.perf_counter()
        open_source(forms[name]).sizes()  # the ImageFolder reads its headers at sizes()
        first = time.perf_counter() - t
        t = time.perf_counter()
        opened[name] = open_source(forms[name])
        opened[name].sizes()
        second = time.perf_counter() - t
        results[name] = {"first_open_s": first, "second_open_s": second, "rates": []}
    # interleaved rounds, the order rotated each round: a busy neighbour slows every form alike
    for r, part in enumerate(np.array_split(ids, args.rounds)):
        names = order(r, list(opened))
        for name in names:
            src = opened[name]
            t = time.perf_counter()
            for i in part.tolist():
                src.decode(i)
            results[name]["rates"].append(len(part) / (time.perf_counter() - t))
    for r in results.values():
        r["random_decodes_per_s"] = median(r["rates"])
    base = results["folder"]
    rows = [
        [name, f"{r['first_open_s']:.2f}", f"{r['second_open_s']:.3f}", f"{r['random_decodes_per_s']:.0f}",
         f"{r['random_decodes_per_s'] / base['random_decodes_per_s']:.2f}"]
        for name, r in results.items()
    ]  # fmt: skip
    table = md_table(["form", "first open (s)", "second open (s)", "random decodes/s", "vs folder"], rows)
    print(f"{args.images} images, tars of {args.shard_size}, {args.reads} random reads in {args.rounds} rounds")
    print(table)
    config = {"images": args.images, "shard_size": args.shard_size, "reads": args.reads, "rounds": args.rounds,
              "data": forms}  # fmt: skip
    path = write_result("source_formats", machine, config, results, table, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
