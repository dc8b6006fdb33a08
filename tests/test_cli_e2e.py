"""End to end through the real CLI, as a new user runs it: teacher -> precompute -> student -> eval."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import FMNIST_RECIPE

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def kdlib(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "kdlib", *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"kdlib {' '.join(args)} failed:\n{proc.stderr[-3000:]}"
    return proc


def test_teacher_precompute_student_eval(tmp_path):
    lim = ["--limit", "384", "--workers", "0"]
    kdlib(
        "train",
        "--data",
        "fashion-mnist",
        "--model",
        "resnet8",
        "--loss",
        "ce",
        "--epochs",
        "2",
        "--batch-size",
        "64",
        "--out",
        "runs/teacher",
        *lim,
        cwd=tmp_path,
    )
    teacher = tmp_path / "runs/teacher"
    cfg = json.loads((teacher / "config.json").read_text())
    assert (teacher / "model.safetensors").is_file()
    assert cfg["arch"] == "resnet8" and cfg["num_classes"] == 10 and cfg["in_channels"] == 1
    assert len(cfg["mean"]) == 1 and 0.1 < cfg["mean"][0] < 0.5  # normalization comes from the source

    out = kdlib(
        "precompute",
        "--teacher",
        "runs/teacher",
        "--data",
        "fashion-mnist",
        "--recipe",
        FMNIST_RECIPE,
        "--epochs",
        "2",
        "--k",
        "3",
        "--out",
        "shards/run",
        *lim,
        cwd=tmp_path,
    )
    assert "2 epochs" in out.stdout
    meta = json.loads((tmp_path / "shards/run/meta.json").read_text())
    assert meta["epochs_done"] == 2 and meta["k"] == 3 and meta["test"]["views"] == 384

    out = kdlib(
        "train",
        "--shards",
        "shards/run",
        "--student",
        "resnet8",
        "--epochs",
        "3",
        "--batch-size",
        "64",
        "--out",
        "runs/student",
        "--workers",
        "0",
        cwd=tmp_path,
    )
    assert "stored epochs are cycled" in out.stdout  # 3 training epochs from 2 stored ones, said aloud
    metrics = [json.loads(line) for line in (tmp_path / "runs/student/metrics.jsonl").read_text().splitlines()]
    assert [m["stored_epoch"] for m in metrics if "epoch" in m] == [0, 1, 0]
    losses = [m["loss"] for m in metrics if "epoch" in m]
    assert losses[-1] < losses[0]  # it learns to match the teacher

    result = json.loads(
        kdlib("eval", "--model", "runs/student", "--split", "test", "--limit", "384", cwd=tmp_path).stdout
    )
    assert result["images"] == 384 and 0 <= result["top1"] <= result["top5"] <= 1
    # the teacher's test predictions were cached, so agreement is reported without loading the teacher
    assert 0.3 < result["agreement"] <= 1.0
    teacher_eval = json.loads(
        kdlib("eval", "--model", "runs/teacher", "--split", "test", "--limit", "384", cwd=tmp_path).stdout
    )
    assert abs(teacher_eval["top1"] - result["teacher_top1"]) < 1e-6  # cached predictions are the teacher's


def test_bad_input_gets_a_clear_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "kdlib", "train", "--shards", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "no store at" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "kdlib", "train", "--data", "no-such-data", "--out", str(tmp_path / "o")],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0 and "no-such-data" in proc.stderr and "Traceback" not in proc.stderr
