"""Speedup over online KD: training from a store vs training with the teacher in memory, same views,
next to the ideal speedup measured in the same run with bare model calls.

A (cached): `train(TrainConfig(shards=STORE))`: soft labels from the store, no teacher loaded.
B (online): `train(TrainConfig(teacher=TEACHER, data=..., recipe=...))`: the same plan rendered,
    the teacher run on every batch in the training process.
Ideal: (teacher forward + student step) / student step, each timed on the same real rendered
    batch with the same models: `teacher_logits(teacher, views)` and one student training step
    (forward, KL loss, backward, clip, AdamW step), no data loading.

Measured speedup = views/s(A) / views/s(B) in the steady state (timestamps of the training loop's
steps after the first --skip of the epoch, see replay_overhead.py); efficiency = measured / ideal
(target >= 0.9), judged on the median over rounds of each round's own efficiency (all three
measured back to back, so load drifting between rounds cancels). The whole-epoch rates from
metrics.jsonl are shown too.
Teacher weights do not change the cost, so the teacher is a random-init net saved as a run
directory (default resnet56; the student is resnet8). All sides alternate for --rounds rounds.

    .venv/bin/python benchmarks/online_speedup.py             # ~2-3 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import shutil
import time

import _common as C


def bare_times(teacher, student, views, device, steps: int, warmup: int = 2) -> tuple[float, float]:
    """Seconds per batch of teacher_logits and of one student training step, on one real batch."""
    import torch

    from kdlib.losses import get_loss
    from kdlib.precision import default_precision, teacher_logits

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    views = views.to(device)
    precision = default_precision(device)  # what precompute and online train use by default
    target = teacher_logits(teacher, views, device, precision)
    loss_fn = get_loss("kl", temperature=1.0)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4, weight_decay=5e-4)
    student.train()

    def student_step() -> None:
        loss = loss_fn(student(views).float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        loss.item()  # the training loop reads the loss every step

    def teacher_step() -> None:
        teacher_logits(teacher, views, device, precision)
        sync()

    out = []
    for fn in (teacher_step, student_step):
        for _ in range(warmup):
            fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        sync()
        out.append((time.perf_counter() - t0) / steps)
    return out[0], out[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    C.add_data_flags(ap)
    ap.add_argument("--limit", type=int, default=2048, help="images of the train split (views per epoch)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--skip", type=int, default=2, help="first steps of each epoch left out of the steady rate")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--student", default="resnet8")
    ap.add_argument("--teacher", default="resnet56", help="architecture of the random-init teacher")
    ap.add_argument("--bare-steps", type=int, default=4, help="timed batches per bare measurement")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--keep", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch

    from kdlib.models import build_model
    from kdlib.plan import make_plan
    from kdlib.precompute import PrecomputeConfig, precompute
    from kdlib.recipe import load_recipe
    from kdlib.resolve import load_model
    from kdlib.rundir import save_model
    from kdlib.source import open_source
    from kdlib.train import TrainConfig, train
    from kdlib.views import Batch, FixedParams, ViewBatches

    machine = C.machine_info()
    work = C.tmpdir(args.keep, "online")
    data, recipe_path = C.prepare_data(args, work)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    source = open_source(data, "train", args.limit)
    mean, std = source.mean_std()
    teacher_dir = work / "teacher"
    torch.manual_seed(0)
    save_model(build_model(args.teacher, source.num_classes, source.channels, mean, std), teacher_dir)
    store = work / "store"
    print(f"precomputing a store with {args.teacher} ({args.limit} images) ...", flush=True)
    with C.quiet():
        precompute(
            PrecomputeConfig(
                teacher=str(teacher_dir),
                data=data,
                recipe=recipe_path,
                out=str(store),
                epochs=1,
                k=args.k,
                batch_size=args.batch_size,
                workers=args.workers,
                limit=args.limit,
                test=False,
            )
        )

    # One real batch of epoch 0 for the bare calls (the same views both trainers see first).
    recipe = load_recipe(recipe_path)
    plan = make_plan(recipe, source.sizes(), 0)
    views = ViewBatches(source, [Batch(0, 0, args.batch_size)], recipe.size, recipe.group_size, FixedParams(plan))[0][
        "views"
    ]
    teacher = load_model(str(teacher_dir)).eval().to(device)
    student = build_model(args.student, source.num_classes, source.channels, mean, std).to(device)

    common = dict(
        student=args.student,
        epochs=1,
        batch_size=args.batch_size,
        workers=args.workers,
        limit=args.limit,
        eval=False,
        checkpoint_every=0,
        loss="kl",
    )
    sides = {
        "cached": lambda out: TrainConfig(out=out, shards=str(store), **common),
        "online": lambda out: TrainConfig(out=out, teacher=str(teacher_dir), data=data, recipe=recipe_path, **common),
        "bare": None,
    }
    runs: dict[str, list] = {"cached": [], "online": [], "bare": []}
    for r in range(args.rounds):
        for name in C.order(r, list(sides)):
            if name == "bare":
                t_teacher, t_student = bare_times(teacher, student, views, device, args.bare_steps)
                runs["bare"].append(
                    {
                        "teacher_s_per_batch": t_teacher,
                        "student_s_per_batch": t_student,
                        "ideal_speedup": (t_teacher + t_student) / t_student,
                    }
                )
                print(
                    f"round {r}   bare: teacher {args.batch_size / t_teacher:.0f} views/s, student step "
                    f"{args.batch_size / t_student:.0f} views/s, ideal {runs['bare'][-1]['ideal_speedup']:.2f}x",
                    flush=True,
                )
                continue
            out = work / f"{name}-{r}"
            rate = C.timed_train(train, sides[name](str(out)), out, args.batch_size, args.skip)
            runs[name].append(rate)
            print(
                f"round {r} {name:>6}: {rate['steady_views_per_s']:.0f} views/s steady, "
                f"{rate['views_per_s']:.0f} whole epoch",
                flush=True,
            )

    a = [x["steady_views_per_s"] for x in runs["cached"]]
    b = [x["steady_views_per_s"] for x in runs["online"]]
    a_epoch = [x["views_per_s"] for x in runs["cached"]]
    b_epoch = [x["views_per_s"] for x in runs["online"]]
    ideal = [x["ideal_speedup"] for x in runs["bare"]]
    measured = C.median(a) / C.median(b)
    paired = [x / y / z for x, y, z in zip(a, b, ideal)]
    eff_of_medians = measured / C.median(ideal)
    eff = C.median(paired)
    target = 0.9
    t_t = C.median([x["teacher_s_per_batch"] for x in runs["bare"]])
    t_s = C.median([x["student_s_per_batch"] for x in runs["bare"]])
    rows = [
        ["A: cached (store), steady state", f"{C.median(a):.1f} views/s", C.spread(a)],
        ["B: online (teacher in memory), steady state", f"{C.median(b):.1f} views/s", C.spread(b)],
        ["A, whole epoch (metrics.jsonl)", f"{C.median(a_epoch):.1f} views/s", C.spread(a_epoch)],
        ["B, whole epoch (metrics.jsonl)", f"{C.median(b_epoch):.1f} views/s", C.spread(b_epoch)],
        ["bare teacher forward", f"{args.batch_size / t_t:.1f} views/s", ""],
        ["bare student step", f"{args.batch_size / t_s:.1f} views/s", ""],
        ["measured speedup A/B (steady state)", f"{measured:.2f}x", ""],
        ["measured speedup A/B (whole epoch)", f"{C.median(a_epoch) / C.median(b_epoch):.2f}x", ""],
        ["ideal speedup (t_teacher + t_student) / t_student", f"{C.median(ideal):.2f}x", C.spread(ideal)],
        [
            "efficiency measured / ideal, per round",
            f"{eff:.3f}",
            f"{C.spread(paired)}; target >= {target}: {'met' if eff >= target else 'MISSED'}",
        ],
        ["efficiency from the medians above", f"{eff_of_medians:.3f}", ""],
    ]
    table = C.md_table(["quantity", "median", f"range over {args.rounds} rounds"], rows)
    print()
    print(
        f"online speedup: teacher {args.teacher} (random init), student {args.student}, batch {args.batch_size}, "
        f"{args.workers} workers, {args.limit} views per run, on {C.device_label(machine)}\n"
    )
    print(table)
    path = C.write_result(
        "online_speedup",
        machine,
        vars(args),
        {
            **runs,
            "median_cached": C.median(a),
            "median_online": C.median(b),
            "measured_speedup": measured,
            "ideal_speedup": C.median(ideal),
            "efficiency": eff,
            "efficiency_of_medians": eff_of_medians,
            "paired_efficiency": paired,
            "target": target,
            "met": eff >= target,
        },
        table,
        args.out,
    )
    print(f"\nwrote {path}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
