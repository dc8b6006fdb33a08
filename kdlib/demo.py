"""`make demo`: the whole pipeline on Fashion-MNIST through the real CLI, then a table.

Each step is printed as the exact command a user would type, and run as one: a teacher is
trained on labels, precompute stores its soft labels, verify re-checks them, a student is
distilled from the store (no teacher in memory), and the same student is trained on labels
with the same recipe and epochs as the control.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["run_demo"]

RECIPE = "precompute/fmnist.yaml"


def _run(args: list[str]) -> str:
    print(f"\n$ kdlib {shlex.join(args)}", flush=True)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "kdlib", *args], stdout=subprocess.PIPE, text=True)
    print(proc.stdout, end="", flush=True)
    if proc.returncode:
        raise SystemExit(f"demo step failed (exit {proc.returncode}): kdlib {shlex.join(args)}")
    print(f"  ({time.time() - t0:.0f} s)", flush=True)
    return proc.stdout


def _last_json(text: str) -> dict:
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


def run_demo(out: str = "runs/demo", shards: str = "shards/demo", quick: bool = False) -> None:
    limit, epochs, teacher_epochs = ("512", "2", "2") if quick else ("12000", "4", "3")
    common = ["--data", "fashion-mnist", "--limit", limit]
    teacher, student, control = f"{out}/teacher", f"{out}/student", f"{out}/student-ce"
    recipe = str(Path(__file__).resolve().parent.parent / RECIPE) if not Path(RECIPE).exists() else RECIPE
    t0 = time.time()
    print(f"kdlib demo: Fashion-MNIST, first {limit} training images, full test split; runs in {out}, store in {shards}")
    _run(["train", *common, "--model", "resnet14", "--loss", "ce", "--recipe", recipe, "--epochs", teacher_epochs,
          "--batch-size", "256", "--overwrite", "--out", teacher])
    _run(["precompute", "--teacher", teacher, *common, "--recipe", recipe, "--epochs", epochs, "--out", shards])
    _run(["verify", "--shards", shards, "--teacher", teacher, "--views", "256"])
    _run(["train", "--shards", shards, "--student", "resnet8", "--epochs", epochs, "--batch-size", "256",
          "--overwrite", "--out", student])
    _run(["train", *common, "--model", "resnet8", "--loss", "ce", "--recipe", recipe, "--epochs", epochs,
          "--batch-size", "256", "--overwrite", "--out", control])
    rows = [("teacher resnet14, CE", _last_json(_run(["eval", "--model", teacher, "--split", "test"]))),
            ("student resnet8 from the cache (KL)", _last_json(_run(["eval", "--model", student, "--split", "test"]))),
            ("student resnet8, plain CE", _last_json(_run(["eval", "--model", control, "--split", "test",
                                                           "--shards", shards])))]
    print(f"\nFashion-MNIST test split ({rows[0][1]['images']} images), {epochs} student epochs on the "
          f"first {limit} training images, same recipe ({RECIPE}):\n")
    print(f"| {'model':<38} | top-1  | top-5  | agreement with teacher |")
    print(f"| {'-' * 38} | ------ | ------ | ---------------------- |")
    for name, r in rows:
        agree = f"{r['agreement']:.4f}" if "agreement" in r and "teacher" not in name else "-"
        print(f"| {name:<38} | {r['top1']:.4f} | {r['top5']:.4f} | {agree:<22} |")
    print(f"\nresults: {teacher}, {student}, {control} (model.safetensors, config.json, metrics.jsonl); "
          f"store: {shards}; total {time.time() - t0:.0f} s")
