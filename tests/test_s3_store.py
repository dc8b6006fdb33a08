"""Stores on object storage, against a real S3 server over HTTP (moto's server mode, tests/s3_server.py).

Written there, a store holds what a local one holds (the same content digest, zarr and wds); train
reads it with DataLoader workers (forked: s3fs is made again in each), verify, inspect and eval read
it; a flipped byte is caught; a second writer is refused by the lease; a killed writer's lease is
taken over and the run resumes chunk by chunk; a server gone mid-run, a missing bucket, wrong
credentials and an unreachable endpoint each end in one `error:` line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import (
    CHUNK_VIEWS,
    CLI_ENV,
    FMNIST_DIR,
    FMNIST_RECIPE,
    LIMIT,
    STORE_EPOCHS,
    STORE_K,
    kdlib_cli,
    one_line,
    precompute_args,
)
from s3_server import BUCKET

from kdlib.errors import CorruptStoreError, ObjectStoreError
from kdlib.store import open_store

PRE = dict(
    data="fashion-mnist",
    recipe=FMNIST_RECIPE,
    epochs=STORE_EPOCHS,
    k=STORE_K,
    limit=LIMIT,
    chunk_views=CHUNK_VIEWS,
)


def _precompute(teacher: str, url: str, **kw) -> str:
    from kdlib.precompute import PrecomputeConfig, precompute

    precompute(PrecomputeConfig(teacher=teacher, out=url, **{**PRE, **kw}))
    return url


@pytest.fixture(scope="module")
def s3_zarr(s3, teacher_dir) -> str:  # noqa: F811
    return _precompute(teacher_dir, s3.url("zarr"), workers=2)  # the loader's workers fork this process


@pytest.fixture(scope="module")
def s3_wds(s3, teacher_dir) -> str:  # noqa: F811
    return _precompute(teacher_dir, s3.url("wds"), workers=0, backend="wds", test=False)


def _env(s3, **extra) -> dict[str, str]:  # noqa: F811
    return {**CLI_ENV, "KDLIB_DATA": FMNIST_DIR, **s3.env(), **extra}


def _keys(s3, prefix: str) -> list[str]:  # noqa: F811
    fs = s3.fs()
    return sorted(fs.find(f"{BUCKET}/{prefix}")) if fs.exists(f"{BUCKET}/{prefix}") else []


def _committed(s3, name: str) -> set[tuple[int, int]]:  # noqa: F811
    done = set()
    for key in _keys(s3, f"{name}/commits"):
        parts = key.split("/")
        if parts[-2].startswith("e") and parts[-1].startswith("c"):
            done.add((int(parts[-2][1:]), int(parts[-1][1:7])))
    return done


def test_precompute_to_s3_gives_the_local_digest(s3, s3_zarr, s3_wds, store):  # noqa: F811
    local = store.content_digest()
    for url in (s3_zarr, s3_wds):
        remote = open_store(url)
        assert remote.content_digest() == local, url
        keys = _keys(s3, url.split("/", 3)[3])
        assert any(k.endswith("/meta.json") for k in keys)
        assert not [k for k in keys if ".tmp-" in k], keys  # one PUT per object: no temp objects
        assert remote.writer() is None


@pytest.mark.parametrize("workers", [0, 1, 2, 4])
def test_replay_from_s3_with_workers_equals_local(s3, s3_wds, store_dir, workers):  # noqa: F811
    """With forked DataLoader workers, the S3 store gives the same views and labels, and each chunk of an
    epoch is read once (its commit record fetched once), whatever the number of workers."""
    from kdlib import Replay

    bs = 16  # 4 batches per chunk: round-robin workers each meet every chunk
    got = Replay.from_store(s3_wds, batch_size=bs, epochs=2, workers=workers, device="cpu", rank=0, world=1)
    want = Replay.from_store(store_dir, batch_size=bs, epochs=2, workers=0, device="cpu", rank=0, world=1)
    s3.traffic.reset()
    n = 0
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a.views, b.views)
        for k, v in b.soft_labels.items():
            assert torch.equal(a.soft_labels[k], v), k
        n += 1
    assert n == got.total_steps >= 4
    reads = dict(s3.traffic.commits_read)
    meta = got.store.meta
    chunks = -(-(got.steps_per_epoch * bs) // meta.chunk_views)
    assert meta.epochs_done == 2 and chunks >= 2
    assert len(reads) == 2 * chunks and set(reads.values()) == {1}, reads  # every chunk of both epochs, once


def test_train_cli_reads_s3_with_default_workers(s3, s3_zarr, tmp_path):  # noqa: F811
    """`kdlib train --shards s3://...` with the default 2 workers (it used to die: "This class is not fork-safe");
    that the workers' views equal the local store's is test_replay_from_s3_with_workers_equals_local."""
    args = ["--student", "resnet8", "--batch-size", "64", "--epochs", "1", "--no-eval", "--cpu"]
    p = kdlib_cli("train", "--shards", s3_zarr, "--out", tmp_path / "s3", *args, env=_env(s3))
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "s3" / "steps.jsonl").read_text().splitlines()]
    assert len(rows) == -(-open_store(s3_zarr).meta.views_per_epoch // 64)
    assert all(r["loss"] is not None and r["loss"] > 0 for r in rows)


def test_verify_inspect_eval_read_s3(s3_zarr, teacher_dir, store):
    from kdlib.evaluate import evaluate
    from kdlib.inspect import inspect_store
    from kdlib.verify import verify

    assert verify(s3_zarr, teacher_dir, views=64, cpu=True)["ok"]
    assert inspect_store(s3_zarr, max_chunks=1)["digest"] == store.content_digest()
    assert evaluate(teacher_dir, shards=s3_zarr, limit=LIMIT, cpu=True)["agreement"] == 1.0


def test_storage_options_reach_the_store_without_aws_variables(s3, s3_wds, monkeypatch, capsys):  # noqa: F811
    """--storage-options (fsspec's options) alone: no AWS_* variable is set."""
    from kdlib import Replay
    from kdlib.cli import main

    for k in s3.env():
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("KDLIB_STORAGE_OPTIONS", "")  # restored after the command sets it
    monkeypatch.setattr(sys, "argv", ["kdlib", "inspect", s3_wds, "--storage-options", json.dumps(s3.options())])
    main()
    assert "digest" in capsys.readouterr().out
    # the Python API's way
    assert open_store(s3_wds, storage_options=s3.options()).meta.backend == "wds"
    replay = Replay.from_store(
        s3_wds, batch_size=128, epochs=1, workers=1, storage_options=s3.options(), rank=0, world=1
    )
    assert next(iter(replay)).views.shape[0] == 128


def test_configs_take_storage_options_and_never_record_them(s3, teacher_dir, tmp_path, monkeypatch):  # noqa: F811
    """PrecomputeConfig / TrainConfig(storage_options=...) alone reach the store, the data and the forked
    workers (no AWS_* variable set); the run dir does not keep them (credentials); the environment is
    left as it was."""
    from kdlib.train import TrainConfig, train

    for k in s3.env():
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.delenv("KDLIB_STORAGE_OPTIONS", raising=False)
    url = _precompute(teacher_dir, s3.url("api-options"), workers=2, storage_options=s3.options(), epochs=1)
    assert "KDLIB_STORAGE_OPTIONS" not in os.environ
    run = tmp_path / "run"
    opts = s3.options()
    cfg = TrainConfig(out=str(run), shards=url, epochs=1, workers=2, cpu=True, eval=False, storage_options=opts)
    assert opts["secret"] not in repr(cfg)
    train(cfg)
    assert (run / "model.safetensors").is_file()
    for f in run.rglob("*"):
        if f.is_file():
            assert opts["secret"].encode() not in f.read_bytes(), f
    assert "KDLIB_STORAGE_OPTIONS" not in os.environ


def test_storage_options_are_never_shown_and_must_be_json(store_dir, tmp_path):
    from kdlib.errors import ConfigError, SourceError
    from kdlib.source_base import using_storage_options
    from kdlib.students import check_students
    from kdlib.train import TrainConfig

    secret = {"key": "K", "secret": "SUPERSECRET"}
    cfgs = [
        TrainConfig(out=str(tmp_path / n), shards=store_dir, storage_options=o) for n, o in (("a", secret), ("b", None))
    ]
    with pytest.raises(ConfigError, match="storage_options differs") as e:
        check_students(cfgs)
    assert "SUPERSECRET" not in str(e.value) and "set" in str(e.value)
    with pytest.raises(SourceError, match="JSON-serialisable"):
        with using_storage_options({"client_kwargs": {"config": object()}}):
            pass


@pytest.mark.parametrize("backend", ["zarr", "wds"])
def test_flipped_byte_in_an_s3_chunk_is_caught(s3, s3_zarr, s3_wds, backend):  # noqa: F811
    url = s3_zarr if backend == "zarr" else s3_wds
    key = f"{BUCKET}/{backend}/" + ("e00000/lse/c/0" if backend == "zarr" else "wds/e00000-c000000.tar")
    fs = s3.fs()
    good = fs.cat_file(key)
    bad = bytearray(good)
    bad[len(bad) // 3] ^= 0x01
    fs.pipe_file(key, bytes(bad))
    try:
        with pytest.raises(CorruptStoreError, match=f"{url} epoch 0 chunk 0"):
            open_store(url).read_chunk(0, 0)
    finally:
        fs.pipe_file(key, good)
    open_store(url).read_chunk(0, 0)


# -- a second writer, a killed writer, the server gone: subprocesses of the real CLI ---------------
def _precompute_args(teacher: str, url: str) -> list[str]:
    return precompute_args(teacher, url, "--no-test", "--cpu")


def _start_once_a_chunk_is_committed(
    s3,  # noqa: F811
    args: list[str],
    name: str,
    env: dict,
    after: set = frozenset(),
) -> subprocess.Popen:
    """`kdlib ARGS` started, once it has committed a chunk (beyond those in `after`)."""
    p = subprocess.Popen([sys.executable, "-m", "kdlib", *args], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not _committed(s3, name) - after:
        assert p.poll() is None, p.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.02)
    return p


def _stderr_within(p: subprocess.Popen, timeout: float) -> str:
    """The process's stderr once it has ended; if it has not ended in time, it fails the test with a dump
    of every thread's stack (faulthandler, on SIGABRT: run it with PYTHONFAULTHANDLER=1)."""
    try:
        return p.communicate(timeout=timeout)[1]
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGABRT)
        raise AssertionError(f"still running after {timeout} s:\n{p.communicate()[1][-12000:]}") from None


def _log_chunks(s3, name: str) -> list[tuple[int, int]]:  # noqa: F811
    """Rank 0's precompute log lines, epoch by epoch (a log per epoch)."""
    keys = [k for k in _keys(s3, f"{name}/logs") if k.endswith("/precompute-rank0.jsonl")]
    raw = b"".join(s3.fs().cat_file(k) for k in keys).decode()
    return [(r["epoch"], r["chunk"]) for r in map(json.loads, raw.splitlines())]


def test_second_writer_refused_killed_writer_and_server_gone_then_resumed(s3, teacher_dir, store, monkeypatch, capsys):  # noqa: F811
    """One store, four precomputes: the first is stopped (SIGSTOP) holding its lease, so the second is refused
    in one line; the first is killed (SIGKILL) and the third takes its lease over and resumes, until the S3
    server goes away under it: one `error:` line naming the store; the server comes back and the fourth
    finishes. Each chunk is computed at most once over all four, and the store ends with the local digest."""
    name = "killed"
    url = s3.url(name)
    args = _precompute_args(teacher_dir, url)
    first = _start_once_a_chunk_is_committed(s3, args, name, _env(s3))
    first.send_signal(signal.SIGSTOP)  # alive, holding its lease, writing nothing
    try:
        assert first.poll() is None, "the first precompute finished before it could be stopped"
        code, line = _cli_line(monkeypatch, capsys, *args)  # the second: this process, with the same flags
        assert code == 1 and url in line and f"being written by pid {first.pid} on" in line, line
    finally:
        first.kill()
        first.wait()
    before = _committed(s3, name)
    every = {(e, c) for e in range(STORE_EPOCHS) for c in range(store.meta.chunks_per_epoch)}
    assert 0 < len(before) < len(every)

    # botocore's retries of a refused connection: ~6 s at the default 5; a hang dumps every thread (SIGABRT)
    env = _env(s3, AWS_MAX_ATTEMPTS="2", PYTHONFAULTHANDLER="1")
    third = _start_once_a_chunk_is_committed(s3, args, name, env, after=before)
    s3.stop()
    try:
        err = _stderr_within(third, 180)
    finally:
        s3.restart()
    assert f"took over the write lease of pid {first.pid} on" in err and "is gone" in err
    one_line(subprocess.CompletedProcess(args, third.returncode, "", err), 1, url, "cannot be reached")
    half = open_store(url)  # meta.json and the commit records agree, and every committed chunk is whole
    middle = _committed(s3, name)
    assert before < middle < every
    for epoch, chunk in middle:
        half.read_chunk(epoch, chunk)

    last = kdlib_cli(*args, env=_env(s3))
    assert last.returncode == 0, last.stderr[-3000:]
    assert f"took over the write lease of pid {third.pid} on" in last.stderr
    log = _log_chunks(s3, name)  # every chunk computed and committed, in order, by any of the runs
    assert len(log) == len(set(log)) and set(log) <= every, log  # none computed twice
    assert open_store(url).content_digest() == store.content_digest()
    assert not s3.fs().exists(f"{BUCKET}/{name}/precompute.lease")  # given back when the command ended


def test_the_precompute_log_on_a_server_gone_is_one_error_naming_the_store(s3, s3_wds):  # noqa: F811
    """The log beside the store is written as the store is: its fault names the store (it named only the
    endpoint, when a stopped server met the log write rather than a chunk's)."""
    store = open_store(s3_wds)
    s3.stop()
    try:
        with pytest.raises(ObjectStoreError, match="cannot be reached") as gone:
            store.log_chunk(0, 0, 9, teacher_batches=1)
    finally:
        s3.restart()
    assert str(gone.value).startswith(s3_wds), str(gone.value)


def test_stale_lease_is_taken_over_after_expiry(s3, teacher_dir, store_dir):  # noqa: F811
    """A lease from another host, expired: taken over, and the command says so; a live one: refused."""
    from kdlib.store.objectstore import Lease

    url = s3.url("stale")
    fs = s3.fs()
    fs.put(store_dir, f"{BUCKET}/stale", recursive=True)
    lease = {"owner": "pid 7 on elsewhere", "pid": 7, "host": "elsewhere", "token": "t"}
    fs.pipe_file(f"{BUCKET}/stale/precompute.lease", json.dumps({**lease, "expires": time.time() + 600}).encode())
    store = open_store(url)
    assert store.writer() == "pid 7 on elsewhere"
    with pytest.raises(Exception, match="being written by pid 7 on elsewhere"):
        store.lock_for_writing()
    fs.pipe_file(f"{BUCKET}/stale/precompute.lease", json.dumps({**lease, "expires": time.time() - 1}).encode())
    assert store.writer() is None
    store.lock_for_writing()
    record, _ = store._lease.read()
    assert record["token"] == store._lease.token and record["expires"] > time.time() + Lease.TTL_S / 2
    store.unlock()
    assert not fs.exists(f"{BUCKET}/stale/precompute.lease")


# -- bad input: one line each --------------------------------------------------------------------
def _cli_line(monkeypatch, capsys, *argv: str) -> tuple[int, str]:
    from kdlib.cli import main

    monkeypatch.setenv("KDLIB_STORAGE_OPTIONS", "")
    monkeypatch.setattr(sys, "argv", ["kdlib", *argv])
    with pytest.raises(SystemExit) as stop:
        main()
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if "error:" in x]
    assert len(lines) == 1 and "Traceback" not in err, err
    return stop.value.code, lines[0]


def test_missing_bucket_wrong_credentials_unreachable_endpoint(s3, s3_wds, monkeypatch, capsys):  # noqa: F811
    code, line = _cli_line(monkeypatch, capsys, "inspect", "s3://no-such-bucket/run")
    assert code == 2 and "bucket 'no-such-bucket' does not exist" in line and "s3://no-such-bucket/run" in line
    wrong = json.dumps({**s3.options(), "secret": "wrong"})
    code, line = _cli_line(monkeypatch, capsys, "inspect", s3_wds, "--storage-options", wrong)
    assert code == 1 and "access refused" in line and s3_wds in line
    s = __import__("socket").socket()
    s.bind(("127.0.0.1", 0))
    closed = f"http://127.0.0.1:{s.getsockname()[1]}"  # bound, never listening: connection refused
    try:
        nowhere = json.dumps(
            {**s3.options(), "endpoint_url": closed, "config_kwargs": {"retries": {"max_attempts": 1}}}
        )
        code, line = _cli_line(monkeypatch, capsys, "inspect", s3_wds, "--storage-options", nowhere)
    finally:
        s.close()
    assert code == 1 and "cannot be reached" in line and s3_wds in line and closed in line


def test_precompute_into_a_missing_bucket_creates_nothing(s3, teacher_dir, monkeypatch):  # noqa: F811
    from kdlib.errors import BucketNotFoundError

    with pytest.raises(BucketNotFoundError, match="no-such-bucket"):
        _precompute(teacher_dir, "s3://no-such-bucket/run", workers=0)
    assert not s3.fs().exists("no-such-bucket")


@pytest.mark.parametrize("backend", ["zarr", "wds"])
def test_store_reopens_its_filesystem_in_a_forked_process(s3_zarr, s3_wds, backend):
    """The fork itself, without a DataLoader: the child reads through the store object it inherited, whose
    filesystem (and zarr arrays) the parent had already used."""
    store = open_store(s3_zarr if backend == "zarr" else s3_wds)
    parent = store.fs
    want = store.read_chunk(0, 1)["lse"]
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: exit status 0 only if it read the same bytes
        try:
            os.write(w, store.read_chunk(0, 1)["lse"].tobytes())
            os._exit(0)
        except BaseException:
            os._exit(1)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        got = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert got == want.tobytes()
    assert store.fs is parent


def test_two_processes_precompute_to_s3_give_the_local_digest(s3, teacher_dir, store):  # noqa: F811
    """`accelerate launch` with 2 CPU processes writing one S3 store: each rank PUTs its own chunks."""
    from conftest import LAUNCH

    url = s3.url("two-ranks")
    args = [a for a in _precompute_args(teacher_dir, url) if a != "--cpu"]  # --cpu with ACCELERATE_USE_CPU
    env = _env(s3, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    p = subprocess.run([*LAUNCH, "-m", "kdlib", *args], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    assert open_store(url).content_digest() == store.content_digest()
    logs = _keys(s3, "two-ranks/logs")
    ranks = {r: [k for k in logs if k.endswith(f"/precompute-rank{r}.jsonl")] for r in (0, 1)}
    assert ranks[0] and ranks[1], ranks  # both ranks really ran and logged their chunks
    # a log per rank and epoch, each holding only its epoch's lines: an object store puts a log back whole for
    # each line, so one log for the run would cost O(chunks^2) bytes (GBs for a 100-epoch ImageNet store)
    for keys in ranks.values():
        assert len(keys) == STORE_EPOCHS, keys
        for e, key in enumerate(keys):
            lines = [json.loads(x) for x in s3.fs().cat_file(key).decode().splitlines()]
            assert lines and {x["epoch"] for x in lines} == {e}, (key, lines)
