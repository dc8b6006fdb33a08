"""kdlib.students: several students from one pass over a store, each run dir what `kdlib train` writes alone."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import CLI_ENV, TRAIN_FLAGS, kdlib_cli, one_line

from kdlib.errors import ConfigError

# What differs between two runs of the same math: the wall clock.
CLOCK = ("seconds", "views_per_s")

# Three students that differ in what is each one's own: architecture, loss, optimizer, schedule, seed,
# evaluation and best checkpoint, grad-accum (steps of 3 batches: an epoch of 8 batches ends with a short one), EMA, checkpoints.
STUDENTS = [
    {"student": "resnet8", "seed": 0, "checkpoint_every": 5, "eval": True, "keep_best": "top1", "eval_every": 1},
    {"student": "resnet8", "seed": 1, "loss": "dist", "optimizer": "sgd", "lr": 0.05, "schedule": "constant"},
    {"student": "resnet8x2", "seed": 2, "grad_accum": 3, "ema": 0.9, "loss": "ttm", "weight_decay": 0.0},
]
SHARED = {"batch_size": 32, "epochs": 1, "workers": 0, "eval": False, "cpu": True, "log_every": 3}


def _files(root: Path) -> dict[str, bytes]:
    """Every file of a run dir, metrics.jsonl without its clock fields."""
    found = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.name == "train.lock":
            continue
        data = p.read_bytes()
        if p.name == "metrics.jsonl":
            rows = [json.loads(x) for x in data.decode().splitlines()]
            data = json.dumps([{k: v for k, v in r.items() if k not in CLOCK} for r in rows]).encode()
        found[str(p.relative_to(root))] = data
    return found


def _write(path: Path, students: list[dict], **top) -> Path:
    path.write_text(yaml.safe_dump({**top, "students": students}))
    return path


def test_one_pass_writes_each_run_dir_as_a_run_of_its_own(store_dir, tmp_path):
    from kdlib.students import read_students, train_students
    from kdlib.train import TrainConfig, train

    outs = [tmp_path / f"s{i}" for i in range(len(STUDENTS))]
    entries = [{"out": str(o), **s} for o, s in zip(outs, STUDENTS)]
    alone = {}
    for o, e in zip(outs, entries):  # each alone, then moved aside: the pass writes the same paths
        train(TrainConfig(shards=store_dir, **{**SHARED, **e}))
        alone[o] = _files(o)
        shutil.move(o, tmp_path / f"alone_{o.name}")
    cfgs = read_students(_write(tmp_path / "students.yaml", entries, shards=store_dir, **SHARED))
    result = train_students(cfgs)
    assert result["failed"] == [] and [r["steps"] for r in result["students"]] == [8, 8, 3]
    for o in outs:
        together = _files(o)
        assert "checkpoint/model.safetensors" in together and "model.safetensors" in together
        assert together.keys() == alone[o].keys()
        differ = [k for k in together if together[k] != alone[o][k]]
        assert differ == [], (o.name, differ)


def _killed_after(args: list[str], log: Path, n: int) -> None:
    """`kdlib train ARGS`, killed once its steps.jsonl has `n` rows (a run stopped mid-epoch)."""
    proc = subprocess.Popen([sys.executable, "-m", "kdlib", "train", *args], env=CLI_ENV, stdout=subprocess.DEVNULL)
    t0 = time.time()
    while proc.poll() is None and time.time() - t0 < 300:
        if log.exists() and len(log.read_text().splitlines()) >= n:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert len(log.read_text().splitlines()) >= n, "the run ended before it could be stopped"


def test_resumed_failing_and_new_students_in_one_pass(store_dir, tmp_path):
    """A pass of three: `a` resumed mid-epoch from its checkpoint, `b` new, `bad` whose loss turns non-finite.
    `bad` stops alone with one error line; `a` and `b` end as their runs alone do, bit for bit; the pass is
    then resumed without `bad`."""
    from kdlib.students import read_students, train_students
    from kdlib.train import TrainConfig, train

    a, b, bad = tmp_path / "a", tmp_path / "b", tmp_path / "bad"
    _killed_after(
        ["--shards", store_dir, "--out", a, "--checkpoint-every", "2", "--log-every", "1", *TRAIN_FLAGS],
        a / "steps.jsonl",
        5,
    )
    shutil.copytree(a, tmp_path / "a_stopped")
    common = {"shards": store_dir, **SHARED, "resume": True, "precision": "auto"}  # as the CLI gives it
    train(TrainConfig(out=str(a), **common, checkpoint_every=2))  # a, resumed alone: the reference
    ref_a = _files(a)
    shutil.rmtree(a)
    shutil.copytree(tmp_path / "a_stopped", a)
    train(TrainConfig(out=str(b), **common, seed=4))  # b alone (a new run: nothing to resume)
    ref_b = _files(b)
    shutil.rmtree(b)

    entries = [
        {"out": str(a), "checkpoint_every": 2},
        {"out": str(bad), "lr": 1e30, "clip": 0.0, "log_every": 1},
        {"out": str(b), "seed": 4},
    ]
    path = _write(tmp_path / "s.yaml", entries, student="resnet8", **common)
    p = kdlib_cli("train", "--students", path)
    assert p.returncode == 1, p.stderr[-2000:]
    errors = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and str(bad) in errors[0] and "the other students go on" in errors[0], p.stderr[-2000:]
    assert "training loss" in errors[0]
    assert (
        json.loads((bad / "failed.json").read_text())["reason"] == "loss" and not (bad / "model.safetensors").exists()
    )
    assert "b=0." in p.stderr and "bad=stopped" in p.stderr  # the bar shows each student's loss
    for out, ref in ((a, ref_a), (b, ref_b)):
        got = _files(out)
        assert got.keys() == ref.keys() and [k for k in got if got[k] != ref[k]] == [], out.name

    # resumed without bad: both are done, nothing changes, nothing fails
    before = {o: _files(o) for o in (a, b)}
    result = train_students(
        read_students(_write(tmp_path / "s2.yaml", [entries[0], entries[2]], student="resnet8", **common))
    )
    assert result["failed"] == [] and [r["steps"] for r in result["students"]] == [8, 8]
    assert all(_files(o)["model.safetensors"] == before[o]["model.safetensors"] for o in (a, b))


def test_bad_students_files_get_one_line_each_before_training(store_dir, tmp_path):
    x, y = str(tmp_path / "x"), str(tmp_path / "y")

    def refused(name: str, students: list, *words: str, **top) -> None:
        path = _write(tmp_path / f"{name}.yaml", students, **top)
        with pytest.raises(ConfigError) as err:
            read_students(path, {"shards": store_dir}, set())
        for w in words:
            assert w in str(err.value), (name, w, str(err.value))
        assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()

    from kdlib.students import read_students

    refused("same_out", [{"out": x}, {"out": x, "seed": 1}], "students 0 and 1 both write into --out", x)
    refused("nested_out", [{"out": x}, {"out": x + "/best", "seed": 1}], "student 1's out", "inside student 0's", x)
    refused("unknown", [{"out": x, "leraning_rate": 1}, {"out": y}], "unknown key", "leraning_rate", "student 0")
    refused("differ", [{"out": x}, {"out": y, "batch_size": 64}], "batch_size", "cannot differ", "batches")
    refused("teacher", [{"out": x}, {"out": y}], "online --teacher", "--shards", teacher="resnet8")
    refused("top_out", [{"out": x}], "each student its own", out=x)
    refused("bad_value", [{"out": x}, {"out": y, "ema": 1.5}], "student 1", "ema=1.5 must be <= 1")
    # the same checks hold for configs built in Python (the API), e.g. recipes that change the views
    from kdlib.students import check_students
    from kdlib.train import TrainConfig

    with pytest.raises(ConfigError, match="recipe differs between students"):
        check_students([TrainConfig(out=x), TrainConfig(out=y, recipe="precompute/fmnist.yaml")])
    # the CLI: one line, exit 1, nothing written
    path = _write(tmp_path / "cli.yaml", [{"out": x}, {"out": y, "epochs": 3}])
    one_line(kdlib_cli("train", "--shards", store_dir, "--students", path, *TRAIN_FLAGS), 2, "epochs", "cannot differ")
    one_line(kdlib_cli("train", "--shards", store_dir, "--students", path, "--out", x), 2, "drop --out")
    assert not (tmp_path / "x").exists()
