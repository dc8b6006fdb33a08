"""Replay overhead: student training from a store vs plain supervised training, same everything else.

A (cached): `kdlib.train.train(TrainConfig(shards=STORE, loss="kl"))`: params and soft labels
    read from the store in the DataLoader workers, views re-rendered, teacher logits reconstructed.
B (labels): `kdlib.train.train(TrainConfig(data=..., recipe=..., loss="ce"))`: the same recipe's
    plan drawn in memory, the same views rendered, cross-entropy on the (mixed) labels.

Same student, batch size, workers, limit, epochs; `eval=False` and `checkpoint_every=0` on both
sides (the epoch-end checkpoint is outside the timed loop anyway). Throughput is the loop's own
views/s from each run's metrics.jsonl. A and B alternate (A,B then B,A, ...) for --rounds rounds;
the table gives medians and the ratio A/B (target >= 0.95).

    .venv/bin/python benchmarks/replay_overhead.py            # ~2-3 min on 2 CPU cores
    .venv/bin/python benchmarks/replay_overhead.py --limit 2048 --rounds 3   # quicker
"""

from __future__ import annotations

import argparse
import shutil

import _common as C


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--recipe", default=C.FMNIST_RECIPE)
    ap.add_argument("--limit", type=int, default=6144, help="images of the train split (views per epoch)")
    ap.add_argument("--epochs", type=int, default=1, help="training epochs per run (the store holds this many)")
    ap.add_argument("--rounds", type=int, default=3)
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
    store = work / "store"
    print(f"precomputing a {args.epochs}-epoch store ({args.teacher}, {args.limit} images) in {store} ...", flush=True)
    with C.quiet():
        precompute(PrecomputeConfig(teacher=args.teacher, data=args.data, recipe=args.recipe, out=str(store),
                                    epochs=args.epochs, k=args.k, batch_size=args.batch_size, workers=args.workers,
                                    limit=args.limit, backend=args.backend, test=False))

    common = dict(student=args.student, epochs=args.epochs, batch_size=args.batch_size, workers=args.workers,
                  limit=args.limit, eval=False, checkpoint_every=0, mixed_precision=args.mixed_precision)
    sides = {
        "cached": lambda out: TrainConfig(out=out, shards=str(store), loss="kl", **common),
        "labels": lambda out: TrainConfig(out=out, data=args.data, recipe=args.recipe, loss="ce", **common),
    }
    runs: dict[str, list[dict]] = {k: [] for k in sides}
    for r in range(args.rounds):
        for name in C.order(r, list(sides)):
            out = work / f"{name}-{r}"
            with C.quiet():
                train(sides[name](str(out)))
            rate = C.epoch_rate(out, args.batch_size)
            runs[name].append(rate)
            shutil.rmtree(out, ignore_errors=True)
            print(f"round {r} {name:>6}: {rate['views_per_s']:.0f} views/s ({rate['views']} views in "
                  f"{rate['seconds']:.1f} s)", flush=True)

    a = [x["views_per_s"] for x in runs["cached"]]
    b = [x["views_per_s"] for x in runs["labels"]]
    paired = [x / y for x, y in zip(a, b)]
    ratio = C.median(a) / C.median(b)
    target = 0.95
    rows = [
        ["A: from the store (kl)", C.median(a), C.spread(a)],
        ["B: plain supervised (ce)", C.median(b), C.spread(b)],
        ["ratio A/B (of medians)", ratio, f"target >= {target}: {'met' if ratio >= target else 'MISSED'}"],
        ["ratio A/B (median of rounds)", C.median(paired), C.spread(paired)],
    ]
    table = C.md_table(["side", "views/s (median)", f"range over {args.rounds} rounds"], rows)
    print()
    print(f"replay overhead: {args.student}, batch {args.batch_size}, {args.workers} workers, {args.limit} images x "
          f"{args.epochs} epoch(s), {args.backend} store, on {C.device_label(machine)}\n")
    print(table)
    path = C.write_result("replay_overhead", machine, vars(args),
                          {"cached": runs["cached"], "labels": runs["labels"], "median_cached": C.median(a),
                           "median_labels": C.median(b), "ratio_of_medians": ratio, "paired_ratios": paired,
                           "median_paired_ratio": C.median(paired), "target": target, "met": ratio >= target},
                          table, args.out)
    print(f"\nwrote {path}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
