"""kdlib.replay and examples/own_loop.py: a store replayed in a user's own loop, as `kdlib train` replays it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import LAUNCH, STORE_EPOCHS

from kdlib.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = str(REPO / "examples" / "own_loop.py")
# one thread per process in both runs: the same kernels, so the same floats
ENV = {
    **os.environ,
    "ACCELERATE_USE_CPU": "1",
    "OMP_NUM_THREADS": "1",
    "CUDA_VISIBLE_DEVICES": "",
    "PYTHONPATH": str(REPO),
}


def _replay(store_dir: str, **kw):
    from kdlib.replay import Replay

    return Replay.from_store(
        store_dir, **{"batch_size": 64, "workers": 0, "device": "cpu", "rank": 0, "world": 1, **kw}
    )


def test_ranks_read_their_share_of_every_global_batch(store_dir):
    one = [b.item["image"] for b in _replay(store_dir)]
    r0 = [b.item["image"] for b in _replay(store_dir, rank=0, world=2)]
    r1 = [b.item["image"] for b in _replay(store_dir, rank=1, world=2)]
    assert len(one) == len(r0) == len(r1) > 1
    for whole, a, b in zip(one, r0, r1):  # rank 0 the first half, rank 1 the second: the global order is fixed
        assert len(a) == len(b) == len(whole) // 2 and torch.equal(torch.cat([a, b]), whole)


def test_replay_batches_are_the_stored_views_and_labels(store_dir, store):
    from kdlib.softlabel import reconstruct

    replay = _replay(store_dir)
    assert replay.steps_per_epoch == store.meta.views_per_epoch // 64 and replay.epochs == STORE_EPOCHS
    batch = next(iter(replay))
    cols = store.read_chunk(0, 0)
    assert torch.equal(batch.item["image"], torch.from_numpy(cols["image"].astype(np.int64)))
    assert batch.views.dtype == torch.uint8 and batch.views.shape == (64, 1, 28, 28)
    dense = reconstruct(
        torch.from_numpy(cols["ids"].astype(np.int64)),
        torch.from_numpy(cols["logits"]),
        torch.from_numpy(cols["lse"]),
        store.meta.num_classes,
    )
    assert torch.equal(batch.teacher_logits, dense)
    mean, std = replay.source.mean_std()
    assert torch.allclose(batch.inputs, (batch.views.float() / 255 - mean[0]) / std[0])
    label, partner, lam = batch.labels
    assert label.shape == partner.shape == lam.shape == (64,)


def test_resume_from_a_step_and_cycle_stored_epochs(store_dir):
    full = [(b.step, b.epoch, b.item["image"]) for b in _replay(store_dir, epochs=STORE_EPOCHS + 1)]
    per_epoch = len(full) // (STORE_EPOCHS + 1)
    # epoch 2 replays stored epoch 0 (cycled)
    for a, b in zip(full[:per_epoch], full[STORE_EPOCHS * per_epoch :]):
        assert torch.equal(a[2], b[2]) and b[1] == STORE_EPOCHS
    resumed = _replay(store_dir, epochs=STORE_EPOCHS + 1, start_step=per_epoch + 3)
    rest = [(b.step, b.epoch, b.item["image"]) for b in resumed]
    assert len(resumed) == len(rest) == len(full) - per_epoch - 3
    assert all(x[0] == y[0] and x[1] == y[1] and torch.equal(x[2], y[2]) for x, y in zip(full[per_epoch + 3 :], rest))


def test_bad_replay_arguments_get_one_line(store_dir):
    with pytest.raises(ConfigError, match="multiple of group size"):
        _replay(store_dir, batch_size=63)
    with pytest.raises(ConfigError, match="larger than an epoch"):
        _replay(store_dir, batch_size=1 << 20)
    with pytest.raises(ConfigError, match="rank 2"):
        _replay(store_dir, rank=2, world=2)


def _losses(path: Path, key: str = "loss") -> list[float]:
    return [json.loads(line)[key] for line in path.read_text().splitlines()]


def test_own_loop_matches_kdlib_train_step_for_step(store_dir, tmp_path):
    """The example, run as a user runs it, with kdlib train's optimizer, schedule and clip: the same losses, bitwise."""
    settings = [
        "--lr",
        "0.002",
        "--weight-decay",
        "0.0005",
        "--warmup",
        "0.05",
        "--clip",
        "1.0",
        "--epochs",
        "1",
        "--batch-size",
        "64",
        "--workers",
        "0",
        "--seed",
        "3",
    ]
    train = subprocess.run(
        [
            sys.executable,
            "-m",
            "kdlib",
            "train",
            "--shards",
            store_dir,
            "--student",
            "resnet8",
            "--out",
            str(tmp_path / "run"),
            "--no-eval",
            "--cpu",
            *settings,
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    loop = subprocess.run(
        [
            sys.executable,
            EXAMPLE,
            "--shards",
            store_dir,
            "--student",
            "resnet8",
            "--optimizer",
            "adamw",
            "--log",
            str(tmp_path / "loop.jsonl"),
            *settings,
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert loop.returncode == 0, loop.stderr[-3000:]
    ours, theirs = _losses(tmp_path / "run" / "steps.jsonl"), _losses(tmp_path / "loop.jsonl")
    assert len(ours) == len(theirs) > 1
    assert ours == theirs  # bitwise on the CPU: the same views, targets, init, optimizer and schedule


def test_own_loop_with_any_torchvision_student_and_sgd(store_dir, tmp_path):
    loop = subprocess.run(
        [
            sys.executable,
            EXAMPLE,
            "--shards",
            store_dir,
            "--student",
            "mobilenet_v3_small",
            "--steps",
            "2",
            "--batch-size",
            "32",
            "--workers",
            "1",
            "--log",
            str(tmp_path / "l.jsonl"),
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert loop.returncode == 0, loop.stderr[-3000:]
    losses = _losses(tmp_path / "l.jsonl")
    assert len(losses) == 2 and all(np.isfinite(losses))


def test_own_loop_under_accelerate_launch_each_rank_reads_its_share(store_dir, tmp_path):
    log = tmp_path / "l.jsonl"
    proc = subprocess.run(
        [
            *LAUNCH,
            EXAMPLE,
            "--shards",
            store_dir,
            "--student",
            "resnet8",
            "--steps",
            "3",
            "--batch-size",
            "64",
            "--workers",
            "0",
            "--log",
            str(log),
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):  # two ranks really ran, each on half of each global batch
        rows = [json.loads(x) for x in Path(f"{log}.rank{rank}").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2, 3] and {r["views"] for r in rows} == {32}
        assert f"rank {rank}: 3 steps" in proc.stdout


def test_drop_last_false_keeps_each_epochs_last_smaller_batch(store_dir, store):
    n = store.meta.views_per_epoch
    batch = 48  # does not divide an epoch
    replay = _replay(store_dir, batch_size=batch, drop_last=False, epochs=1)
    sizes = [len(b.views) for b in replay]
    assert replay.steps_per_epoch == -(-n // batch) == len(sizes) and sum(sizes) == n and sizes[-1] == n % batch
    assert len(list(_replay(store_dir, batch_size=batch, epochs=1))) == n // batch  # the default drops it, as train


def test_chunk_cache_reads_each_chunk_once_ahead_of_the_batches(store_copy):
    """Told the batches, the cache reads the next chunk they need in a thread while the current one is
    served: every chunk once, in order, across epochs; a bad chunk read ahead fails where it is needed."""
    from kdlib.errors import CorruptStoreError
    from kdlib.store import ChunkCache, open_store
    from kdlib.views import Batch

    store = open_store(store_copy)
    reads: list[tuple[int, int]] = []
    real = store.read_chunk
    store.read_chunk = lambda e, c: reads.append((e, c)) or real(e, c)
    cv = store.meta.chunk_views
    batches = [Batch(e, a, a + 16) for e in (1, 0) for a in range(0, 3 * cv, 16)]  # 3 chunks of each epoch
    cache = ChunkCache(store)
    cache.expect(batches)
    first = cache.views(*batches[0])
    cache._ahead[(1, 1)].result()  # the next chunk was already being read
    assert reads == [(1, 0), (1, 1)]
    for e, a, b in batches:
        got = cache.views(e, a, b)
        want = real(e, a // cv)
        assert np.array_equal(got["ids"], want["ids"][a % cv : a % cv + 16])
    assert np.array_equal(first["lse"], real(1, 0)["lse"][:16])
    assert reads == [(1, 0), (1, 1), (1, 2), (0, 0), (0, 1), (0, 2)]

    (Path(store_copy) / "commits" / "e00000" / "c000001.json").write_text("{}")
    cache = ChunkCache(open_store(store_copy))
    cache.expect([Batch(0, 0, cv), Batch(0, cv, 2 * cv)])
    cache.views(0, 0, cv)  # chunk 1 is read ahead now (and fails): read again, and refused, where it is needed
    assert (0, 1) in cache._ahead
    with pytest.raises(CorruptStoreError, match="c000001.json"):
        cache.views(0, cv, 2 * cv)


def test_a_users_dataloader_forks_workers_after_the_parent_read(store_dir):
    """`data[i]` in the parent (its chunk cache reading ahead in a thread), then a plain DataLoader with
    forked workers over the same dataset: each worker reads for itself instead of waiting on the
    parent's read-ahead, which is not running there."""
    from torch.utils.data import DataLoader

    from kdlib.replay import rank_batches
    from kdlib.store import open_store
    from kdlib.targets import StoreTargets

    targets = StoreTargets(open_store(store_dir), None, None)
    data = targets.dataset(rank_batches(targets.views, 16, targets.recipe.group_size, 0, 1, 1))
    first = data[0]
    got = list(DataLoader(data, batch_size=None, num_workers=2, timeout=120))  # a hang fails by the timeout
    assert len(got) == len(data) >= 8
    assert torch.equal(got[0]["ids"], first["ids"]) and torch.equal(got[0]["views"], first["views"])
