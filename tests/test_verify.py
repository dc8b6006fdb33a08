"""kdlib.verify (invariant 3): a fresh store replays within fp16; a tampered one fails, loudly."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO

from kdlib.errors import StoreMismatchError
from kdlib.store import open_store
from kdlib.verify import verify


def _cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["CUDA_VISIBLE_DEVICES"] = ""
    return subprocess.run(
        [sys.executable, "-m", "kdlib", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_fresh_store_verifies(store_dir, teacher_dir):
    r = verify(store_dir, teacher_dir, views=256)
    assert r["ok"] is True
    assert r["top1_agreement"] == 1.0
    assert r["logits_within_tolerance"] is True
    assert r["epochs"] == 2
    g = open_store(store_dir).meta.group_size
    assert r["views"] == math.ceil(256 / g) * g
    assert r["max_logit_error"] <= 2e-3 + 2**-11 * 50  # fp16 rounding of |logits| well below 50
    assert r["max_lse_error"] < 1e-3
    assert 0 <= r["mean_kl"] < 0.05  # k=3 of 10: only the invented tail differs


def _tamper_rolled_ids(store_dir: str, epoch: int, chunk: int) -> None:
    s = open_store(store_dir)
    cols = s.read_chunk(epoch, chunk)
    cols["ids"] = np.roll(cols["ids"], 1, axis=1)  # top-1 id is now the k-th
    s.write_chunk(epoch, chunk, cols)  # consistent checksums: only verify can tell


def test_tampered_store_fails_verify(store_copy, teacher_dir):
    _tamper_rolled_ids(store_copy, 1, 2)
    s = open_store(store_copy)
    s.read_chunk(1, 2)  # checksums are fine: this is not corruption
    r = verify(store_copy, teacher_dir, views=256)
    assert r["ok"] is False
    assert r["top1_agreement"] < 1.0
    assert r["logits_within_tolerance"] is False
    # and the command line says so with its exit status
    p = _cli("verify", "--shards", store_copy, "--teacher", teacher_dir, "--views", "256")
    assert p.returncode != 0, p.stdout + p.stderr
    assert "FAILED" in p.stderr, p.stderr


def test_tampered_params_fail_verify(store_copy, teacher_dir):
    """A stored view whose params no longer give the pixels the teacher saw (boxes moved)."""
    s = open_store(store_copy)
    for c in range(s.meta.chunks_per_epoch):
        cols = s.read_chunk(0, c)
        cols["flip"] = 1 - cols["flip"]
        cols["box"][:, 2:] = np.maximum(cols["box"][:, 2:] // 2, 1)
        s.write_chunk(0, c, cols)
    r = verify(store_copy, teacher_dir, views=256)
    assert r["ok"] is False and r["max_logit_error"] > 0.01


def test_other_teacher_is_refused(store_dir, other_teacher_dir):
    with pytest.raises(StoreMismatchError) as err:
        verify(store_dir, other_teacher_dir, views=64)
    assert "digest" in str(err.value) and store_dir in str(err.value)
