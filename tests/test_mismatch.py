"""End to end through the real CLI: a store is refused, clearly and without damage, when the command
was given another source, another teacher, or another limit (invariants 5 and 7)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import CHUNK_VIEWS, LIMIT, REPO, STORE_K, snapshot


def _cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = ""
    return subprocess.run(
        [sys.executable, "-m", "kdlib", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def _precompute_args(store: str, teacher: str, limit: int) -> list[str]:
    # the store's own recipe, so that only the flag under test differs from what wrote the store
    meta = json.loads((Path(store) / "meta.json").read_text())
    recipe = Path(store).parent / "recipe.json"
    recipe.write_text(json.dumps(meta["recipe"]))
    return [
        "precompute",
        "--teacher",
        teacher,
        "--data",
        "fashion-mnist",
        "--recipe",
        str(recipe),
        "--epochs",
        "2",
        "--k",
        str(STORE_K),
        "--chunk-views",
        str(CHUNK_VIEWS),
        "--limit",
        str(limit),
        "--out",
        store,
        "--workers",
        "0",
    ]


def _assert_clear_refusal(p: subprocess.CompletedProcess, *words: str) -> None:
    assert p.returncode != 0, p.stdout + p.stderr
    err = p.stderr.lower()
    assert "traceback" not in err, p.stderr
    assert any(w in err for w in words), p.stderr


def test_precompute_with_another_source_is_refused(store_copy, teacher_dir):
    before = snapshot(store_copy)
    p = _cli(*_precompute_args(store_copy, teacher_dir, LIMIT // 2))
    _assert_clear_refusal(p, "fingerprint", "source")
    assert "source fingerprint" in p.stderr
    assert snapshot(store_copy) == before


def test_precompute_with_another_teacher_is_refused(store_copy, other_teacher_dir):
    before = snapshot(store_copy)
    p = _cli(*_precompute_args(store_copy, other_teacher_dir, LIMIT))
    _assert_clear_refusal(p, "teacher")
    assert "source fingerprint" not in p.stderr  # only what differs is named
    assert snapshot(store_copy) == before


def test_train_with_another_limit_is_refused(store_copy, tmp_path):
    before = snapshot(store_copy)
    out = tmp_path / "student"
    p = _cli(
        "train",
        "--shards",
        store_copy,
        "--student",
        "resnet8",
        "--epochs",
        "1",
        "--limit",
        str(LIMIT // 2),
        "--out",
        str(out),
        "--workers",
        "0",
        "--no-eval",
        "--cpu",
    )
    _assert_clear_refusal(p, "fingerprint", "limit")
    assert str(LIMIT // 2) in p.stderr and str(LIMIT) in p.stderr  # both limits are named
    assert not (out / "model.safetensors").exists()
    assert snapshot(store_copy) == before
