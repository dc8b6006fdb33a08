"""The train checkpoint holds no pickle and never loads one (DESIGN invariant 8, issue 12 row 18),
and restores everything a bit-identical resume needs, in one process and in two."""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import LAUNCH

ENV = {
    **{k: v for k, v in os.environ.items() if k != "KDLIB_DATA"},
    "CUDA_VISIBLE_DEVICES": "",
    "PYTHONUNBUFFERED": "1",
}
TRAIN = ["--student", "resnet8", "--batch-size", "32", "--workers", "0", "--no-eval"]


class _Planted:
    """Unpickling this creates a directory: the proof that a file was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _plant(ckpt: Path, marker: Path) -> list[Path]:
    """The files accelerate 1.15's load_state unpickles, each one a payload."""
    payload = pickle.dumps(_Planted(marker))
    files = [
        ckpt / "custom_checkpoint_0.pkl",
        ckpt / "random_states_0.pkl",
        ckpt / "optimizer.bin",
        ckpt / "scheduler.bin",
    ]
    for f in files:
        f.write_bytes(payload)
    return files


def _kdlib(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kdlib", *map(str, args)], env=ENV, capture_output=True, text=True, timeout=600, **kw
    )


@pytest.fixture(scope="module")
def run_dir(store_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "run"
    p = _kdlib(
        "train", "--shards", store_dir, "--epochs", "1", *TRAIN, "--cpu", "--checkpoint-every", "3", "--out", out
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def test_checkpoint_holds_no_pickle(run_dir):
    ckpt = run_dir / "checkpoint"
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == ["model.safetensors", "optimizer.safetensors", "rng-0.json", "rng-0.safetensors", "state.json"]
    for p in ckpt.iterdir():
        head = p.read_bytes()[:2]
        assert head[:1] != b"\x80" and head != b"PK", f"{p} looks like a pickle or a torch zip"
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 8 and state["config"]["student"] == "resnet8"


def test_planted_pickle_is_never_loaded(run_dir, store_dir, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    marker = tmp_path / "UNPICKLED"
    _plant(run / "checkpoint", marker)
    p = _kdlib("train", "--shards", store_dir, "--epochs", "1", *TRAIN, "--cpu", "--out", run, "--resume")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stdout
    assert not marker.exists(), "a pickle in the checkpoint was loaded"


def test_pickled_checkpoint_alone_is_refused_not_loaded(run_dir, store_dir, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    for f in ("state.json", "model.safetensors", "optimizer.safetensors", "rng-0.json", "rng-0.safetensors"):
        (run / "checkpoint" / f).unlink()  # what an older kdlib (accelerate save_state) left
    marker = tmp_path / "UNPICKLED"
    _plant(run / "checkpoint", marker)
    (run / "checkpoint" / "model.safetensors").write_bytes((run / "model.safetensors").read_bytes())
    p = _kdlib("train", "--shards", store_dir, "--epochs", "1", *TRAIN, "--cpu", "--out", run, "--resume")
    assert p.returncode == 2, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "never unpickles" in last and "--overwrite" in last
    assert "Traceback" not in p.stderr
    assert not marker.exists()


def test_save_load_restores_model_optimizer_scheduler_and_rng(tmp_path):
    """In one process, with real accelerate: after load, the next step and the next draws are identical."""
    from accelerate import Accelerator

    from kdlib.checkpoint import load_checkpoint, save_checkpoint

    def build():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
        opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s))
        acc = Accelerator(cpu=True)
        net, opt = acc.prepare(net, opt)
        return acc, net, opt, sched

    def step(net, opt, sched, x):
        loss = net(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()

    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    acc, net, opt, sched = build()
    for _ in range(3):
        step(net, opt, sched, x)
    save_checkpoint(acc, tmp_path / "checkpoint", 3, net, opt, sched, {"k": 1})
    step(net, opt, sched, x)
    want = (
        {k: v.clone() for k, v in net.state_dict().items()},
        sched.get_last_lr(),
        torch.rand(3),
        np.random.rand(3),
        random.random(),
    )

    acc2, net2, opt2, sched2 = build()  # fresh objects, other RNG state
    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    assert load_checkpoint(acc2, tmp_path / "checkpoint", net2, opt2, sched2) == 3
    step(net2, opt2, sched2, x)
    got = (net2.state_dict(), sched2.get_last_lr(), torch.rand(3), np.random.rand(3), random.random())
    for k in want[0]:
        assert torch.equal(want[0][k], got[0][k]), k
    assert want[1] == got[1]
    assert torch.equal(want[2], got[2]) and np.array_equal(want[3], got[3]) and want[4] == got[4]


def test_save_after_a_kill_in_the_old_checkpoints_removal(tmp_path):
    """A kill while the replaced checkpoint (checkpoint.old) was being removed leaves part of it beside the new
    one: the run resumes from the new one, and its next save must not trip over the leftover (it did:
    'Directory not empty' on the rename, caught by a random kill in test_resume)."""
    from accelerate import Accelerator

    from kdlib.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint

    net = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    acc = Accelerator(cpu=True)
    ckpt = tmp_path / "checkpoint"
    save_checkpoint(acc, ckpt, 1, net, opt, sched, {})
    save_checkpoint(acc, ckpt, 2, net, opt, sched, {})
    old = tmp_path / "checkpoint.old"
    old.mkdir()  # what the kill left of step 1's checkpoint: some of its files
    (old / "model.safetensors").write_bytes((ckpt / "model.safetensors").read_bytes())
    assert find_checkpoint(ckpt) == ckpt
    assert load_checkpoint(acc, ckpt, net, opt, sched) == 2
    save_checkpoint(acc, ckpt, 3, net, opt, sched, {})
    assert load_checkpoint(acc, find_checkpoint(ckpt), net, opt, sched) == 3
    assert not old.exists()


CPU2 = {**ENV, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}


def test_two_process_run_killed_and_resumed_is_bit_identical(store_dir, tmp_path):
    from kdlib.resolve import load_model
    from kdlib.weights import weights_digest

    args = [
        *LAUNCH,
        "-m",
        "kdlib",
        "train",
        "--shards",
        store_dir,
        "--epochs",
        "2",
        *TRAIN,
        "--checkpoint-every",
        "3",
        "--seed",
        "3",
    ]
    p = subprocess.run([*args, "--out", str(tmp_path / "full")], env=CPU2, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [*args, "--out", str(out), "--resume"],
        env=CPU2,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    steps = out / "steps.jsonl"
    t0, killed = time.time(), False
    while proc.poll() is None and time.time() - t0 < 600:
        if steps.exists() and len(steps.read_text().splitlines()) >= 10:  # past the checkpoints of steps 3, 6, 8, 9
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
            killed = True
            break
        time.sleep(0.05)
    proc.wait()
    assert killed, "the run finished before the kill"
    assert json.loads((out / "checkpoint" / "state.json").read_text())["world_size"] == 2
    assert {p.name for p in (out / "checkpoint").glob("rng-*")} == {
        "rng-0.json",
        "rng-0.safetensors",
        "rng-1.json",
        "rng-1.safetensors",
    }
    p = subprocess.run([*args, "--out", str(out), "--resume"], env=CPU2, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stdout
    assert weights_digest(load_model(str(out))) == weights_digest(load_model(str(tmp_path / "full")))
    full = [json.loads(x) for x in (tmp_path / "full" / "steps.jsonl").read_text().splitlines()]
    resumed = [json.loads(x) for x in steps.read_text().splitlines()]
    assert [s["step"] for s in resumed] == list(range(1, 17))
    assert [(s["views"], s["loss"]) for s in resumed] == [(s["views"], s["loss"]) for s in full]
