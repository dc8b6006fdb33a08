"""Memory: peak RSS of `kdlib train` (the real CLI, in a subprocess) training 1 epoch from a store
holding 1 epoch vs from a store holding 20 epochs. It must not grow with the store's size.

Both stores are written by `kdlib.precompute.precompute` with the same teacher, recipe, limit and
(small) chunk size, so the 20-epoch store has 20x the chunks and bytes. By default the source is a
synthetic 32px RGB `.npz` with 1000 classes and the stores keep full logits (k = 1000, ~3 KB per
view), so the 20-epoch store is ~20x3 KB x limit: large enough that loading it would show. Each measured run is
`python -m kdlib train --shards S --epochs 1 --no-eval ...` started from a small wrapper process
that reports `getrusage(RUSAGE_CHILDREN).ru_maxrss` (the peak RSS of the largest process of the
run: the trainer or one of its DataLoader workers); while it runs, the whole process tree's RSS is
also summed every 20 ms with psutil (pages shared by forked workers count once per process there,
so the sum overstates the real footprint; it is reported for growth, not as an absolute).
Runs alternate (1-epoch store, 20-epoch store, then the other way round) for --rounds rounds.
Peak RSS varies between identical runs (by up to ~100 MiB here: prefetch depth and allocator
state depend on timing), so the verdict compares the median per-round difference with what
holding the 20-epoch store's extra arrays would add: it "grows" if the difference exceeds half
of that. The spread of identical runs is printed next to it.

    .venv/bin/python benchmarks/memory.py           # ~2-3 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import threading
import time

import _common as C

WRAPPER = (
    "import json, resource, subprocess, sys; rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, "
    "stderr=subprocess.PIPE, text=True); "
    "print(json.dumps({'rc': rc.returncode, 'maxrss_kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "
    "'stderr_tail': rc.stderr[-2000:]}))"
)


def measure(cmd: list[str]) -> dict:
    import psutil

    proc = subprocess.Popen([sys.executable, "-c", WRAPPER, *cmd], stdout=subprocess.PIPE, text=True)
    peak = {"tree_rss": 0, "procs": 0}
    stop = threading.Event()

    def poll() -> None:
        root = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                tree = root.children(recursive=True)
                total, n = 0, 0
                for p in tree:
                    try:
                        total += p.memory_info().rss
                        n += 1
                    except psutil.Error:
                        pass
                if total > peak["tree_rss"]:
                    peak["tree_rss"] = total
                peak["procs"] = max(peak["procs"], n)
            except psutil.Error:
                pass
            time.sleep(0.02)

    t = threading.Thread(target=poll, daemon=True)
    t0 = time.perf_counter()
    t.start()
    out, _ = proc.communicate()
    stop.set()
    t.join()
    rec = json.loads(out.strip().splitlines()[-1])
    if rec["rc"] != 0:
        raise SystemExit(f"kdlib train failed (exit {rec['rc']}):\n{rec['stderr_tail']}")
    return {
        "max_process_rss_mib": rec["maxrss_kib"] / 1024,
        "peak_tree_rss_mib": peak["tree_rss"] / 2**20,
        "max_processes": peak["procs"],
        "wall_s": time.perf_counter() - t0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--data",
        default=None,
        help="source (default: a synthetic 32px RGB .npz with --classes classes, full logits stored)",
    )
    ap.add_argument("--classes", type=int, default=1000, help="classes of the synthetic source")
    ap.add_argument("--k", type=int, default=0, help="top-k stored (0: all classes, i.e. full logits: a big store)")
    ap.add_argument("--recipe", default=C.FMNIST_RECIPE, help="base recipe (size set to 32 for the synthetic source)")
    ap.add_argument("--limit", type=int, default=1536)
    ap.add_argument("--big-epochs", type=int, default=20)
    ap.add_argument("--chunk-views", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--teacher", default="resnet8")
    ap.add_argument("--student", default="resnet8")
    ap.add_argument("--keep", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import numpy as np
    import torch

    from kdlib.models import build_model
    from kdlib.precompute import PrecomputeConfig, precompute
    from kdlib.rundir import save_model
    from kdlib.source import open_source
    from kdlib.store import open_store

    machine = C.machine_info()
    work = C.tmpdir(args.keep, "memory")
    data, recipe = args.data, args.recipe
    if data is None:
        data = C.write_npz(work / f"rgb{args.classes}.npz", C.fmnist_rgb(args.limit, 32), args.classes)
        recipe = C.write_recipe(work / "recipe.json", args.recipe, size=32, name="rgb32")
    source = open_source(data, "train", args.limit)
    k = args.k or source.num_classes
    torch.manual_seed(0)
    teacher = work / "teacher"
    save_model(build_model(args.teacher, source.num_classes, source.channels, *source.mean_std()), teacher)
    stores = {}
    for epochs in (1, args.big_epochs):
        out = work / f"store-{epochs}ep"
        print(
            f"precomputing a {epochs}-epoch store ({args.limit} images, chunks of {args.chunk_views} views) ...",
            flush=True,
        )
        with C.quiet():
            precompute(
                PrecomputeConfig(
                    teacher=str(teacher),
                    data=data,
                    recipe=recipe,
                    out=str(out),
                    k=k,
                    epochs=epochs,
                    limit=args.limit,
                    chunk_views=args.chunk_views,
                    batch_size=args.batch_size,
                    workers=args.workers,
                    test=False,
                )
            )
        meta = open_store(str(out)).meta
        row = sum(np.dtype(dt).itemsize * int(np.prod(trail)) for dt, trail in meta.fields.values())
        stores[epochs] = {
            "path": out,
            "bytes": C.dir_bytes(out),
            "raw_bytes": row * meta.views_per_epoch * meta.epochs_done,
        }

    names = {1: "1-epoch store", args.big_epochs: f"{args.big_epochs}-epoch store"}
    runs: dict[int, list] = {e: [] for e in stores}
    for r in range(args.rounds):
        for epochs in C.order(r, list(stores)):
            out = work / f"run-{epochs}-{r}"
            cmd = [
                sys.executable,
                "-m",
                "kdlib",
                "train",
                "--shards",
                str(stores[epochs]["path"]),
                "--student",
                args.student,
                "--epochs",
                "1",
                "--batch-size",
                str(args.batch_size),
                "--workers",
                str(args.workers),
                "--no-eval",
                "--out",
                str(out),
            ]
            m = measure(cmd)
            runs[epochs].append(m)
            shutil.rmtree(out, ignore_errors=True)
            print(
                f"round {r} {names[epochs]:>15}: max process RSS {m['max_process_rss_mib']:.0f} MiB, "
                f"process tree {m['peak_tree_rss_mib']:.0f} MiB ({m['max_processes']} processes)",
                flush=True,
            )

    small, big = runs[1], runs[args.big_epochs]
    raw_a, raw_b = stores[1]["raw_bytes"] / 2**20, stores[args.big_epochs]["raw_bytes"] / 2**20
    extra = raw_b - raw_a  # what holding the extra epochs' arrays in memory would add
    rows, res = [], {}
    for key, label in (
        ("max_process_rss_mib", "peak RSS, largest process (MiB)"),
        ("peak_tree_rss_mib", "peak RSS summed over the process tree (MiB)"),
    ):
        xa, xb = [x[key] for x in small], [x[key] for x in big]
        a, b = C.median(xa), C.median(xb)
        paired = [y - x for x, y in zip(xa, xb)]
        noise = max(max(xa) - min(xa), max(xb) - min(xb))
        res[key] = {
            "small": a,
            "big": b,
            "ratio": b / a,
            "diff_mib": b - a,
            "paired_diff_mib": paired,
            "median_paired_diff_mib": C.median(paired),
            "noise_range_mib": noise,
        }
        rows.append([label, a, b, C.median(paired), f"{min(paired):.0f} to {max(paired):.0f}", f"{noise:.0f}"])
    rows.append(
        [
            "store size on disk (MiB)",
            stores[1]["bytes"] / 2**20,
            stores[args.big_epochs]["bytes"] / 2**20,
            (stores[args.big_epochs]["bytes"] - stores[1]["bytes"]) / 2**20,
            "",
            "",
        ]
    )
    rows.append(["store arrays decompressed (MiB)", raw_a, raw_b, extra, "", ""])
    diff = res["max_process_rss_mib"]["median_paired_diff_mib"]
    grows = diff > 0.5 * extra
    table = C.md_table(
        [
            "quantity",
            names[1] + " (median)",
            names[args.big_epochs] + " (median)",
            "difference (median of rounds)",
            f"difference range, {args.rounds} rounds",
            "spread of identical runs",
        ],
        rows,
    )
    print()
    print(
        f"memory: kdlib train --epochs 1 ({args.student}, batch {args.batch_size}, {args.workers} workers, "
        f"{args.limit} images of {source.name}, {source.num_classes} classes, k={k}), on {C.device_label(machine)}\n"
    )
    print(table)
    verdict = (
        f"peak RSS of the largest process: {diff:+.0f} MiB with the {args.big_epochs}-epoch store; holding its "
        f"extra epochs would add {extra:.0f} MiB: {'GROWS with the store' if grows else 'no growth with the store'}"
        f" (verdict: grows if the median difference exceeds half of that; runs on the same store differ by up "
        f"to {res['max_process_rss_mib']['noise_range_mib']:.0f} MiB)"
    )
    print("\n" + verdict)
    table = (
        f"{table}\n\n{verdict}; {args.limit} views per epoch of {source.name}, {source.num_classes} classes, "
        f"k={k}, {args.workers} workers"
    )
    path = C.write_result(
        "memory",
        machine,
        vars(args),
        {
            "runs": {names[e]: v for e, v in runs.items()},
            "summary": res,
            "store_bytes": {names[e]: s["bytes"] for e, s in stores.items()},
            "store_raw_bytes": {names[e]: s["raw_bytes"] for e, s in stores.items()},
            "grows": grows,
            "extra_epochs_mib": extra,
        },
        table,
        args.out,
    )
    print(f"wrote {path}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
