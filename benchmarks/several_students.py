"""Several students, one pass: N students fed by one replay vs N separate `kdlib train` runs.

Data: an ImageFolder of photo-sized JPEGs (Fashion-MNIST garments, tinted, upscaled to 500x375 and
saved as JPEG q90), views at 224 px (inception crop 8-100 %, flip; the fmnist recipe otherwise), and a
1-epoch store precomputed from them with a small teacher (its cost is not measured here). Students: N
copies of one small student (`--student`, seeds 0..N-1), AdamW, KL on the stored top-k.

Side by side in one run, per round:
- parts: the data path per view (the store replayed: chunks read, JPEGs decoded, views rendered,
  soft labels reconstructed; no student), and each student's step per view (forward, loss, backward,
  clip, optimizer and schedule, on the views the data path produced, kept in memory);
- for N in --ns: one pass (`kdlib.students.train_students`, N students) and N separate runs
  (`kdlib.train.train`, one after the other): the epoch's seconds from each run dir's metrics.jsonl
  (the training loop only: not the set-up, not the end-of-epoch checkpoint).
Printed: seconds per epoch, the saving (N separate / one pass), and the one pass against its target
"N student steps plus ONE data path" (one pass / (data + N x step), target <= 1.10).

With --workers 0 (the default here) the data path runs in the training process, so the costs add and
the target is a clean sum; with workers the data path overlaps the steps and the one pass can cost less.

    .venv/bin/python benchmarks/several_students.py                  # ~3-5 min on 2 shared CPU cores
    .venv/bin/python benchmarks/several_students.py --images 64 --ns 1,2   # a quick look
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import _common as C


def photo_jpegs(root: Path, n: int, size: tuple[int, int], num_classes: int = 10) -> str:
    """An ImageFolder of `n` JPEGs of `size` (W, H): tinted Fashion-MNIST garments, upscaled."""
    from PIL import Image

    for i, img in enumerate(C.fmnist_rgb(n, 64)):
        d = root / f"class{i % num_classes:03d}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).resize(size, Image.BILINEAR).save(d / f"{i:06d}.jpg", quality=90)
    return str(root)


def epoch_seconds(out: Path) -> float:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return sum(r["seconds"] for r in rows if "seconds" in r)


def parts(base: dict, n_students: int, work: Path) -> dict[str, float]:
    """Seconds per epoch of the data path alone, and of each student's steps alone."""
    import torch
    from accelerate import Accelerator

    from kdlib.replay import Replay
    from kdlib.targets import choose_targets
    from kdlib.train import StudentRun, TrainConfig

    replay = Replay.from_store(
        base["shards"], batch_size=base["batch_size"], epochs=1, device="cpu", rank=0, world=1, workers=base["workers"]
    )
    t0 = time.perf_counter()
    kept = [(b.item, b.teacher_logits) for b in replay]  # read, decode, render, reconstruct: what train does
    data = time.perf_counter() - t0
    result = {"data_path": data}
    accelerator = Accelerator(cpu=True)
    for i in range(n_students):
        cfg = TrainConfig(**{**base, "out": str(work / f"parts{i}"), "seed": i})
        targets = choose_targets(cfg, accelerator.device)
        run = StudentRun(cfg, accelerator, targets, len(kept), len(kept))
        run.model.train()
        t0 = time.perf_counter()
        for item, teacher in kept:
            run.optimizer.zero_grad(set_to_none=True)
            loss = run.backward(item, teacher, accelerator.device, 1)
            run.step()
        float(loss.detach())  # the last step done
        result[f"step_{i}"] = time.perf_counter() - t0
        del run
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=128, help="JPEGs (views per epoch)")
    ap.add_argument("--jpeg", default="500x375", help="JPEG size WxH")
    ap.add_argument("--size", type=int, default=224, help="views' size")
    ap.add_argument("--ns", default="1,2,4", help="numbers of students")
    ap.add_argument("--student", default="mobilenet_v3_small")
    ap.add_argument("--teacher", default="resnet8", help="writes the store; not measured")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--keep", default=None, help="work directory to keep (default: a temp dir, removed)")
    ap.add_argument("--out", default=None, help="result JSON (default benchmarks/results/several_students.json)")
    args = ap.parse_args()

    from kdlib.precompute import PrecomputeConfig, precompute
    from kdlib.students import train_students
    from kdlib.train import TrainConfig, train

    ns = [int(x) for x in args.ns.split(",")]
    machine = C.machine_info()
    work = C.tmpdir(args.keep, "students")
    w, h = (int(x) for x in args.jpeg.split("x"))
    data = photo_jpegs(work / "jpegs", args.images, (w, h))
    recipe = C.write_recipe(work / "recipe.json", C.FMNIST_RECIPE, size=args.size, scale=(0.08, 1.0), name="photo")
    store = work / "store"
    print(f"{args.images} JPEGs {w}x{h}; precomputing a 1-epoch store with {args.teacher} ...", flush=True)
    with C.quiet():
        precompute(
            PrecomputeConfig(
                teacher=args.teacher, data=data, out=str(store), recipe=recipe, epochs=1, k=10, workers=args.workers
            )
        )
    base = dict(
        shards=str(store),
        student=args.student,
        batch_size=args.batch_size,
        epochs=1,
        workers=args.workers,
        eval=False,
        cpu=True,
        checkpoint_every=0,
        log_every=50,
    )

    def one_pass(n: int) -> float:
        outs = [work / f"pass{n}_{i}" for i in range(n)]
        with C.quiet():
            result = train_students([TrainConfig(**{**base, "out": str(o), "seed": i}) for i, o in enumerate(outs)])
        assert not result["failed"], result["failed"]
        sec = epoch_seconds(outs[0])  # the pass's epoch: the same for every student
        for o in outs:
            shutil.rmtree(o)
        return sec

    def separate(n: int) -> float:
        total = 0.0
        for i in range(n):
            out = work / f"alone{n}_{i}"
            with C.quiet():
                train(TrainConfig(**{**base, "out": str(out), "seed": i}))
            total += epoch_seconds(out)
            shutil.rmtree(out)
        return total

    print("warm-up run ...", flush=True)
    separate(1)
    rounds = []
    for r in range(args.rounds):
        got: dict = {"parts": parts(base, max(ns), work)}
        for n in C.order(r, [str(n) for n in ns]):
            for kind in C.order(r, ["one_pass", "separate"]):  # which goes first alternates too
                got[f"{kind}_{n}"] = (one_pass if kind == "one_pass" else separate)(int(n))
        print(
            f"round {r}: {json.dumps({k: v for k, v in got.items() if k != 'parts'})} parts {got['parts']}", flush=True
        )
        rounds.append(got)

    def med(key: str, sub: str | None = None) -> float:
        return C.median([g[key][sub] if sub else g[key] for g in rounds])

    data_s = med("parts", "data_path")
    steps = [med("parts", f"step_{i}") for i in range(max(ns))]
    views = (args.images // args.batch_size) * args.batch_size
    results = {"data_path_s": data_s, "student_step_s": steps, "views_per_epoch": views, "per_n": {}}
    results["parts_rounds"] = [g["parts"] for g in rounds]
    rows = []
    for n in ns:  # ratios: the median of each round's own ratio (a shared machine drifts between rounds)
        once, apart = med(f"one_pass_{n}"), med(f"separate_{n}")
        target = data_s + sum(steps[:n])
        saving = C.median([g[f"separate_{n}"] / g[f"one_pass_{n}"] for g in rounds])
        vs_target = C.median(
            [
                g[f"one_pass_{n}"] / (g["parts"]["data_path"] + sum(g["parts"][f"step_{i}"] for i in range(n)))
                for g in rounds
            ]
        )
        results["per_n"][n] = {
            "one_pass_s": once,
            "separate_s": apart,
            "target_s": target,
            "separate_over_one_pass": saving,
            "one_pass_over_target": vs_target,
            "rounds": [{k: g[k] for k in (f"one_pass_{n}", f"separate_{n}")} for g in rounds],
        }
        rows.append([n, once, apart, saving, target, vs_target])
    table = C.md_table(
        [
            "N",
            "one pass s/epoch",
            "N separate s/epoch",
            "separate / one pass",
            "data + N x step s",
            "one pass / target",
        ],
        rows,
    )
    parts_line = (
        f"data path {1e3 * data_s / views:.2f} ms/view; student step "
        + ", ".join(f"{1e3 * s / views:.2f}" for s in steps)
        + " ms/view"
    )
    print(
        f"\n{C.device_label(machine)}; {views} views/epoch of {w}x{h} JPEGs at {args.size} px, {args.student}, "
        f"batch {args.batch_size}, workers {args.workers}, {args.rounds} round(s) (medians)"
    )
    print(parts_line)
    print(table)
    path = C.write_result("several_students", machine, vars(args), results, table + "\n\n" + parts_line, args.out)
    print(f"wrote {path}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
