"""Does distilling from the cache give the student you would get with the teacher in memory?

    .venv/bin/python benchmarks/fidelity.py --limit 5000    # the README's numbers (2 seeds, ~40 min on 2 quiet CPU cores)
    .venv/bin/python benchmarks/fidelity.py --quick         # a smoke run (1 seed, tiny)
    .venv/bin/python benchmarks/fidelity.py --limit 60000 --teacher-epochs 2 --epochs 2 --seeds 1 --long 0 \
        --result fidelity-full                              # rows 1-3 on the full train split (~45 min)

On Fashion-MNIST (first --limit training images; every run scored on the full 10,000-image test
split, agreement = same top-1 as the teacher on the same center views), a teacher clearly
stronger than the student (resnet20x2 vs resnet8), for each seed:
  1. student on labels only (CE), same recipe and epochs;
  2. student with online KD (teacher in memory), same views;
  3. student with cached KD from kdlib's store, same views;
  4. the funmatch recipe on a longer schedule (--long epochs), from a store of --long distinct epochs;
  5. patience: the same long run from the first 1, 4 and 16 stored epochs (cycled), against online
     KD with fresh views every epoch; with the bytes each store takes.
Prints a markdown table (mean +- spread over seeds, wall time) and writes benchmarks/results/fidelity.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _common as C
import torch

from kdlib.evaluate import predict
from kdlib.precompute import PrecomputeConfig, precompute
from kdlib.resolve import load_model
from kdlib.source import open_source
from kdlib.train import TrainConfig, train

REPO = Path(__file__).resolve().parents[1]
FMNIST = str(REPO / "precompute/fmnist.yaml")
FUNMATCH = str(REPO / "precompute/funmatch.yaml")


def _scores(model_dir: Path, test) -> torch.Tensor:
    """Top-1 class of a trained run on every test image's center view (the recipes' eval view)."""
    return predict(load_model(str(model_dir)), test, 28, 1.0).argmax(1)


def _run(name: str, rows: dict, seed: int, test, teacher_top1: torch.Tensor, **kw) -> None:
    t0 = time.time()
    train(TrainConfig(seed=seed, cpu=True, **kw))
    seconds = time.time() - t0
    top1 = _scores(Path(kw["out"]), test)
    labels = torch.from_numpy(test.labels())
    row = {
        "seed": seed,
        "top1": float((top1 == labels).float().mean()),
        "agreement": float((top1 == teacher_top1).float().mean()),
        "seconds": seconds,
    }
    rows.setdefault(name, []).append(row)
    print(f"[{name} seed {seed}] top1 {row['top1']:.4f} agreement {row['agreement']:.4f} ({seconds:.0f} s)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=5000)
    ap.add_argument("--epochs", type=int, default=4, help="schedule of configs 1-3")
    ap.add_argument(
        "--long",
        type=int,
        default=16,
        help="schedule of configs 4-5 (and stored epochs of the long store); 0 skips them",
    )
    ap.add_argument("--teacher-epochs", type=int, default=6)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--teacher", default="resnet20x2")
    ap.add_argument("--student", default="resnet8")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None, help="work dir (default: a temp dir)")
    ap.add_argument("--result", default=None, help="name of the JSON in benchmarks/results (default: fidelity)")
    a = ap.parse_args()
    if a.quick:
        a.limit, a.epochs, a.long, a.teacher_epochs, a.seeds = 512, 1, 4, 1, 1
    patience = [n for n in (1, 4, 16) if n <= a.long]
    work = Path(a.out or tempfile.mkdtemp(prefix="kdlib-fidelity-"))
    common = dict(student=a.student, batch_size=128, workers=a.workers, limit=a.limit)
    timings, rows = {}, {}

    t0 = time.time()
    train(
        TrainConfig(
            out=str(work / "teacher"),
            student=a.teacher,
            data="fashion-mnist",
            loss="ce",
            recipe=FMNIST,
            epochs=a.teacher_epochs,
            batch_size=128,
            workers=a.workers,
            limit=a.limit,
            cpu=True,
        )
    )
    timings["teacher_train_s"] = time.time() - t0
    test = open_source("fashion-mnist", "test")  # all 10,000 images, whatever --limit says
    teacher_top1 = _scores(work / "teacher", test)
    teacher_eval = {
        "top1": float((teacher_top1 == torch.from_numpy(test.labels())).float().mean()),
        "images": len(test),
    }

    t0 = time.time()
    precompute(
        PrecomputeConfig(
            teacher=str(work / "teacher"),
            data="fashion-mnist",
            out=str(work / "s_fmnist"),
            recipe=FMNIST,
            epochs=a.epochs,
            limit=a.limit,
            workers=a.workers,
        )
    )
    timings["precompute_fmnist_s"] = time.time() - t0
    store_bytes = 0
    if a.long:
        t0 = time.time()
        long_store = precompute(
            PrecomputeConfig(
                teacher=str(work / "teacher"),
                data="fashion-mnist",
                out=str(work / "s_funmatch"),
                recipe=FUNMATCH,
                epochs=a.long,
                limit=a.limit,
                workers=a.workers,
            )
        )
        timings["precompute_funmatch_s"] = time.time() - t0
        store_bytes = sum(long_store.bytes_on_disk().values())

    for seed in range(a.seeds):
        ep = dict(epochs=a.epochs, test=test, teacher_top1=teacher_top1, **common)
        _run(
            "1. CE on labels",
            rows,
            seed,
            out=str(work / f"ce{seed}"),
            data="fashion-mnist",
            loss="ce",
            recipe=FMNIST,
            **ep,
        )
        _run(
            "2. online KD (teacher in memory)",
            rows,
            seed,
            out=str(work / f"online{seed}"),
            data="fashion-mnist",
            teacher=str(work / "teacher"),
            recipe=FMNIST,
            **ep,
        )
        _run(
            "3. cached KD (kdlib store), same views",
            rows,
            seed,
            out=str(work / f"cached{seed}"),
            shards=str(work / "s_fmnist"),
            **ep,
        )
        lp = dict(epochs=a.long, test=test, teacher_top1=teacher_top1, **common)
        for n in patience:
            name = (
                f"4. funmatch, {a.long} epochs from {n} stored epochs"
                if n == a.long
                else f"5. {a.long} epochs from {n} stored epoch{'s' if n > 1 else ''} (cycled)"
            )
            _run(
                name,
                rows,
                seed,
                out=str(work / f"fm{n}_{seed}"),
                shards=str(work / "s_funmatch"),
                stored_epochs=n,
                **lp,
            )
        if a.long:
            _run(
                f"5. {a.long} epochs online (fresh views every epoch)",
                rows,
                seed,
                out=str(work / f"fmonline{seed}"),
                data="fashion-mnist",
                teacher=str(work / "teacher"),
                recipe=FUNMATCH,
                **lp,
            )

    def stat(xs):
        xs = [x for x in xs if x is not None]
        if not xs:
            return "-"
        return f"{statistics.mean(xs):.4f} ± {(max(xs) - min(xs)) / 2:.4f}" if len(xs) > 1 else f"{xs[0]:.4f}"

    per_epoch = store_bytes / a.long if a.long else None
    lines = [
        f"teacher {a.teacher}: top-1 {teacher_eval['top1']:.4f} ({a.teacher_epochs} epochs, "
        f"{timings['teacher_train_s']:.0f} s); student {a.student}; first {a.limit} training images, "
        f"full test split ({len(test)} images); {a.seeds} seed(s), mean ± half-range. "
        f"Precompute (paid once, not in the cached rows' wall time): {a.epochs}-epoch fmnist store "
        f"{timings['precompute_fmnist_s']:.0f} s"
        + (f", {a.long}-epoch funmatch store {timings['precompute_funmatch_s']:.0f} s." if a.long else "."),
        "",
        "| run | test top-1 | agreement with teacher | wall time (s) | store bytes |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, rs in rows.items():
        n_stored = next((n for n in patience if f"from {n} stored " in name), None)
        size = f"{per_epoch * n_stored / 1e6:.2f} MB" if n_stored else "-"
        lines.append(
            f"| {name} | {stat([r['top1'] for r in rs])} | {stat([r['agreement'] for r in rs])} | "
            f"{statistics.mean(r['seconds'] for r in rs):.0f} | {size} |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    result = {
        "date": C.now_utc(),
        "command": " ".join(["benchmarks/fidelity.py", *sys.argv[1:]]),
        "git_commit": C.machine_info()["git_commit"],
        "args": vars(a),
        "teacher": teacher_eval,
        "timings": timings,
        "rows": rows,
        "store_bytes_per_epoch": per_epoch,
        "table": table,
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
    }
    out = REPO / "benchmarks/results" / f"{a.result or ('fidelity-quick' if a.quick else 'fidelity')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out}; runs in {work}")


if __name__ == "__main__":
    main()
