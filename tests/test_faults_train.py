"""Issue 20, rows 1, 2, 5 and 8: training that goes non-finite, two trainers into one run dir, a bad
test split found before the first step (and a model saved before the final evaluation), and a store
still being written. Each test runs the real CLI (`python -m kdlib`) on real files and processes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import CLI_ENV as ENV
from conftest import FMNIST_RECIPE, LIMIT, STORE_EPOCHS, one_line, smooth_jpegs
from conftest import TRAIN_FLAGS as TRAIN
from conftest import kdlib_cli as kdlib
from safetensors.torch import load_file


def strict_jsonl(path: Path) -> list[dict]:
    """Every line of `path` as strict JSON: a bare NaN or Infinity fails the test."""

    def refuse(name: str):
        pytest.fail(f"{path} holds a bare {name}: not JSON")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def wait_for(check, what: str, timeout: float = 180.0, proc: subprocess.Popen | None = None) -> None:
    t0 = time.time()
    while not check():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the process ended before {what}: {proc.stderr.read()[-3000:]}")
        if time.time() - t0 > timeout:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


# -- row 1: the first non-finite loss stops the run -------------------------------------------------
def test_diverging_lr_stops_at_the_first_nonfinite_loss(store_dir, tmp_path):
    out = tmp_path / "run"
    p = kdlib("train", "--shards", store_dir, "--epochs", "2", *TRAIN, "--lr", "1e6", "--out", out)
    failed = json.loads((out / "failed.json").read_text())
    line = one_line(p, 2, f"at step {failed['step']} (epoch 0)", "student resnet8", "--lr 1000000.0", "failed.json")
    assert failed["reason"] == "loss" and failed["loss"] in ("nan", "inf", "-inf"), failed
    assert f"loss is {failed['loss']}" in line
    steps = strict_jsonl(out / "steps.jsonl")
    assert [s["step"] for s in steps] == list(range(1, failed["step"] + 1))  # nothing logged past it
    assert steps[-1]["loss"] is None and all(s["loss"] is not None for s in steps[:-1])
    # nothing saved from the diverged weights: no model, no checkpoint (the first one was due at the epoch end)
    assert failed["last_checkpoint"] is None and "no checkpoint was written" in line
    assert not (out / "model.safetensors").exists() and not (out / "config.json").exists()
    assert not (out / "checkpoint").exists()
    assert not (out / "metrics.jsonl").exists() or strict_jsonl(out / "metrics.jsonl")
    # eval of the failed run says what happened, not "config.json is missing"
    ev = kdlib("eval", "--model", out, "--data", "fashion-mnist", "--limit", "64", "--workers", "0", "--cpu")
    one_line(ev, 2, "holds no trained model", f"stopped at step {failed['step']}", "failed.json", "--resume")


def test_a_checkpoint_is_never_written_from_nonfinite_weights(store_dir, tmp_path):
    """A checkpoint every step: each is written only after the losses before it were read and the weights
    checked; the last finite one stays, and --resume says what happened before going on."""
    out = tmp_path / "run"
    args = ["train", "--shards", store_dir, "--epochs", "2", *TRAIN, "--lr", "1e6", "--checkpoint-every", "1"]
    p = kdlib(*args, "--out", out)
    failed = json.loads((out / "failed.json").read_text())
    kept = failed["last_checkpoint"]
    one_line(p, 2, f"at step {failed['step']}", "student resnet8", f"checkpoint (step {kept}) is kept")
    assert kept is not None and kept < failed["step"], failed
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["step"] == kept
    weights = load_file(out / "checkpoint" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())
    strict_jsonl(out / "steps.jsonl")

    again = kdlib(*args, "--out", out, "--resume")
    assert f"stopped at step {failed['step']}" in again.stdout and "failed.json" in again.stdout, again.stdout
    assert f"resumed from {out / 'checkpoint'} at step {kept}" in again.stdout
    one_line(again, 2, f"at step {failed['step']}", "student resnet8")  # the same math diverges the same way


def test_nonfinite_weights_at_an_epochs_end_are_never_evaluated_or_kept(store_dir, tmp_path, students):
    """One step per epoch; epoch 1's step has a finite loss but leaves the weights infinite. The epoch's end
    checks them before its evaluation, metrics row and --keep-best see them: the run stops with one line,
    and only epoch 0 is in metrics.jsonl and best/."""
    out = tmp_path / "run"
    flags = [*TRAIN, "--batch-size", "256", "--student", "kd_students_t20:blows_up"]  # (the last one counts)
    p = kdlib("train", "--shards", store_dir, "--epochs", "3", *flags, "--optimizer", "sgd", "--lr", "1e30",
              "--schedule", "constant", "--eval-every", "1", "--keep-best", "top1", "--out", out, env=students)  # fmt: skip
    failed = json.loads((out / "failed.json").read_text())
    one_line(p, 2, "weights are not finite", "at step 2 (epoch 1)")
    assert failed["step"] == 2 and failed["last_checkpoint"] == 1, failed
    assert [r["epoch"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [0]
    assert json.loads((out / "best/config.json").read_text())["best"]["step"] == 1


STUDENTS = """
import os
import time

import torch
from torch import nn


class Scaled(nn.Module):
    def __init__(self, num_classes, scale):
        super().__init__()
        self.fc = nn.Linear(3, num_classes)
        self.scale = scale

    def forward(self, x):
        return self.fc(x.float().mean((2, 3))) * self.scale


def make(num_classes):
    return Scaled(num_classes, float("inf"))


def make_nan(num_classes):
    return Scaled(num_classes, float("nan"))


class Waits(Scaled):
    def forward(self, x):  # training lasts until the test says go: no race with a fast machine
        while self.training and not os.path.exists(os.environ["KD_GO_T20"]):
            time.sleep(0.05)
        return super().forward(x)


def waits(num_classes):
    return Waits(num_classes, 1.0)


class BlowsUp(Scaled):  # a finite output and loss while p is 0 (epoch 0's step), then at lr 1e30 the weights
    # are infinite after the second step, whose loss was still finite

    def __init__(self, num_classes):
        super().__init__(num_classes, 1.0)
        self.p = nn.Parameter(torch.zeros(()))

    def forward(self, x):  # on one class only (a shift of every logit has no gradient)
        y = super().forward(x)
        return torch.cat([y[:, :1] + self.p * 1e30, y[:, 1:]], 1)


def blows_up(num_classes):
    return BlowsUp(num_classes)
"""


@pytest.fixture
def students(tmp_path) -> dict:
    """The environment of a CLI run that can import the factories above (`kd_students_t20:...`)."""
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "kd_students_t20.py").write_text(STUDENTS)
    return {**ENV, "PYTHONPATH": str(mods), "KD_GO_T20": str(tmp_path / "go")}


def test_a_student_that_outputs_inf_stops_at_step_1(store_dir, tmp_path, students):
    out = tmp_path / "run"
    p = kdlib(
        "train", "--shards", store_dir, "--epochs", "1", *TRAIN, "--student", "kd_students_t20:make", "--out", out,
        env=students,
    )  # fmt: skip
    one_line(p, 2, "at step 1 (epoch 0)", "student kd_students_t20:make", "failed.json")
    assert json.loads((out / "failed.json").read_text())["step"] == 1
    assert strict_jsonl(out / "steps.jsonl")[0]["loss"] is None
    assert not (out / "model.safetensors").exists()


def test_an_online_teacher_with_nan_logits_is_named(tmp_path, students):
    out = tmp_path / "run"
    p = kdlib(
        "train", "--teacher", "kd_students_t20:make_nan", "--teacher-mean", "0.5", "--teacher-std", "0.5",
        "--data", "fashion-mnist", "--recipe", FMNIST_RECIPE, "--limit", LIMIT, "--epochs", "1", *TRAIN,
        "--out", out, env=students,
    )  # fmt: skip
    one_line(p, 2, "online teacher kd_students_t20:make_nan", "non-finite logits", "at step 1", "student resnet8")
    failed = json.loads((out / "failed.json").read_text())
    assert failed["reason"] == "teacher" and failed["teacher"] == "kd_students_t20:make_nan"
    strict_jsonl(out / "steps.jsonl")


# -- row 2: one trainer per run dir -------------------------------------------------------------
def start(*args, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "kdlib", *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_second_train_into_a_busy_out_is_refused(store_dir, tmp_path, students):
    from kdlib.store.base import FileLock

    out = tmp_path / "run"
    lock = str(out / "train.lock")
    first = start(
        "train", "--shards", store_dir, "--epochs", "2", *TRAIN, "--student", "kd_students_t20:waits", "--out", out,
        env=students,
    )  # fmt: skip
    try:
        wait_for(lambda: FileLock.holder(lock) is not None, "the first run's lock", proc=first)
        for extra in (["--overwrite"], ["--resume"], []):
            p = kdlib("train", "--shards", store_dir, "--epochs", "1", *TRAIN, "--out", out, *extra)
            one_line(p, 1, f"--out {out} is being trained into by pid {first.pid} on", "train.lock")
        assert first.poll() is None
        Path(students["KD_GO_T20"]).touch()  # the first run goes on
        stdout, stderr = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, stderr[-3000:]
    epochs = [m["epoch"] for m in strict_jsonl(out / "metrics.jsonl")]
    assert epochs == [0, 1]  # one run's rows, once each
    steps = [s["step"] for s in strict_jsonl(out / "steps.jsonl")]
    assert steps == list(range(1, len(steps) + 1))
    assert json.loads((out / "config.json").read_text())["arch"] == "kd_students_t20:waits"
    assert FileLock.holder(lock) is None  # dropped when the run ended


def test_a_killed_holders_forked_children_do_not_keep_its_lock(tmp_path):
    """DataLoader workers are forked children: when the process holding a run's or a store's lock is killed,
    the lock is free at once, not once its orphaned workers notice (seconds later; a requeue was refused,
    naming the dead pid)."""
    from kdlib.store.base import FileLock

    path = str(tmp_path / "train.lock")
    code = f"""if True:
        import os, signal, time
        from kdlib.store.base import FileLock
        lock = FileLock({path!r})
        assert lock.acquire() is None
        child = os.fork()
        if child == 0:  # a worker: lives on, holding nothing the parent's kill should wait for
            os.close(1), os.close(2), time.sleep(60), os._exit(0)
        print(child, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == -signal.SIGKILL, p.stderr
    child = int(p.stdout)
    try:
        os.kill(child, 0)  # alive
        assert FileLock.holder(path) is None
        assert FileLock(path).acquire() is None
    finally:
        os.kill(child, signal.SIGKILL)


def test_the_run_lock_dies_with_its_process(store_dir, tmp_path, students):
    from kdlib.store.base import FileLock

    out = tmp_path / "run"
    first = start(
        "train", "--shards", store_dir, "--epochs", "1", *TRAIN, "--student", "kd_students_t20:waits", "--out", out,
        env=students,
    )  # fmt: skip
    try:
        wait_for(lambda: FileLock.holder(str(out / "train.lock")) is not None, "the run's lock", proc=first)
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)
    p = kdlib("train", "--shards", store_dir, "--epochs", "1", *TRAIN, "--out", out, "--overwrite")
    assert p.returncode == 0, p.stderr[-3000:]
    assert (out / "model.safetensors").is_file()


# -- row 5: the test split is checked before the first step; the model is saved before the evaluation ----
@pytest.fixture
def folder(tmp_path) -> Path:
    """An ImageFolder with train/ (16 JPEGs) and test/ (8 JPEGs), 2 classes, and a recipe for it."""
    root = tmp_path / "data"
    for split, n, seed in (("train", 16, 1), ("test", 8, 2)):
        (root / split).mkdir(parents=True)
        smooth_jpegs(root / split, [(40, 32), (36, 44)], n, seed=seed)
    (tmp_path / "recipe.yaml").write_text("size: 24\n")
    return root


def folder_train(folder: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return kdlib(
        "train", "--data", folder, "--recipe", folder.parent / "recipe.yaml", "--batch-size", "8",
        "--workers", "0", "--cpu", "--epochs", "1", "--out", out, *extra,
    )  # fmt: skip


def test_a_test_class_the_train_split_lacks_is_refused_before_training(folder, tmp_path):
    (folder / "test" / "class7").mkdir()
    shutil.copy(folder / "test" / "class0" / "img0.jpg", folder / "test" / "class7" / "x.jpg")
    out = tmp_path / "run"
    p = folder_train(folder, out)
    one_line(p, 2, "class7", "not classes of the training split", "before training", "--no-eval")
    assert "train epoch" not in p.stderr  # no step was taken
    assert not out.exists()
    p = folder_train(folder, out, "--no-eval")  # what the line says to do
    assert p.returncode == 0, p.stderr[-3000:]


def test_an_unreadable_test_header_is_refused_before_training(folder, tmp_path):
    bad = folder / "test" / "class1" / "img3.jpg"
    bad.write_bytes(bad.read_bytes()[:20])  # cut before its frame header
    out = tmp_path / "run"
    one_line(folder_train(folder, out), 2, str(bad), "image header", "before training", "--no-eval")
    assert not out.exists()


def test_a_test_image_only_decoding_finds_bad_never_loses_the_model(folder, tmp_path):
    bad = folder / "test" / "class1" / "img3.jpg"
    whole = bad.read_bytes()
    bad.write_bytes(whole[: len(whole) * 2 // 3])  # the header reads; the pixels are cut short
    out = tmp_path / "run"
    p = folder_train(folder, out)
    one_line(p, 2, str(bad), "decode")
    assert "the trained model is saved in" in p.stdout, p.stdout
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    bad.write_bytes(whole)  # fixed: the saved model evaluates
    e = kdlib("eval", "--model", out, "--cpu", "--workers", "0")
    assert e.returncode == 0, e.stderr[-3000:]
    assert json.loads(e.stdout.strip().splitlines()[-1])["images"] == 8


# -- row 8: a store still being written --------------------------------------------------------
HOLD = """
import sys, time
from kdlib.store import open_store
store = open_store(sys.argv[1])
store.lock_for_writing()  # the flock a running precompute holds
print("locked", flush=True)
time.sleep(600)
"""


def test_training_from_a_store_being_written_says_so(store_copy, tmp_path):
    from kdlib.store import open_store

    holder = subprocess.Popen([sys.executable, "-c", HOLD, store_copy], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        out = tmp_path / "run"
        p = kdlib("train", "--shards", store_copy, "--epochs", "1", *TRAIN, "--out", out)
        assert p.returncode == 0, p.stderr[-3000:]
        notices = [line for line in p.stdout.splitlines() if "is being written by" in line]
        assert len(notices) == 1, p.stdout
        assert f"pid {holder.pid} on" in notices[0] and "precompute.lock" in notices[0]
        assert f"{STORE_EPOCHS} of its epochs are committed and only those are used" in notices[0]
        assert (out / "model.safetensors").is_file()  # training went on
    finally:
        holder.kill()
        holder.wait(timeout=60)
    assert open_store(store_copy).writer() is None  # the writer is gone: nothing to say
