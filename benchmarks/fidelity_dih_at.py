"""DIH and attention transfer from the cache: do they match their online baselines, and do they help here?

    .venv/bin/python benchmarks/fidelity_dih_at.py --limit 5000    # the README's table (2 seeds; ~1.5 h on 2 quiet CPU cores)
    .venv/bin/python benchmarks/fidelity_dih_at.py --quick         # a smoke run (1 seed, tiny)

On Fashion-MNIST (first --limit training images; every run scored on the full 10,000-image test
split, agreement = same top-1 as the teacher's main classifier on the same center views), teacher
resnet20x2, student resnet8, the fmnist recipe, for each seed:
  1. CE on labels;
  2./3. KD (KL, T = 1), online and cached;
  4./5. DIH (heads fitted with `kdlib heads` on the frozen teacher, k = 3 heads on its stages; the
        reference's cohort loss, alpha 0.1, T 5), online and cached;
  6./7. KD + AT (stage1..3 maps pooled to 7x7, fp16, beta 1e3), online and cached.
Columns: test top-1, agreement, wall time, and the store's bytes per view (params + labels + heads + maps,
as `kdlib inspect` counts them). Writes benchmarks/results/fidelity-dih-at.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _common as C
import numpy as np
import torch
from fidelity import FMNIST, REPO, _run, _scores

from kdlib.feed import Feed
from kdlib.heads import HeadsConfig, fit_heads
from kdlib.inspect import inspect_store
from kdlib.plan import center_params
from kdlib.precompute import PrecomputeConfig, precompute
from kdlib.resolve import load_model
from kdlib.source import open_source
from kdlib.train import TrainConfig, train
from kdlib.views import Batch, FixedParams, ViewBatches, split_range

STAGES = "stage1,stage2,stage3"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=5000)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--teacher-epochs", type=int, default=6)
    ap.add_argument("--heads-epochs", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--teacher", default="resnet20x2")
    ap.add_argument("--student", default="resnet8")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None, help="work dir (default: a temp dir)")
    a = ap.parse_args()
    if a.quick:
        a.limit, a.epochs, a.teacher_epochs, a.heads_epochs, a.seeds = 512, 1, 1, 1, 1
    work = Path(a.out or tempfile.mkdtemp(prefix="kdlib-fidelity-dih-at-"))
    teacher, heads = str(work / "teacher"), str(work / "teacher-heads")
    timings, rows = {}, {}

    t0 = time.time()
    train(
        TrainConfig(
            out=teacher,
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
    t0 = time.time()
    fitted = fit_heads(
        HeadsConfig(
            teacher=teacher,
            data="fashion-mnist",
            out=heads,
            recipe=FMNIST,
            epochs=a.heads_epochs,
            limit=a.limit,
            workers=a.workers,
            cpu=True,
            eval=False,
        )
    )
    timings["heads_fit_s"] = time.time() - t0
    test = open_source("fashion-mnist", "test")
    teacher_top1 = _scores(Path(teacher), test)
    labels = torch.from_numpy(test.labels())
    model = load_model(heads)  # each cohort member on the full test split
    data = ViewBatches(
        test,
        [Batch(0, a, b) for a, b in split_range(0, len(test), 512)],
        28,
        1,
        FixedParams(center_params(test.sizes(), np.arange(len(test)), 1.0)),
    )
    hits = torch.zeros(1 + len(fitted["layers"]))
    with torch.inference_mode():
        for item in Feed(data, torch.device("cpu"), 0):
            hits += (model.cohort_logits(item["views"]).argmax(-1) == labels[item["start"] : item["stop"], None]).sum(0)
    head_top1 = dict(zip(["main", *fitted["layers"]], (hits / len(test)).tolist()))

    stores = {
        "kd": ({"teacher": teacher}, "s_kd"),
        "dih": ({"teacher": heads}, "s_dih"),
        "at": ({"teacher": teacher, "attention": STAGES, "attention_grid": 7}, "s_at"),
    }
    bytes_per_view = {}
    for name, (kw, d) in stores.items():
        t0 = time.time()
        precompute(
            PrecomputeConfig(
                data="fashion-mnist",
                out=str(work / d),
                recipe=FMNIST,
                epochs=a.epochs,
                k=10,
                limit=a.limit,
                workers=a.workers,
                **kw,
            )
        )
        timings[f"precompute_{name}_s"] = time.time() - t0
        bytes_per_view[name] = inspect_store(str(work / d), max_chunks=1)["bytes_per_view"]["total"]

    common = dict(
        student=a.student, batch_size=128, workers=a.workers, epochs=a.epochs, test=test, teacher_top1=teacher_top1
    )
    online = dict(data="fashion-mnist", recipe=FMNIST, limit=a.limit)
    for seed in range(a.seeds):
        _run("1. CE on labels", rows, seed, out=str(work / f"ce{seed}"), loss="ce", **online, **common)
        _run("2. KD online", rows, seed, out=str(work / f"kdo{seed}"), teacher=teacher, **online, **common)
        _run("3. KD cached", rows, seed, out=str(work / f"kdc{seed}"), shards=str(work / "s_kd"), **common)
        _run("4. DIH online", rows, seed, out=str(work / f"diho{seed}"), teacher=heads, loss="dih", **online, **common)
        _run(
            "5. DIH cached", rows, seed, out=str(work / f"dihc{seed}"), shards=str(work / "s_dih"), loss="dih", **common
        )
        _run(
            "6. KD + AT online",
            rows,
            seed,
            out=str(work / f"ato{seed}"),
            teacher=teacher,
            loss="kl",
            attention_student=STAGES,
            attention_grid=7,
            **online,
            **common,
        )
        _run(
            "7. KD + AT cached",
            rows,
            seed,
            out=str(work / f"atc{seed}"),
            shards=str(work / "s_at"),
            loss="kl",
            attention_student=STAGES,
            **common,
        )

    def stat(xs):
        return f"{statistics.mean(xs):.4f} ± {(max(xs) - min(xs)) / 2:.4f}" if len(xs) > 1 else f"{xs[0]:.4f}"

    store_of = {"3.": "kd", "5.": "dih", "7.": "at"}
    lines = [
        f"teacher {a.teacher} ({a.teacher_epochs} epochs): top-1 {head_top1['main']:.4f}; heads "
        + ", ".join(f"{k} {v:.4f}" for k, v in head_top1.items() if k != "main")
        + f" (fitted {a.heads_epochs} epochs, {timings['heads_fit_s']:.0f} s); student {a.student}; first "
        f"{a.limit} training images, full test split; {a.seeds} seed(s), mean ± half-range.",
        "",
        "| run | test top-1 | agreement with teacher | wall time (s) | store bytes/view |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, rs in rows.items():
        b = bytes_per_view.get(store_of.get(name[:2], ""))
        lines.append(
            f"| {name} | {stat([r['top1'] for r in rs])} | {stat([r['agreement'] for r in rs])} | "
            f"{statistics.mean(r['seconds'] for r in rs):.0f} | {'-' if b is None else f'{b:.1f}'} |"
        )
    table = "\n".join(lines)
    print("\n" + table)
    result = {
        "date": C.now_utc(),
        "command": " ".join(["benchmarks/fidelity_dih_at.py", *sys.argv[1:]]),
        "git_commit": C.machine_info()["git_commit"],
        "args": vars(a),
        "head_top1": head_top1,
        "timings": timings,
        "bytes_per_view": bytes_per_view,
        "rows": rows,
        "table": table,
        "machine": C.machine_info(),
    }
    out = REPO / "benchmarks/results" / ("fidelity-dih-at-quick.json" if a.quick else "fidelity-dih-at.json")
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"\nwrote {out}; runs in {work}")


if __name__ == "__main__":
    main()
