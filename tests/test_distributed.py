"""Many processes, same result: real `accelerate launch` with 2 CPU processes (gloo).

`--cpu --num_processes 2` silently runs one process, and `--multi_gpu` without ACCELERATE_USE_CPU
runs two unsynchronised ones, so every test here checks that two ranks really ran.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from conftest import LAUNCH, STORE_EPOCHS, precompute_args, precompute_log

REPO = Path(__file__).resolve().parents[1]
# CUDA hidden: on a one-GPU machine rank 1 would otherwise look for a second device and exit
CPU_ENV = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def run(cmd: list[str], env: dict, ok: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if ok:
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}"
    return proc


def steps(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]


def test_two_processes_train_like_one(store_dir, tmp_path):
    args = [
        "-m",
        "kdlib",
        "train",
        "--shards",
        store_dir,
        "--student",
        "resnet8",
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "--workers",
        "0",
        "--no-eval",
        "--seed",
        "3",
    ]
    run([*LAUNCH, *args, "--out", str(tmp_path / "two")], CPU_ENV)
    run([sys.executable, *args, "--out", str(tmp_path / "one")], {**CPU_ENV, "OMP_NUM_THREADS": "2"})
    two, one = steps(tmp_path / "two"), steps(tmp_path / "one")
    assert {s["world_size"] for s in two} == {2} and {s["world_size"] for s in one} == {1}
    # the same views, step by step (digest of the gathered image ids of each global batch)
    assert [s["views"] for s in two] == [s["views"] for s in one]
    assert len(one) == 2 * (256 // 32)
    for a, b in zip(one, two):
        assert abs(a["lr"] - b["lr"]) < 1e-12  # the schedule does not depend on the world size
    # step 1 starts from the same weights: only the reduction order differs. Later, Adam's
    # normalised updates let those last-bit differences grow a little, never to another trajectory.
    assert abs(one[0]["loss"] - two[0]["loss"]) <= 1e-5 * abs(one[0]["loss"])
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) <= 5e-2 * abs(a["loss"]) + 1e-5, (a, b)
    from kdlib.resolve import load_model

    w1 = load_model(str(tmp_path / "one")).state_dict()
    w2 = load_model(str(tmp_path / "two")).state_dict()
    assert w1.keys() == w2.keys()  # saved as plain BatchNorm, loadable in one process
    rel = {
        k: float((w1[k].float() - w2[k].float()).norm() / (w1[k].float().norm() + 1e-12))
        for k in w1
        if w1[k].is_floating_point()
    }
    worst = max(rel, key=rel.get)
    # Same trajectory up to Adam-amplified rounding (small-gradient biases move by +-lr per step
    # either way); the exact math of one step is pinned above and in test_batchnorm.py.
    assert rel[worst] < 0.1, (worst, rel[worst])


def test_two_processes_precompute_the_same_store(store_dir, store, tmp_path):
    meta = json.loads((Path(store_dir) / "meta.json").read_text())
    out = tmp_path / "two"
    run(
        [
            *LAUNCH,
            "-m",
            "kdlib",
            *precompute_args(meta["teacher"]["id"].removeprefix("run:"), out, batch_size=None),
        ],
        CPU_ENV,
    )
    from kdlib.store import open_store

    two = open_store(str(out))
    assert two.content_digest() == store.content_digest()
    # the test split's teacher predictions: each rank predicted half, gathered and written once
    mine, ref = two.read_test(), store.read_test()
    assert ref is not None and mine.keys() == ref.keys()
    assert all(np.array_equal(mine[k], ref[k]) for k in ref), {k: np.abs(mine[k] - ref[k]).max() for k in ref}
    by_rank = {r: precompute_log(out, r) for r in (0, 1)}
    chunks = {r: {(x["epoch"], x["chunk"]) for x in lines} for r, lines in by_rank.items()}
    assert chunks[0] and chunks[1] and not chunks[0] & chunks[1]  # two ranks, disjoint chunks
    assert len(chunks[0]) + len(chunks[1]) == STORE_EPOCHS * store.meta.chunks_per_epoch


def test_unsynchronised_launch_is_refused(store_dir, tmp_path):
    """--multi_gpu on a CPU machine without ACCELERATE_USE_CPU forms no group: refuse, don't run twice."""
    env = {k: v for k, v in CPU_ENV.items() if k != "ACCELERATE_USE_CPU"}
    proc = run(
        [
            *LAUNCH,
            "-m",
            "kdlib",
            "train",
            "--shards",
            store_dir,
            "--epochs",
            "1",
            "--workers",
            "0",
            "--no-eval",
            "--out",
            str(tmp_path / "x"),
        ],
        env,
        ok=False,
    )
    if torch.cuda.is_available():  # a real GPU machine forms a NCCL group; nothing to refuse
        return
    assert proc.returncode != 0
    assert "ACCELERATE_USE_CPU=1" in proc.stderr
    assert not (tmp_path / "x" / "model.safetensors").exists()
    shutil.rmtree(tmp_path / "x", ignore_errors=True)


def test_a_launched_script_runs_several_commands_and_exits_cleanly(store_dir, tmp_path):
    """The Python API under `accelerate launch`: two trainings in one script (the first used to destroy
    the process group the second needs), and the group destroyed at exit (left to the interpreter's
    teardown, gloo aborted a finished run now and then: "terminate called without an active exception")."""
    script = tmp_path / "two_students.py"
    script.write_text(
        "import atexit, sys, torch\n"
        "# registered before kdlib's own exit hook, so it runs after it: is the group gone by then?\n"
        "atexit.register(lambda: print('group at exit', torch.distributed.is_initialized(), flush=True))\n"
        "import kdlib\n"
        "for seed in (0, 1):\n"
        "    cfg = kdlib.TrainConfig(out=f'{sys.argv[2]}/s{seed}', shards=sys.argv[1], student='resnet8', epochs=1,\n"
        "                            batch_size=64, workers=0, eval=False, seed=seed)\n"
        "    print('world', kdlib.train.train(cfg)['world_size'], flush=True)\n"
        "print('group after the commands', torch.distributed.is_initialized(), flush=True)\n"
    )
    proc = run([*LAUNCH, str(script), store_dir, str(tmp_path)], {**CPU_ENV, "PYTHONPATH": str(REPO)})
    assert proc.stdout.count("world 2") == 4, proc.stdout  # each rank, each training
    # the group lives for the script's next command, and is destroyed at exit (each rank)
    assert proc.stdout.count("group after the commands True") == 2, proc.stdout
    assert proc.stdout.count("group at exit False") == 2, proc.stdout
    assert "terminate called" not in proc.stderr
    for seed in (0, 1):
        assert {s["world_size"] for s in steps(tmp_path / f"s{seed}")} == {2}
        assert (tmp_path / f"s{seed}" / "model.safetensors").is_file()
