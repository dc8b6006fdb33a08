"""Several machines as one job: two `accelerate launch` commands, machine rank 0 and 1, one process each
(CPU, gloo, rendezvous at 127.0.0.1), the way a SLURM script starts one launcher per node
(train/accelerate/slurm.sh). Precompute and train must give what one process gives: the same store
digest, and the same views in every global batch (steps.jsonl's digest of the gathered image ids).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from conftest import LIMIT, precompute_args, precompute_log

# CUDA hidden, one thread per rank (two ranks share this machine's cores)
CPU_ENV = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_machines(args: list[str], timeout: int = 600) -> None:
    """Start machine rank 0 and 1 (one process each) and wait for both; fail with their stderr."""
    port = free_port()
    procs = []
    for rank in (0, 1):
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_machines",
            "2",
            "--num_processes",
            "2",  # over all machines: one per machine here
            "--machine_rank",
            str(rank),
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            str(port),
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "kdlib",
            *args,
        ]
        procs.append(subprocess.Popen(cmd, env=CPU_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout))
    finally:
        for p in procs:
            p.kill()
    for rank, (p, (_, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"machine rank {rank} failed:\n{err[-4000:]}"


def test_two_machines_precompute_the_one_process_store(store_dir, store, tmp_path):
    meta = json.loads((Path(store_dir) / "meta.json").read_text())
    out = tmp_path / "two"
    launch_two_machines(
        [
            *precompute_args(meta["teacher"]["id"].removeprefix("run:"), out, batch_size=None),
        ]
    )
    from kdlib.store import open_store

    assert open_store(str(out)).content_digest() == store.content_digest()
    # each machine's process wrote its own chunks: two ranks really ran, disjoint halves
    chunks = {r: {(x["epoch"], x["chunk"]) for x in precompute_log(out, r)} for r in (0, 1)}
    assert chunks[0] and chunks[1] and not chunks[0] & chunks[1]


def test_two_machines_train_on_the_one_process_batches(store_dir, tmp_path):
    args = ["train", "--shards", store_dir, "--student", "resnet8", "--epochs", "1", "--batch-size", "32"]
    args += ["--workers", "0", "--no-eval", "--seed", "3"]
    launch_two_machines([*args, "--out", str(tmp_path / "two")])
    one = subprocess.run(
        [sys.executable, "-m", "kdlib", *args, "--out", str(tmp_path / "one")],
        env=CPU_ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-4000:]
    two, one = ([json.loads(x) for x in (tmp_path / d / "steps.jsonl").open()] for d in ("two", "one"))
    assert {s["world_size"] for s in two} == {2} and {s["world_size"] for s in one} == {1}
    assert [s["views"] for s in two] == [s["views"] for s in one]  # the same views in every global batch
    assert len(one) == LIMIT // 32
    # step 1 starts from the same weights: only the order of the gradient reduction differs
    assert abs(one[0]["loss"] - two[0]["loss"]) <= 1e-5 * abs(one[0]["loss"])
