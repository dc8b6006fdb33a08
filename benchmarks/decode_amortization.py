"""Decode amortization: image decodes per view with groups of m images x c crops (must be 1/c).

For each c in --crops, a recipe with `images_per_group=m, crops_per_image=c` is written and the
real pipeline is run: `kdlib.precompute.precompute` (plan path) then `kdlib.train.train` from the
store it wrote (store path), both with their DataLoader workers. Every decode made while
rendering views is counted by wrapping the decoder that `kdlib.views.ViewBatches` hands to
`decode_batch` or `render_pil` (the counter lives in shared memory, so the workers' decodes count too; decodes
made at start-up, e.g. for the source fingerprint and mean/std, are not on the view path and
are not counted). The time spent inside decode is summed the same way.

Two rates are shown: decodes per *rendered* view (what decode_batch does with a group: must be
1/c) and decodes per view *used* (stored by precompute, trained on by train: also 1/c, unless
views are rendered that no one uses).

This is a count, not a timing race: it is exact and deterministic, so one run is enough.

    .venv/bin/python benchmarks/decode_amortization.py                   # ~1-2 min on 2 CPU cores
    .venv/bin/python benchmarks/decode_amortization.py --jpeg-size 128   # on synthetic JPEGs (decode costs)
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import time

import _common as C

COUNTERS: dict[str, mp.sharedctypes.Synchronized] = {}


def install_counter() -> None:
    """Wrap the two decoding entry points of kdlib.views (`decode_batch` for rendering on the device,
    `render_pil` for rendering in a worker) so that each decode they make is counted (in any process)."""
    import kdlib.views as views_mod

    COUNTERS.update(
        decodes=mp.Value("q", 0), views=mp.Value("q", 0), calls=mp.Value("q", 0), decode_s=mp.Value("d", 0.0)
    )

    def counting(decode):
        def counted(*args):
            t0 = time.perf_counter()
            out = decode(*args)
            dt = time.perf_counter() - t0
            with COUNTERS["decodes"].get_lock():
                COUNTERS["decodes"].value += 1
                COUNTERS["decode_s"].value += dt
            return out

        return counted

    def count_views(params) -> None:
        with COUNTERS["views"].get_lock():
            COUNTERS["views"].value += len(params["image"])
            COUNTERS["calls"].value += 1

    decode_batch, render_pil = views_mod.decode_batch, views_mod.render_pil

    def counting_decode_batch(params, decode, size=None, draft=None):
        count_views(params)
        return decode_batch(params, counting(decode), size, draft)

    def counting_render_pil(params, image, size, group_size, draft=False):
        count_views(params)
        return render_pil(params, counting(image), size, group_size, draft)

    views_mod.decode_batch, views_mod.render_pil = counting_decode_batch, counting_render_pil


def snapshot() -> dict[str, float]:
    return {k: v.value for k, v in COUNTERS.items()}


def reset() -> None:
    for v in COUNTERS.values():
        v.value = 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--recipe", default=C.FMNIST_RECIPE, help="base recipe; m and c are overridden")
    ap.add_argument("--limit", type=int, default=512)
    ap.add_argument("--m", type=int, default=4, help="images per group")
    ap.add_argument("--crops", default="1,2,4,8", help="crops per image c, comma-separated")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--teacher", default="resnet8")
    ap.add_argument("--student", default="resnet8")
    ap.add_argument(
        "--jpeg-size",
        type=int,
        default=0,
        help="if > 0: use an ImageFolder of --limit synthetic JPEGs of this size instead of --data",
    )
    ap.add_argument("--keep", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from kdlib.precompute import PrecomputeConfig, precompute
    from kdlib.store import Store
    from kdlib.train import TrainConfig, train

    machine = C.machine_info()
    work = C.tmpdir(args.keep, "decode")
    data = args.data
    if args.jpeg_size:
        data = C.synthetic_jpeg_folder(work / "jpegs", args.limit, args.jpeg_size)
    install_counter()
    crops = [int(c) for c in args.crops.split(",")]
    results, rows = [], []
    for c in crops:
        recipe = C.write_recipe(
            work / f"recipe-c{c}.json", args.recipe, images_per_group=args.m, crops_per_image=c, name=f"m{args.m}c{c}"
        )
        store = work / f"store-c{c}"
        for stage in ("precompute", "train"):
            reset()
            t0 = time.perf_counter()
            with C.quiet():
                if stage == "precompute":
                    precompute(
                        PrecomputeConfig(
                            teacher=args.teacher,
                            data=data,
                            recipe=recipe,
                            out=str(store),
                            epochs=1,
                            batch_size=args.batch_size,
                            workers=args.workers,
                            limit=args.limit,
                            test=False,
                        )
                    )
                else:
                    train(
                        TrainConfig(
                            out=str(work / f"run-c{c}"),
                            shards=str(store),
                            student=args.student,
                            batch_size=args.batch_size,
                            workers=args.workers,
                            eval=False,
                            checkpoint_every=0,
                            data=data,
                        )
                    )
            wall = time.perf_counter() - t0
            s = snapshot()
            # views the stage used: stored by precompute, or trained on (steps x batch) by train
            used = (
                Store.read_meta(str(store)).views_per_epoch
                if stage == "precompute"
                else C.epoch_rate(work / f"run-c{c}", args.batch_size)["views"]
            )
            per_used = s["decodes"] / used
            ok_render = s["decodes"] * c == s["views"]
            ok = ok_render and s["decodes"] * c == used
            rec = {
                "m": args.m,
                "c": c,
                "stage": stage,
                **s,
                "views_used": used,
                "decodes_per_rendered_view": s["decodes"] / s["views"],
                "decodes_per_view": per_used,
                "expected": 1 / c,
                "exact_per_rendered_view": ok_render,
                "exact": ok,
                "decode_us_per_view": 1e6 * s["decode_s"] / used,
                "wall_s": wall,
            }
            results.append(rec)
            rows.append(
                [
                    f"{args.m} x {c}",
                    stage,
                    used,
                    int(s["views"]),
                    int(s["decodes"]),
                    f"{s['decodes'] / s['views']:.4f}",
                    f"{per_used:.4f}",
                    f"{1 / c:.4f}",
                    "yes" if ok_render else "NO",
                    "yes" if ok else "NO",
                    f"{rec['decode_us_per_view']:.1f}",
                ]
            )
            print(
                f"m={args.m} c={c} {stage:>10}: {used} views used, {int(s['views'])} rendered, "
                f"{int(s['decodes'])} decodes ({per_used:.4f} per view used, expected {1 / c:.4f})",
                flush=True,
            )
        shutil.rmtree(store, ignore_errors=True)

    table = C.md_table(
        [
            "group m x c",
            "stage",
            "views used",
            "views rendered",
            "decodes",
            "decodes/rendered view",
            "decodes/view used",
            "1/c",
            "= 1/c per rendered",
            "= 1/c per used",
            "decode µs/view used",
        ],
        rows,
    )
    src = f"synthetic {args.jpeg_size}px JPEGs" if args.jpeg_size else data
    print()
    print(
        f"decode amortization: {src}, {args.limit} images, batch {args.batch_size}, {args.workers} workers, "
        f"on {C.device_label(machine)}\n"
    )
    print(table)
    all_ok = all(r["exact"] for r in results)
    verdict = f"all exactly 1/c per view used: {all_ok}"
    wasted = [r for r in results if r["views"] > r["views_used"]]
    if wasted:
        verdict += (
            "; views rendered that nothing used: "
            + ", ".join(f"{r['stage']} c={r['c']}: {int(r['views'] - r['views_used'])}" for r in wasted)
            + " (the stage renders batches it never consumes, e.g. a DataLoader iterated twice per epoch)"
        )
    path = C.write_result(
        "decode_amortization",
        machine,
        vars(args),
        {"rows": results, "all_exact": all_ok, "source": src},
        f"{table}\n\n{verdict} ({src}, {args.limit} images)",
        args.out,
    )
    print(f"\n{verdict}\nwrote {path}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    if not all_ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
