"""Precompute efficiency: `kdlib.precompute.precompute` throughput vs the teacher's bare forward.

A (precompute): `precompute(PrecomputeConfig(...))` writing a fresh 1-epoch store: DataLoader
    workers decode and render, the teacher runs, top-k is taken, a writer thread writes chunks.
    Steady state: precompute advances its progress bar by hand after each teacher batch; the bar
    class is wrapped (`_common.update_clock`) to timestamp those updates, and the rate is taken
    after the first --skip batches (worker start-up, first batch). Also shown: the rate precompute
    itself prints ("epoch 0: ... views/s", loader start to last chunk committed: on a real epoch
    the same as the steady rate, on a 2048-view CPU epoch its fixed costs weigh) and the whole
    call's wall time (adds opening and hashing the source and building the teacher).
B (bare teacher): `teacher_logits(teacher, views)` -- the function precompute calls -- on
    pre-rendered uint8 batches of the same batch size held in memory (the first --cached-batches
    batches of the same plan, cycled), for the same number of views.

Ratio A/B, steady state (target >= 0.9: decode, render and writes hidden behind the teacher), judged on the
median of the per-round ratios (A and B alternate, back to back, for --rounds rounds, so load
drifting between rounds cancels). Teacher weights do not change the cost: random init.

    .venv/bin/python benchmarks/precompute_efficiency.py      # ~2-3 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import shutil
import time

import _common as C


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    C.add_data_flags(ap)
    ap.add_argument("--limit", type=int, default=2048, help="images of the train split (views per epoch)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--skip", type=int, default=2, help="first teacher batches left out of the steady rate")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--teacher", default="resnet56")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--chunk-views", type=int, default=4096)
    ap.add_argument("--backend", choices=["zarr", "wds"], default="zarr")
    ap.add_argument("--cached-batches", type=int, default=4, help="distinct pre-rendered batches cycled by B")
    ap.add_argument("--keep", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch

    from kdlib.plan import make_plan, views_per_epoch
    from kdlib.precision import default_precision, prepare_model, teacher_logits
    from kdlib.precompute import PrecomputeConfig, precompute
    from kdlib.recipe import load_recipe
    from kdlib.resolve import load_model
    from kdlib.source import open_source
    from kdlib.views import Batch, FixedParams, ViewBatches, split_range

    machine = C.machine_info()
    work = C.tmpdir(args.keep, "precompute")
    data, recipe_path = C.prepare_data(args, work)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    source = open_source(data, "train", args.limit)
    recipe = load_recipe(recipe_path)
    n_views = views_per_epoch(recipe, len(source))
    plan = make_plan(recipe, source.sizes(), 0)
    ranges = split_range(0, n_views, args.batch_size)[: args.cached_batches]
    ds = ViewBatches(source, [Batch(0, a, b) for a, b in ranges], recipe.size, recipe.group_size, FixedParams(plan))
    batches = [ds[i]["views"] for i in range(len(ds))]
    mean, std = source.mean_std()
    teacher = load_model(
        args.teacher, num_classes=source.num_classes, in_channels=source.channels, mean=mean, std=std
    ).eval()
    teacher = prepare_model(teacher, device)  # channels_last on CUDA, as precompute does
    precision = default_precision(device)
    sizes = [b - a for a, b in split_range(0, n_views, args.batch_size)]

    def bare() -> float:
        for _ in range(2):  # warm-up, as precompute's first batches are
            teacher_logits(teacher, batches[0].to(device), device, precision)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i, n in enumerate(sizes):
            teacher_logits(teacher, batches[i % len(batches)][:n], device, precision)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return n_views / (time.perf_counter() - t0)

    runs: dict[str, list] = {"precompute": [], "bare": []}
    for r in range(args.rounds):
        for name in C.order(r, ["precompute", "bare"]):
            if name == "bare":
                rate = bare()
                runs["bare"].append({"views_per_s": rate})
            else:
                out = work / f"store-{r}"
                cfg = PrecomputeConfig(
                    teacher=args.teacher,
                    data=data,
                    recipe=recipe_path,
                    out=str(out),
                    epochs=1,
                    k=args.k,
                    batch_size=args.batch_size,
                    workers=args.workers,
                    limit=args.limit,
                    chunk_views=args.chunk_views,
                    backend=args.backend,
                    test=False,
                )
                t0 = time.perf_counter()
                with C.quiet() as log, C.update_clock() as stamps:
                    precompute(cfg)
                wall = time.perf_counter() - t0
                epoch_rate = C.parse_rate(log.getvalue())
                if epoch_rate is None:
                    raise SystemExit("precompute printed no 'epoch 0: ... views/s' line; cannot read its rate")
                # the epoch's bar: one stamp per teacher batch done; steady = after the first --skip batches
                run = max(stamps, key=len)
                skip = min(args.skip, len(run) - 2)
                rate = (len(run) - 1 - skip) * args.batch_size / (run[-1] - run[skip])
                runs["precompute"].append(
                    {
                        "views_per_s": rate,
                        "epoch_views_per_s": epoch_rate,
                        "call_wall_s": wall,
                        "call_views_per_s": n_views / wall,
                    }
                )
                shutil.rmtree(out, ignore_errors=True)
            extra = (
                f" steady, {runs['precompute'][-1]['epoch_views_per_s']:.0f} epoch rate" if name == "precompute" else ""
            )
            print(f"round {r} {name:>10}: {rate:.0f} views/s{extra}", flush=True)

    a = [x["views_per_s"] for x in runs["precompute"]]
    b = [x["views_per_s"] for x in runs["bare"]]
    e = [x["epoch_views_per_s"] for x in runs["precompute"]]
    w = [x["call_views_per_s"] for x in runs["precompute"]]
    paired = [x / y for x, y in zip(a, b)]
    ratio = C.median(paired)
    target = 0.9
    rows = [
        ["A: precompute, steady state", C.median(a), C.spread(a)],
        ["A': precompute, its own epoch rate", C.median(e), C.spread(e)],
        ["A'': precompute, whole call incl. start-up", C.median(w), C.spread(w)],
        ["B: bare teacher_logits on cached batches", C.median(b), C.spread(b)],
        [
            "ratio A/B, per round",
            ratio,
            f"{C.spread(paired)}; target >= {target}: {'met' if ratio >= target else 'MISSED'}",
        ],
        ["ratio A/B of the medians", C.median(a) / C.median(b), ""],
        [
            "ratio A'/B, per round (epoch rate)",
            C.median([x / y for x, y in zip(e, b)]),
            C.spread([x / y for x, y in zip(e, b)]),
        ],
        ["ratio A''/B, per round (whole call)", C.median([x / y for x, y in zip(w, b)]), ""],
    ]
    table = C.md_table(["side", "views/s (median)", f"range over {args.rounds} rounds"], rows)
    print()
    print(
        f"precompute efficiency: teacher {args.teacher}, batch {args.batch_size}, {args.workers} workers, "
        f"{n_views} views, {args.backend} store, on {C.device_label(machine)}\n"
    )
    print(table)
    path = C.write_result(
        "precompute_efficiency",
        machine,
        vars(args),
        {
            **runs,
            "views": n_views,
            "median_precompute": C.median(a),
            "median_bare": C.median(b),
            "ratio_of_medians": C.median(a) / C.median(b),
            "paired_ratios": paired,
            "median_paired_ratio": ratio,
            "target": target,
            "met": ratio >= target,
        },
        table,
        args.out,
    )
    print(f"\nwrote {path}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
