"""Nothing half-written counts: SIGKILL precompute and train at several points, rerun, compare.

Kill points are drawn from a seeded generator (reproducible, but not hand-picked), and each
kill lands while the process is working: after a given number of chunks (precompute) or
steps (train) have been logged.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from conftest import CHUNK_VIEWS, FMNIST_RECIPE, LIMIT, STORE_EPOCHS, STORE_K, precompute_args, precompute_log, snapshot

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def _lines(path: Path) -> list[dict]:
    """A JSONL file's records; a store's: its precompute logs' (a killed run's last lines are in its last
    epoch's log, so the order written is kept)."""
    if path.is_dir():
        return precompute_log(path)
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _run_until(cmd: list[str], log: Path, n: int, timeout: float = 300) -> bool:
    """Start `cmd`, SIGKILL it once `log` (a JSONL file, or a store's precompute logs) has n lines; False if
    it finished first."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < timeout:
        if len(_lines(log)) >= n:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.05)
    proc.wait()
    return False


def _committed(store: Path) -> set[tuple[int, int]]:
    return {(int(p.parent.name[1:]), int(p.stem[1:])) for p in store.glob("commits/e*/c*.json")}


def test_precompute_killed_at_random_points_resumes_to_the_same_store(teacher_dir, store, tmp_path):
    out = tmp_path / "store"
    cmd = [
        sys.executable,
        "-m",
        "kdlib",
        *precompute_args(teacher_dir, out, batch_size=32),
    ]
    log = out  # the store's precompute logs
    total = STORE_EPOCHS * store.meta.chunks_per_epoch
    kill_after = sorted(np.random.default_rng(2024).choice(np.arange(1, total - 1), size=3, replace=False))
    kills = 0
    for n in kill_after:
        before = _committed(out)
        logged = len(_lines(log))
        killed = _run_until(cmd, log, int(n))
        kills += killed
        # what the restarted run computed is only what was not committed before it started
        new = {(x["epoch"], x["chunk"]) for x in _lines(log)[logged:]}
        assert not new & before, f"chunks {sorted(new & before)} were computed again after a restart"
    assert kills >= 2, "the kills did not land while precompute was running"
    subprocess.run(cmd, env=ENV, check=True, capture_output=True, timeout=600)

    from kdlib.store import open_store

    resumed = open_store(str(out))
    assert resumed.meta.epochs_done == STORE_EPOCHS
    assert resumed.content_digest() == store.content_digest()  # identical to the uninterrupted run
    # every chunk was computed once, plus at most the one in flight at each kill (not logged)
    done = [(x["epoch"], x["chunk"]) for x in _lines(log)]
    assert len(done) == len(set(done)) <= total


def test_precompute_extends_a_store_without_touching_done_epochs(teacher_dir, store, tmp_path):
    from kdlib.precompute import PrecomputeConfig, precompute

    cfg = dict(
        teacher=teacher_dir,
        data="fashion-mnist",
        out=str(tmp_path / "s"),
        recipe=FMNIST_RECIPE,
        k=STORE_K,
        limit=LIMIT,
        chunk_views=CHUNK_VIEWS,
        workers=0,
        test=False,
    )
    precompute(PrecomputeConfig(epochs=1, **cfg))
    before = {k: v for k, v in snapshot(tmp_path / "s").items() if k != "meta.json" and not k.startswith("logs/")}
    extended = precompute(PrecomputeConfig(epochs=STORE_EPOCHS, **cfg))
    after = snapshot(tmp_path / "s")
    assert all(after[k] == v for k, v in before.items())  # epoch 0 untouched, byte for byte
    assert extended.meta.epochs_done == STORE_EPOCHS
    assert extended.content_digest() == store.content_digest()


def test_train_killed_mid_epoch_resumes_to_the_same_weights(store_dir, tmp_path):
    base = [
        sys.executable,
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
        "--checkpoint-every",
        "3",
    ]
    subprocess.run([*base, "--out", str(tmp_path / "full")], env=ENV, check=True, capture_output=True, timeout=600)
    out = tmp_path / "killed"
    steps_total = 2 * (256 // 32)
    kill_after = sorted(np.random.default_rng(7).choice(np.arange(4, steps_total - 1), size=2, replace=False))
    landed = 0
    for n in kill_after:
        landed += _run_until([*base, "--out", str(out), "--resume"], out / "steps.jsonl", int(n))
    assert landed >= 1
    proc = subprocess.run([*base, "--out", str(out), "--resume"], env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from" in proc.stdout

    from kdlib.resolve import load_model
    from kdlib.weights import weights_digest

    # CPU, same thread count, fixed order: bit-identical to the uninterrupted run
    assert weights_digest(load_model(str(out))) == weights_digest(load_model(str(tmp_path / "full")))
    full_steps = _lines(tmp_path / "full/steps.jsonl")
    resumed_steps = _lines(out / "steps.jsonl")
    assert [s["step"] for s in resumed_steps] == list(range(1, steps_total + 1))  # no step logged twice
    assert [s["views"] for s in resumed_steps] == [s["views"] for s in full_steps]
    # an epoch resumed mid-way reports the loss over all its steps, as the uninterrupted run does
    full_loss = {r["epoch"]: r["loss"] for r in _lines(tmp_path / "full/metrics.jsonl") if "epoch" in r}
    resumed_loss = {r["epoch"]: r["loss"] for r in _lines(out / "metrics.jsonl") if "epoch" in r}
    assert resumed_loss and all(resumed_loss[e] == full_loss[e] for e in resumed_loss), (resumed_loss, full_loss)


def test_resume_forgets_what_was_logged_after_the_checkpoint_and_a_torn_line(tmp_path):
    """What --resume does to the run dir's logs (2 steps per epoch, resumed from step 3, in epoch 1): the steps
    after step 3, the metrics rows of epoch 1 on and the final evaluations are dropped (they are logged again),
    and so is a line a kill tore (it stopped the resume with a traceback)."""
    from kdlib.train import _truncate_logs

    steps = [json.dumps({"step": s, "epoch": (s - 1) // 2, "digest": f"d{s}"}) for s in range(1, 6)]
    (tmp_path / "steps.jsonl").write_text("\n".join(steps) + '\n{"step": 6, "dig')
    metrics = [json.dumps({"epoch": e, "loss": 1.0}) for e in (0, 1)]
    finals = [json.dumps({"final_eval": {"top1": 0.5}}), json.dumps({"final_eval_ema": {"top1": 0.5}})]
    (tmp_path / "metrics.jsonl").write_text("\n".join(metrics + finals) + "\n")
    _truncate_logs(tmp_path, 3, 2)
    assert (tmp_path / "steps.jsonl").read_text() == "".join(s + "\n" for s in steps[:3])
    assert (tmp_path / "metrics.jsonl").read_text() == metrics[0] + "\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "steps.jsonl"]  # no temp file left
    (tmp_path / "metrics.jsonl").write_text("\n".join(metrics + finals) + "\n")
    _truncate_logs(tmp_path, 4, 2)  # from the checkpoint at epoch 1's end: its row (written before it) stays
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(m + "\n" for m in metrics)


def test_train_killed_at_an_epochs_checkpoint_keeps_its_evaluation_and_row(store_dir, tmp_path):
    """An epoch ends with its evaluation (--eval-every), its metrics row and --keep-best, then its checkpoint.
    Killed the moment that checkpoint is there, the resumed run's metrics.jsonl and best/ are the uninterrupted
    run's. (The checkpoint used to come first: a kill in the evaluation lost the epoch's row, evaluation and
    best for good, and left the final rows twice after a resume at the end.)"""
    base = [sys.executable, "-m", "kdlib", "train", "--shards", store_dir, "--student", "resnet8", "--epochs", "2",
            "--batch-size", "32", "--workers", "0", "--eval-every", "1", "--keep-best", "top1"]  # fmt: skip
    subprocess.run([*base, "--out", str(tmp_path / "full")], env=ENV, check=True, capture_output=True, timeout=600)
    out = tmp_path / "killed"
    spe = 256 // 32
    proc = subprocess.Popen([*base, "--out", str(out)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state, t0 = out / "checkpoint" / "state.json", time.time()
    while proc.poll() is None and time.time() - t0 < 300:
        if state.exists() and json.loads(state.read_text())["step"] == spe:  # (renamed in whole: never partial)
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed at epoch 0's checkpoint"
    done = subprocess.run([*base, "--out", str(out), "--resume"], env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]

    def rows(run: Path) -> list[dict]:  # less what differs between any two runs: timing, and where the run is
        def less(r: dict) -> dict:
            return {k: less(v) if isinstance(v, dict) else v for k, v in r.items() if k not in drop}

        drop = ("seconds", "views_per_s", "steps", "model")
        return [less(r) for r in _lines(run / "metrics.jsonl")]

    full = rows(tmp_path / "full")
    assert [r.get("epoch") for r in full] == [0, 1, None] and "eval" in full[0]
    assert rows(out) == full
    best = [json.loads((run / "best/config.json").read_text())["best"] for run in (out, tmp_path / "full")]
    assert best[0] == best[1]
