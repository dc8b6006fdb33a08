"""How `make demo`'s settings were chosen: on a validation range of the *training* split, never the test split.

    .venv/bin/python benchmarks/demo_settings.py                 # the settings in kdlib/demo.py
    .venv/bin/python benchmarks/demo_settings.py --teacher resnet14 --teacher-epochs 6 --epochs 5 --limit 5000 --result demo-settings-b

Fashion-MNIST training images 55,000-59,999 are written to a .npz (the validation range); the demo trains
on the first --limit (4,000) training images only, so they are never trained on. The demo's pipeline runs
through the CLI with --no-eval (no test-split number is computed or printed), and every run, the teacher's
included, is scored on the validation range with `kdlib eval --data val.npz`. Writes
benchmarks/results/<result>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "precompute/fmnist.yaml")


def kdlib(*args: str) -> str:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # as the demo runs its steps
    print("$ kdlib " + " ".join(args), flush=True)
    t0 = time.time()
    out = subprocess.run(
        [sys.executable, "-m", "kdlib", *args], stdout=subprocess.PIPE, text=True, env=env, check=True
    ).stdout
    print(f"  ({time.time() - t0:.0f} s)", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=4000)
    ap.add_argument("--val", default="55000:60000", help="validation range of the training split")
    ap.add_argument("--teacher", default="resnet20x2")
    ap.add_argument("--teacher-epochs", type=int, default=3)
    ap.add_argument("--stored-epochs", type=int, default=2)
    ap.add_argument("--student", default="resnet8")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--losses", default="kl,dist,ce")
    ap.add_argument(
        "--online", default="kl", help="also distil online (teacher in memory) with these losses ('': none)"
    )
    ap.add_argument("--work", default=None)
    ap.add_argument("--result", default="demo-settings")
    a = ap.parse_args()
    lo, hi = map(int, a.val.split(":"))
    assert lo >= a.limit, "the validation range must not overlap the training images"
    work = Path(a.work or tempfile.mkdtemp(prefix="kdlib-demo-settings-"))
    work.mkdir(parents=True, exist_ok=True)

    from kdlib.source import open_source

    train = open_source("fashion-mnist", "train")
    val = work / "val.npz"
    np.savez(
        val,
        images=np.stack([train.decode(i)[0] for i in range(lo, hi)]),
        labels=train.labels()[lo:hi],
        classes=np.array(train.classes),
    )

    common = ["--data", "fashion-mnist", "--limit", str(a.limit)]
    t0 = time.time()
    kdlib(
        "train",
        *common,
        "--model",
        a.teacher,
        "--loss",
        "ce",
        "--recipe",
        RECIPE,
        "--epochs",
        str(a.teacher_epochs),
        "--no-eval",
        "--out",
        str(work / "teacher"),
    )
    teacher_s = time.time() - t0
    kdlib(
        "precompute",
        "--teacher",
        str(work / "teacher"),
        *common,
        "--recipe",
        RECIPE,
        "--epochs",
        str(a.stored_epochs),
        "--out",
        str(work / "store"),
    )
    rows = {}

    def score(name: str, run: Path, seconds: float) -> None:
        r = json.loads(
            kdlib("eval", "--model", str(run), "--data", str(val), "--split", "val").strip().splitlines()[-1]
        )
        rows[name] = {"val_top1": r["top1"], "seconds": round(seconds, 1)}
        print(f"[{name}] validation top-1 {r['top1']:.4f}", flush=True)

    score(f"teacher {a.teacher}", work / "teacher", teacher_s)
    for loss in a.losses.split(","):
        t0 = time.time()
        run = work / f"student-{loss}"
        src = ["--shards", str(work / "store")] if loss != "ce" else [*common, "--recipe", RECIPE]
        kdlib(
            "train",
            *src,
            "--student",
            a.student,
            "--loss",
            loss,
            "--epochs",
            str(a.epochs),
            "--no-eval",
            "--out",
            str(run),
        )
        score(f"{a.student} {loss} ({'cached' if loss != 'ce' else 'labels'})", run, time.time() - t0)
    for loss in filter(None, a.online.split(",")):
        t0 = time.time()
        run = work / f"student-{loss}-online"
        kdlib(
            "train",
            "--teacher",
            str(work / "teacher"),
            *common,
            "--recipe",
            RECIPE,
            "--student",
            a.student,
            "--loss",
            loss,
            "--epochs",
            str(a.epochs),
            "--no-eval",
            "--out",
            str(run),
        )
        score(f"{a.student} {loss} (online)", run, time.time() - t0)
    result = {"args": vars(a), "validation": f"fashion-mnist train images {lo}..{hi - 1}", "rows": rows}
    out = REPO / "benchmarks/results" / f"{a.result}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(rows, indent=1))
    print(f"wrote {out}; runs in {work}")


if __name__ == "__main__":
    main()
