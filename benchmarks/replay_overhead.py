"""Replay overhead: student training from a store vs plain supervised training, same everything else.

A (cached): `kdlib.train.train(TrainConfig(shards=STORE, loss="kl"))`: params and soft labels
    read from the store in the DataLoader workers, views re-rendered, teacher logits reconstructed.
B (labels): `kdlib.train.train(TrainConfig(data=..., recipe=..., loss="ce"))`: the same recipe's
    plan drawn in memory, the same views rendered, cross-entropy on the (mixed) labels.

Same student, batch size, workers, limit, epochs; `eval=False` and `checkpoint_every=0` on both
sides (the epoch-end checkpoint is outside the timed loop anyway). Two throughputs per run:
steady state, from timestamps of the training loop's steps (`_common.step_clock`, which wraps the
progress bar kdlib.train already uses) leaving out the first --skip steps of each epoch (worker
start-up, first batch); and the whole epoch, the loop's own views/s in metrics.jsonl (on the
short epochs a CPU run can afford, its per-epoch start-up weighs far more than on real epochs).
A and B alternate (A,B then B,A, ...) for --rounds rounds; the table gives medians and the ratio
A/B (target >= 0.95), judged on the median of the per-round ratios of the steady state: on a
shared machine the load drifts between rounds, and a ratio taken within one round cancels most
of it (the ratio of the medians is shown too).

    .venv/bin/python benchmarks/replay_overhead.py            # ~2-3 min on 2 CPU cores
    .venv/bin/python benchmarks/replay_overhead.py --limit 2048 --rounds 3   # quicker
"""

from __future__ import annotations

import argparse
import shutil

import _common as C


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    C.add_data_flags(ap)
    ap.add_argument("--limit", type=int, default=4096, help="images of the train split (views per epoch)")
    ap.add_argument("--epochs", type=int, default=1, help="training epochs per run (the store holds this many)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--skip", type=int, default=2, help="first steps of each epoch left out of the steady rate")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--student", default="resnet8")
    ap.add_argument("--teacher", default="resnet8", help="writes the store; its cost is not measured here")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--backend", choices=["zarr", "wds"], default="zarr")
    ap.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    ap.add_argument("--keep", default=None, help="work directory to keep (default: a temp dir, removed)")
    ap.add_argument("--out", default=None, help="result JSON (default benchmarks/results/replay_overhead.json)")
    args = ap.parse_args()

    from kdlib.precompute import PrecomputeConfig, precompute
    from kdlib.train import TrainConfig, train

    machine = C.machine_info()
    work = C.tmpdir(args.keep, "replay")
    data, recipe = C.prepare_data(args, work)
    store = work / "store"
    print(f"precomputing a {args.epochs}-epoch store ({args.teacher}, {args.limit} images) in {store} ...", flush=True)
    with C.quiet():
        precompute(
            PrecomputeConfig(
                teacher=args.teacher,
                data=data,
                recipe=recipe,
                out=str(store),
                epochs=args.epochs,
                k=args.k,
                batch_size=args.batch_size,
                workers=args.workers,
                limit=args.limit,
                backend=args.backend,
                test=False,
            )
        )

    common = dict(
        student=args.student,
        epochs=args.epochs,
        batch_size=args.batch_size,
        workers=args.workers,
        limit=args.limit,
        eval=False,
        checkpoint_every=0,
        mixed_precision=args.mixed_precision,
    )
    sides = {
        "cached": lambda out: TrainConfig(out=out, shards=str(store), loss="kl", **common),
        "labels": lambda out: TrainConfig(out=out, data=data, recipe=recipe, loss="ce", **common),
    }
    runs: dict[str, list[dict]] = {k: [] for k in sides}
    for r in range(args.rounds):
        for name in C.order(r, list(sides)):
            out = work / f"{name}-{r}"
            rate = C.timed_train(train, sides[name](str(out)), out, args.batch_size, args.skip)
            runs[name].append(rate)
            print(
                f"round {r} {name:>6}: {rate['steady_views_per_s']:.0f} views/s steady, "
                f"{rate['views_per_s']:.0f} views/s whole epoch ({rate['views']} views in {rate['seconds']:.1f} s)",
                flush=True,
            )

    target = 0.95
    rows, summary = [], {}
    for key, what in (
        ("steady_views_per_s", f"steady state (steps after the first {args.skip})"),
        ("views_per_s", "whole epoch (metrics.jsonl)"),
    ):
        a = [x[key] for x in runs["cached"]]
        b = [x[key] for x in runs["labels"]]
        paired = [x / y for x, y in zip(a, b)]
        ratio = C.median(a) / C.median(b)
        summary[key] = {
            "median_cached": C.median(a),
            "median_labels": C.median(b),
            "ratio_of_medians": ratio,
            "paired_ratios": paired,
            "median_paired_ratio": C.median(paired),
        }
        rows.append([what, C.median(a), C.median(b), ratio, C.median(paired), C.spread(paired)])
    ratio = summary["steady_views_per_s"]["median_paired_ratio"]
    table = C.md_table(
        [
            "views/s, median of rounds",
            "A: from the store (kl)",
            "B: plain supervised (ce)",
            "A/B (of medians)",
            "A/B (median of rounds)",
            f"A/B range, {args.rounds} rounds",
        ],
        rows,
    )
    table += (
        f"\n\ntarget A/B >= {target} (steady state, median of the per-round ratios): {ratio:.3f}, "
        f"{'met' if ratio >= target else 'MISSED'}"
    )
    print()
    print(
        f"replay overhead: {args.student}, batch {args.batch_size}, {args.workers} workers, {args.limit} images x "
        f"{args.epochs} epoch(s), {args.backend} store, on {C.device_label(machine)}\n"
    )
    print(table)
    path = C.write_result(
        "replay_overhead",
        machine,
        vars(args),
        {"cached": runs["cached"], "labels": runs["labels"], **summary, "target": target, "met": ratio >= target},
        table,
        args.out,
    )
    print(f"\nwrote {path}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
