"""Issue 12: every bad input gets one clear line (exit 2), every environment fault one line (exit 1),
and nothing already written is lost. Each test runs the real CLI (`python -m kdlib`) on real stores,
and checks the exit status, the one `error:` line and what is, or is not, left on disk.

Read-only and full disks are real: a small tmpfs mounted for the test (root only; skipped elsewhere).
"""

from __future__ import annotations

import json
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import CLI_ENV as ENV
from conftest import TRAIN_FLAGS as TRAIN
from conftest import kdlib_cli as kdlib
from conftest import one_line, precompute_args, snapshot


@contextmanager
def tmpfs(path: Path, size: str, readonly: bool = False):
    """A real filesystem of `size` at `path` (root only), unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if readonly else "")
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if p.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({p.stderr.strip()}); run as root to test full/read-only disks")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def remount(path: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


# -- rows 1-3: recipes with wrong types are refused before anything is written --------------
@pytest.mark.parametrize(
    "text, words",
    [
        ('flip: "false"', ["flip='false'", "boolean"]),
        ('mix_prob: "0.3"', ["mix_prob='0.3'", "number"]),
        ('alpha: "1.0"', ["alpha='1.0'", "number"]),
        ("ratio: [0.5, .inf]", ["ratio=[0.5, inf]", "finite"]),
        ("scale: [0.5, .nan]", ["scale=", "finite"]),
    ],
)
def test_recipe_with_a_wrong_type_is_refused(text, words, teacher_dir, tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(f"size: 28\nmix: mixup\nimages_per_group: 2\n{text}\n")
    out = tmp_path / "store"
    p = kdlib(
        "precompute",
        "--teacher",
        teacher_dir,
        "--data",
        "fashion-mnist",
        "--recipe",
        recipe,
        "--limit",
        "64",
        "--workers",
        "0",
        "--out",
        out,
    )
    one_line(p, 2, str(recipe), *words)
    assert not out.exists()  # no half-created store


# -- rows 7, 8: a resume that changes the math is refused, listing the differences ----------
@pytest.fixture(scope="module")
def checkpointed_run(store_dir, tmp_path_factory) -> Path:
    """A finished 1-epoch run from the fixture store: checkpoint at step 8."""
    out = tmp_path_factory.mktemp("resume") / "run"
    p = kdlib("train", "--shards", store_dir, "--epochs", "1", *TRAIN, "--out", out)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (out / "checkpoint" / "state.json").is_file()
    return out


@pytest.fixture(scope="module")
def other_store(teacher_dir, tmp_path_factory) -> str:
    """Same teacher, source and recipe, k=5 instead of 3: another store."""
    out = tmp_path_factory.mktemp("other") / "store"
    args = precompute_args(teacher_dir, out, "--no-test")
    args[args.index("--k") + 1] = "5"
    p = kdlib(*args)
    assert p.returncode == 0, p.stderr[-3000:]
    return str(out)


def train_args(**flags: str) -> list[str]:
    """`kdlib train` with the fixture run's flags, some replaced (underscores for dashes)."""
    base = {"student": "resnet8", "batch_size": "32", "workers": "0", "epochs": "1", **flags}
    return [x for k, v in base.items() for x in (f"--{k.replace('_', '-')}", v)] + ["--no-eval", "--cpu"]


@pytest.mark.parametrize(
    "change, words",
    [
        ({"lr": "0.01"}, ["lr 0.002 -> 0.01"]),
        ({"loss": "dist"}, ["loss 'kl' -> 'dist'"]),
        ({"epochs": "3"}, ["epochs 1 -> 3"]),
        ({"student": "resnet14"}, ["student 'resnet8' -> 'resnet14'"]),  # row 8: was a state_dict traceback
        ({"shards": "OTHER"}, ["store.k 3 -> 5"]),
    ],
)
def test_resume_with_another_config_is_refused(change, words, checkpointed_run, store_dir, other_store):
    before = snapshot(checkpointed_run)
    flags = {"shards": store_dir, **change}
    if flags["shards"] == "OTHER":
        flags["shards"] = other_store
    p = kdlib("train", *train_args(**flags), "--out", checkpointed_run, "--resume")
    one_line(p, 2, "--resume refused", str(checkpointed_run / "checkpoint"), *words)
    assert snapshot(checkpointed_run) == before  # train_config.json still describes the run's first steps


def test_resume_with_only_harmless_changes_is_accepted(checkpointed_run, store_dir, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(checkpointed_run, run)
    p = kdlib(
        "train", "--shards", store_dir, "--epochs", "1", *TRAIN, "--checkpoint-every", "5", "--out", run, "--resume"
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stdout and "at step 8 of 8" in p.stdout


# -- row 13: an existing run dir is not overwritten without --resume or --overwrite ---------
def test_train_into_a_used_out_is_refused_unless_overwrite(checkpointed_run, store_dir, tmp_path):
    before = snapshot(checkpointed_run)
    p = kdlib("train", "--shards", store_dir, "--epochs", "1", *TRAIN, "--out", checkpointed_run)
    one_line(p, 2, str(checkpointed_run), "--resume", "--overwrite")
    assert snapshot(checkpointed_run) == before

    mine = tmp_path / "mine"  # the user's own directory, with their own config.json
    mine.mkdir()
    (mine / "config.json").write_text('{"mine": true}')
    (mine / "notes.txt").write_text("keep me")
    p = kdlib("train", "--shards", store_dir, "--epochs", "1", *TRAIN, "--out", mine)
    one_line(p, 2, "config.json", "--overwrite")
    assert (mine / "config.json").read_text() == '{"mine": true}'

    p = kdlib("train", "--shards", store_dir, "--epochs", "1", *TRAIN, "--out", mine, "--resume", "--overwrite")
    one_line(p, 2, "not both")

    (mine / ".model.safetensors.tmp-4242").write_bytes(b"what a killed run left")  # rundir.atomic_write's
    (mine / ".notes.txt.tmp-4242").write_text("the user's")
    p = kdlib("train", "--shards", store_dir, "--epochs", "1", *TRAIN, "--out", mine, "--overwrite")
    assert p.returncode == 0, p.stderr[-3000:]
    assert not (mine / ".model.safetensors.tmp-4242").exists() and (mine / ".notes.txt.tmp-4242").exists()
    assert (mine / "notes.txt").read_text() == "keep me"  # --overwrite replaces the run files only
    assert json.loads((mine / "config.json").read_text())["arch"] == "resnet8"
    assert (mine / "model.safetensors").is_file()


# -- rows 10, 11: a damaged commit record or an edited meta.json is a corrupt store ----------
def test_empty_commit_record_is_a_corrupt_store_naming_it(store_copy, tmp_path):
    record = Path(store_copy) / "commits" / "e00000" / "c000002.json"
    record.write_text("{}")
    from kdlib.errors import CorruptStoreError
    from kdlib.store import open_store

    with pytest.raises(CorruptStoreError, match="c000002.json"):
        open_store(store_copy).read_chunk(0, 2)
    out = tmp_path / "run"
    p = kdlib("train", "--shards", store_copy, "--epochs", "1", *TRAIN, "--out", out)
    one_line(p, 2, "commit record", str(record), "corrupt")
    assert not (out / "model.safetensors").exists()
    p = kdlib("inspect", store_copy)
    one_line(p, 2, str(record))


@pytest.mark.parametrize("field, factor", [("views_per_epoch", 2), ("views_per_epoch", 0.5), ("chunk_views", 2)])
def test_meta_inconsistent_with_commit_records_is_detected(field, factor, store_copy, tmp_path):
    meta_path = Path(store_copy) / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta[field] = int(meta[field] * factor)
    meta_path.write_text(json.dumps(meta))
    before = snapshot(store_copy)
    out = tmp_path / "run"
    p = kdlib("train", "--shards", store_copy, "--epochs", "1", *TRAIN, "--out", out)
    one_line(p, 2, str(meta_path), "commit records", "corrupt")
    assert not (out / "model.safetensors").exists()
    assert snapshot(store_copy) == before


# -- row 12: non-finite or negative float flags are refused by the CLI ----------------------
@pytest.mark.parametrize(
    "flag, value, why",
    [
        ("--lr", "nan", "not a finite number"),
        ("--lr", "inf", "not a finite number"),
        ("--lr", "-0.1", "must be > 0"),
        ("--lr", "0", "must be > 0"),
        ("--weight-decay", "-1", "must be >= 0"),
        ("--temperature", "nan", "finite"),
        ("--gamma", "0", "must be > 0"),
        ("--clip", "-inf", "finite"),
        ("--ce-weight", "-1", "must be >= 0"),
        ("--warmup", "nan", "finite"),
    ],
)
def test_bad_float_flag_is_refused(flag, value, why, tmp_path):
    out = tmp_path / "run"
    p = kdlib("train", "--data", "fashion-mnist", "--loss", "ce", flag, value, "--out", out)
    one_line(p, 2, flag, why)
    assert not out.exists()


def test_bad_float_in_a_train_config_file_is_refused(tmp_path):
    cfg = tmp_path / "train.yaml"
    cfg.write_text("lr: .nan\n")
    out = tmp_path / "run"
    p = kdlib("train", "--config", cfg, "--data", "fashion-mnist", "--loss", "ce", "--out", out)
    one_line(p, 2, "lr=nan", "finite")
    cfg.write_text('lr: "0.1"\n')
    one_line(kdlib("train", "--config", cfg, "--data", "fashion-mnist", "--loss", "ce", "--out", out), 2, "string")
    assert not out.exists()


# -- row 14: --out on a read-only filesystem ------------------------------------------------
@pytest.mark.parametrize("what", ["train", "zarr", "wds"])
def test_out_on_a_read_only_filesystem(what, teacher_dir, store_dir, tmp_path):
    with tmpfs(tmp_path / "ro", "1m", readonly=True) as ro:
        out = ro / "out"
        if what == "train":
            p = kdlib("train", "--shards", store_dir, "--epochs", "1", *TRAIN, "--out", out)
        else:
            p = kdlib(*precompute_args(teacher_dir, out, "--format", what))
        one_line(p, 1, str(out), "read-only file system")
        assert not out.exists()


# -- rows 15, 16: precompute into a full disk; a rerun after freeing space resumes -----------
@pytest.mark.parametrize("backend", ["zarr", "wds"])
def test_precompute_on_a_full_disk_says_so_and_resumes(backend, teacher_dir, store, tmp_path):
    with tmpfs(tmp_path / "small", "40k") as disk:
        out = disk / "store"
        p = kdlib(*precompute_args(teacher_dir, out, "--format", backend))
        one_line(p, 1, str(out), "no space left on device", "rerun the same command", "resumes")
        assert not [f for f in out.rglob("*") if ".tmp-" in f.name]  # no temp file left on failure
        remount(disk, "4m")
        if backend == "wds":  # what a writer killed mid-write would leave: removed on resume
            (out / "wds").mkdir(exist_ok=True)
            (out / "wds" / "e00000-c000001.tar.tmp-deadbeef").write_bytes(b"partial")
        else:  # zarr's own temp name for a shard being written (zarr.storage.LocalStore)
            (out / "e00000").mkdir(exist_ok=True)
            (out / "e00000" / f"0.{'ab' * 16}.partial").write_bytes(b"partial")
        p = kdlib(*precompute_args(teacher_dir, out, "--format", backend))
        assert p.returncode == 0, p.stderr[-3000:]
        assert not [f for f in out.rglob("*") if ".tmp-" in f.name or f.name.endswith(".partial")]
        from kdlib.store import open_store

        assert open_store(str(out)).content_digest() == store.content_digest()  # as if never interrupted


# -- row 17: a train checkpoint (or the final model) on a full disk ---------------------------
# One checkpoint of resnet8 is ~0.95 MB (weights + Adam moments), the model 0.32 MB. 1500k: room for
# one checkpoint, not for the swap to the next; 1100k with --checkpoint-every 0: room for the epoch-end
# checkpoint, not for model.safetensors after it.
@pytest.mark.parametrize(
    "size, every, kept, words",
    [
        ("1500k", "3", 3, ["checkpoint.tmp", "no space left on device", "previous checkpoint", "--resume"]),
        ("1100k", "0", 8, ["no space left on device", "--resume", "last checkpoint is kept"]),
    ],
)
def test_train_on_a_full_disk_keeps_the_last_checkpoint(size, every, kept, words, store_dir, tmp_path):
    with tmpfs(tmp_path / "small", size) as disk:
        out = disk / "run"
        args = ["train", "--shards", store_dir, "--epochs", "1", *TRAIN, "--checkpoint-every", every, "--out", out]
        one_line(kdlib(*args), 1, str(out), *words)
        assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == kept
        assert not (out / "checkpoint.tmp").exists()
        assert not (out / "model.safetensors").exists()
        remount(disk, "8m")
        p = kdlib(*args, "--resume")
        assert p.returncode == 0, p.stderr[-3000:]
        assert "resumed from" in p.stdout and f"at step {kept} of 8" in p.stdout
        assert (out / "model.safetensors").is_file()


# -- row 20: an error inside a DataLoader worker is the same one line ------------------------
def test_store_error_with_or_without_workers_prints_one_line(store_copy, tmp_path):
    """The store is read in the main process (workers decode images): the same one line with 0 or 1 worker."""
    record = Path(store_copy) / "commits" / "e00001" / "c000001.json"
    rec = json.loads(record.read_text())
    rec["crc32"]["lse"] ^= 1
    record.write_text(json.dumps(rec))
    lines = []
    for workers in ("0", "1"):
        args = ["train", "--shards", store_copy, "--epochs", "2", *TRAIN, "--out", tmp_path / f"w{workers}"]
        args[args.index("--workers") + 1] = workers
        lines.append(one_line(kdlib(*args), 2, "epoch 1 chunk 1", "checksum mismatch", "'lse'"))
    assert lines[0] == lines[1]
    assert "DataLoader" not in lines[1]
    debug = kdlib(*args[:-1], tmp_path / "debug", env={**ENV, "KDLIB_DEBUG": "1"})
    assert debug.returncode != 0 and "Traceback" in debug.stderr  # asked for: the whole story


# -- optional rows: one writer per store; a resumed epoch never mixes two plans ---------------
def test_second_precompute_into_a_store_being_written_is_refused(store_copy, teacher_dir):
    from kdlib.store import open_store

    holder = open_store(store_copy)
    holder.lock_for_writing()  # a real flock, as a running precompute holds it
    (Path(store_copy) / "precompute.lock").write_text("pid 999999 on elsewhere\n")  # who it says holds it
    before = snapshot(store_copy)
    p = kdlib(*precompute_args(teacher_dir, store_copy))
    one_line(p, 1, store_copy, "pid 999999 on elsewhere", "precompute.lock")
    assert snapshot(store_copy) == before
    holder.unlock()
    p = kdlib(*precompute_args(teacher_dir, store_copy))  # the lock is free: the complete store is reopened
    assert p.returncode == 0, p.stderr[-3000:]


def test_resume_with_a_changed_random_stream_is_refused(store_copy, teacher_dir):
    """Epoch 1 half written; its committed chunk 0 holds params another RNG stream drew (here: epoch 0's
    chunk 0, written and committed through the store's own API), so the plan drawn now differs."""
    from kdlib.store import open_store

    s = open_store(store_copy)
    s.write_chunk(1, 0, s.read_chunk(0, 0))
    last = s.meta.chunks_per_epoch - 1
    (Path(store_copy) / "commits" / "e00001" / f"c{last:06d}.json").unlink()
    s.write_meta(s.meta.replace(epochs_done=1))
    before = snapshot(store_copy)
    p = kdlib(*precompute_args(teacher_dir, store_copy))
    one_line(p, 2, "epoch 1", "chunk 0", "random stream changed", "new --out")
    after = snapshot(store_copy)
    for files in (before, after):
        files.pop("precompute.lock", None)  # it names whoever held the write lock last
    assert after == before  # nothing else written: no chunk of the other plan


# -- the rule: one line by default, the traceback only when asked for ------------------------
def test_debug_flag_shows_the_traceback_one_line_otherwise(tmp_path):
    args = ["train", "--shards", tmp_path / "nope", "--out", tmp_path / "run"]
    one_line(kdlib(*args), 2, "no store at", str(tmp_path / "nope"))
    p = kdlib("--debug", *args)
    assert p.returncode != 0 and "Traceback" in p.stderr and "StoreNotFoundError" in p.stderr
    assert not (tmp_path / "run").exists()


def test_store_source_path_from_meta_says_whose_path_it_is(store_copy, tmp_path):
    meta_path = Path(store_copy) / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["source"]["data"] = str(tmp_path / "moved-away")
    meta_path.write_text(json.dumps(meta))
    out = tmp_path / "run"
    p = kdlib("train", "--shards", store_copy, "--epochs", "1", *TRAIN, "--out", out)
    one_line(p, 2, str(tmp_path / "moved-away"), "meta.json", "give --data")
    assert not out.exists()
