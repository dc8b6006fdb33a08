"""kdlib.store: chunk round trips (local and fsspec memory://), commit records, checksums,
format versions, and refusal of a store written for something else (invariants 5 and 7)."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import numpy as np
import pytest
from conftest import CHUNK_VIEWS, LIMIT, STORE_K, snapshot

from kdlib.errors import CorruptStoreError, StoreError, StoreMismatchError, StoreNotFoundError, StoreVersionError
from kdlib.store import FORMAT_VERSION, ChunkCache, StoreMeta, create_store, open_store
from kdlib.store.format import READABLE_VERSIONS


def _meta(**over) -> StoreMeta:
    d = dict(
        format_version=FORMAT_VERSION,
        backend="zarr",
        recipe={"name": "t", "size": 28},
        source={"fingerprint": "a" * 64, "data": "x"},
        teacher={"digest": "b" * 64, "id": "t"},
        num_classes=10,
        k=3,
        id_dtype="uint8",
        views_per_epoch=40,
        group_size=4,
        chunk_views=16,
    )
    d.update(over)
    return StoreMeta(**d)


def _random_chunk(meta: StoreMeta, n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, (dtype, trail) in meta.fields.items():
        shape = (n, *trail)
        if np.dtype(dtype).kind == "f":
            out[name] = rng.standard_normal(shape).astype(dtype)
        else:
            out[name] = rng.integers(
                0, np.iinfo(dtype).max if np.dtype(dtype).itemsize < 4 else 2**20, size=shape
            ).astype(dtype)
    return out


def _store_url(kind: str, tmp_path: Path) -> str:
    if kind == "local":
        return str(tmp_path / "s")
    return f"memory://kdlib-test-{uuid.uuid4().hex}/s"


# -- round trips ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["local", "memory"])
def test_chunk_round_trip(kind, tmp_path):
    url = _store_url(kind, tmp_path)
    meta = _meta()
    assert meta.chunks_per_epoch == 3 and meta.chunk_range(2) == (32, 40)  # last chunk is short
    store = create_store(url, meta)
    written = {}
    for epoch in (0, 1):
        for c in range(meta.chunks_per_epoch):
            a, b = meta.chunk_range(c)
            written[epoch, c] = _random_chunk(meta, b - a, seed=10 * epoch + c)
            store.write_chunk(epoch, c, written[epoch, c])
    reopened = open_store(url)
    assert reopened.meta == meta
    for epoch in (0, 1):
        assert reopened.committed_chunks(epoch) == {0, 1, 2} and reopened.epoch_complete(epoch)
        for c in range(3):
            got = reopened.read_chunk(epoch, c)
            assert set(got) == set(meta.fields)
            for name, a in written[epoch, c].items():
                assert got[name].dtype == a.dtype and got[name].shape == a.shape, name
                assert got[name].tobytes() == a.tobytes(), (epoch, c, name)
    # views across chunk boundaries, through the reader train uses
    cache = ChunkCache(reopened)
    joined = cache.views(1, 12, 36)
    expect = np.concatenate([written[1, 0]["lse"][12:], written[1, 1]["lse"], written[1, 2]["lse"][:4]])
    assert np.array_equal(joined["lse"], expect)


@pytest.mark.parametrize("kind", ["local", "memory"])
def test_write_chunk_refuses_bad_columns(kind, tmp_path):
    meta = _meta()
    store = create_store(_store_url(kind, tmp_path), meta)
    cols = _random_chunk(meta, 16, 0)
    with pytest.raises(StoreError, match="logits"):
        store.write_chunk(0, 0, {k: v for k, v in cols.items() if k != "logits"})
    with pytest.raises(StoreError, match="shape"):
        store.write_chunk(0, 0, {**cols, "lse": cols["lse"][:8]})
    assert store.committed_chunks(0) == set()


def test_meta_round_trip_and_fixture_store(store):
    meta = store.meta
    assert StoreMeta.from_dict(json.loads(json.dumps(meta.to_dict()))) == meta
    assert meta.k == STORE_K and meta.chunk_views == CHUNK_VIEWS and meta.epochs_done == 2
    assert meta.source["limit"] == LIMIT and meta.source["num_images"] == LIMIT
    assert meta.views_per_epoch == LIMIT // meta.recipe["images_per_group"] * meta.group_size
    chunk = store.read_chunk(1, 2)
    assert chunk["ids"].shape == (CHUNK_VIEWS, STORE_K) and chunk["logits"].dtype == np.float16
    # ids sorted by descending stored logit, and lse >= the top logit (it is a log-sum-exp)
    assert (np.diff(chunk["logits"].astype(np.float32), axis=1) <= 0).all()
    assert (chunk["lse"] >= chunk["logits"][:, 0].astype(np.float32) - 1e-3).all()
    assert all(len(set(row)) == STORE_K for row in chunk["ids"].tolist())


# -- commit records ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["local", "memory"])
def test_arrays_without_commit_record_do_not_count(kind, tmp_path):
    meta = _meta()
    store = create_store(_store_url(kind, tmp_path), meta)
    store.write_chunk(0, 0, _random_chunk(meta, 16, 0))
    # a killed writer: chunk 1's arrays are on disk, its commit record never came
    store.prepare_epoch(0)
    store._write_arrays(
        0,
        1,
        {k: np.ascontiguousarray(v, dtype=meta.fields[k][0]) for k, v in _random_chunk(meta, 16, 1).items()},
        {k: (16, 32) for k in meta.fields},
    )
    # ... and chunk 2's commit record was being put (temp name) when the process died
    store.fs.pipe_file(store._path("commits/e00000/c000002.json.tmp-deadbeef"), b'{"epoch": 0')
    reopened = open_store(store.url)
    assert reopened.committed_chunks(0) == {0}
    assert not reopened.epoch_complete(0)
    with pytest.raises(StoreError, match="not committed"):
        reopened.read_chunk(0, 1)
    with pytest.raises(StoreError, match="not committed"):
        ChunkCache(reopened).views(0, 0, 32)
    assert reopened.read_chunk(0, 0)["lse"].shape == (16,)


def test_fixture_store_with_a_lost_commit_reads_as_incomplete(store_copy):
    os.remove(Path(store_copy) / "commits" / "e00001" / "c000003.json")
    # meta.json still counts epoch 1 as done: opening the store says that they disagree (issue 12, row 11)
    with pytest.raises(CorruptStoreError, match="epoch 1 chunk 3 is not committed"):
        open_store(store_copy)
    meta = json.loads((Path(store_copy) / "meta.json").read_text())
    (Path(store_copy) / "meta.json").write_text(json.dumps({**meta, "epochs_done": 1}))
    s = open_store(store_copy)
    assert s.committed_chunks(0) == set(range(s.meta.chunks_per_epoch)) and s.epoch_complete(0)
    assert s.committed_chunks(1) == set(range(s.meta.chunks_per_epoch)) - {3}
    assert not s.epoch_complete(1)
    with pytest.raises(StoreError, match="epoch 1 chunk 3"):
        s.read_chunk(1, 3)


def test_resume_rewrites_only_the_missing_chunk(store_dir, store_copy, teacher_dir):
    """A killed precompute (epoch 1 chunk 3 never committed) resumes and ends as the uninterrupted run."""
    from kdlib.precompute import PrecomputeConfig, precompute

    s = open_store(store_copy)
    original = s.read_chunk(1, 3)
    os.remove(Path(store_copy) / "commits" / "e00001" / "c000003.json")
    s.write_meta(s.meta.replace(epochs_done=1))
    for column in ("image", "logits", "lse"):  # killed before these shards were written
        _shard_file(store_copy, 1, column, 3).unlink()
    before = snapshot(store_copy)
    recipe = Path(store_copy).parent / "recipe.json"
    recipe.write_text(json.dumps(s.meta.recipe))
    done = precompute(
        PrecomputeConfig(
            teacher=teacher_dir,
            data="fashion-mnist",
            out=store_copy,
            recipe=str(recipe),
            epochs=2,
            k=STORE_K,
            limit=LIMIT,
            chunk_views=CHUNK_VIEWS,
            workers=0,
        )
    )
    assert done.meta.epochs_done == 2 and done.epoch_complete(1)
    after = snapshot(store_copy)
    changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
    # only epoch 1's arrays (chunk 3's shards), its new commit record, meta.json and the log changed
    assert "commits/e00001/c000003.json" in changed and "meta.json" in changed
    assert not any(p.startswith("e00000/") or p.startswith("commits/e00000/") for p in changed), changed
    assert not any(p.startswith("commits/e00001/") and p != "commits/e00001/c000003.json" for p in changed)
    shards = {p for p in changed if p.startswith("e00001/")}
    assert all(p.split("/")[2:4] == ["c", "3"] for p in shards), shards
    assert {p.split("/")[1] for p in shards} >= {"image", "logits", "lse"}  # rewritten
    assert changed - shards <= {"commits/e00001/c000003.json", "meta.json", "logs/e00001/precompute-rank0.jsonl"}, (
        changed
    )
    got = done.read_chunk(1, 3)
    for k in ("image", "box", "flip", "partner", "mix", "lam", "cutbox", "ids"):
        assert got[k].tobytes() == original[k].tobytes(), k
    np.testing.assert_allclose(
        got["logits"].astype(np.float32), original["logits"].astype(np.float32), rtol=2**-10, atol=2e-3
    )


# -- corruption ----------------------------------------------------------------------------------
def _shard_file(store_dir: str, epoch: int, column: str, chunk: int) -> Path:
    base = Path(store_dir) / f"e{epoch:05d}" / column / "c"
    found = [p for p in base.rglob("*") if p.is_file() and p.relative_to(base).parts[0] == str(chunk)]
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize("column", ["image", "box", "logits", "lse"])
def test_flipped_byte_is_reported_corrupt(store_copy, column):
    f = _shard_file(store_copy, 0, column, 2)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    s = open_store(store_copy)
    with pytest.raises(CorruptStoreError) as err:
        s.read_chunk(0, 2)
    msg = str(err.value)
    assert ("corrupt" in msg or "checksum" in msg) and "epoch 0" in msg and "chunk 2" in msg, msg
    # the damage is local: other chunks still read
    assert s.read_chunk(0, 1)[column].shape[0] == CHUNK_VIEWS
    # and the train reader raises too, never returns the bad views
    with pytest.raises(CorruptStoreError):
        ChunkCache(s).views(0, 2 * CHUNK_VIEWS, 2 * CHUNK_VIEWS + 8)


@pytest.mark.parametrize("keep", [0.5, 3])
def test_truncated_shard_is_reported_corrupt(store_copy, keep):
    f = _shard_file(store_copy, 1, "logits", 0)
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep) if keep < 1 else keep])
    s = open_store(store_copy)
    with pytest.raises(CorruptStoreError) as err:
        s.read_chunk(1, 0)
    msg = str(err.value)
    assert ("corrupt" in msg or "checksum" in msg) and "epoch 1" in msg and "chunk 0" in msg, msg


def test_corrupt_commit_record_and_meta(store_copy):
    rec = Path(store_copy) / "commits" / "e00000" / "c000000.json"
    rec.write_bytes(rec.read_bytes()[:10])
    with pytest.raises(CorruptStoreError, match="commit record"):
        open_store(store_copy).read_chunk(0, 0)
    meta = Path(store_copy) / "meta.json"
    meta.write_text("{not json")
    with pytest.raises(CorruptStoreError, match="meta.json"):
        open_store(store_copy)


def test_missing_store_is_a_clear_error(tmp_path):
    with pytest.raises(StoreNotFoundError, match="meta.json"):
        open_store(str(tmp_path / "nowhere"))


# -- versions -------------------------------------------------------------------------------------
def test_unknown_format_version_is_refused(store):
    d = store.meta.to_dict()
    d["format_version"] = 99
    with pytest.raises(StoreVersionError) as err:
        StoreMeta.from_dict(d)
    msg = str(err.value)
    assert "99" in msg and str(list(READABLE_VERSIONS)) in msg, msg
    d.pop("format_version")
    with pytest.raises(StoreVersionError):
        StoreMeta.from_dict(d)


def test_newer_store_on_disk_is_refused(store_copy):
    meta = Path(store_copy) / "meta.json"
    d = json.loads(meta.read_text())
    d["format_version"] = 99
    meta.write_text(json.dumps(d))
    with pytest.raises(StoreVersionError, match="99"):
        open_store(store_copy)


# -- mismatched stores ------------------------------------------------------------------------------
def _mismatches(meta: StoreMeta) -> dict[str, StoreMeta]:
    return {
        "k": meta.replace(k=5),
        "teacher weights digest": meta.replace(teacher={**meta.teacher, "digest": "0" * 64}),
        "source fingerprint": meta.replace(source={**meta.source, "fingerprint": "f" * 64}),
        "recipe": meta.replace(recipe={**meta.recipe, "seed": meta.recipe["seed"] + 1}),
    }


@pytest.mark.parametrize("field", ["k", "teacher weights digest", "source fingerprint", "recipe"])
def test_create_store_refuses_a_store_written_for_something_else(store_copy, field):
    s = open_store(store_copy)
    wanted = _mismatches(s.meta)[field]
    before = snapshot(store_copy)
    with pytest.raises(StoreMismatchError) as err:
        create_store(store_copy, wanted)
    msg = str(err.value)
    assert f"{field}:" in msg, msg
    assert store_copy in msg
    assert snapshot(store_copy) == before
    # the same meta reopens the store (resume / extend), still without writing anything
    again = create_store(store_copy, s.meta)
    assert again.meta == s.meta and snapshot(store_copy) == before


def test_create_store_names_every_difference(store_copy):
    s = open_store(store_copy)
    wanted = s.meta.replace(k=4, teacher={**s.meta.teacher, "digest": "0" * 64})
    with pytest.raises(StoreMismatchError) as err:
        create_store(store_copy, wanted)
    assert "k:" in str(err.value) and "teacher weights digest:" in str(err.value)
    assert "source fingerprint" not in str(err.value)


# -- resume after a kill while an epoch was being prepared ------------------------------------------
@pytest.mark.parametrize("kind", ["local", "memory"])
def test_resume_after_kill_inside_prepare_epoch(kind, tmp_path):
    meta = _meta()
    store = create_store(_store_url(kind, tmp_path), meta)
    # what a process killed half-way through prepare_epoch(0) leaves: the group and its first 3 arrays
    store._root_group().require_group("e00000")
    for name, (dtype, trail) in list(meta.fields.items())[:3]:
        store._create("e00000", name, dtype, trail, meta.views_per_epoch, meta.chunk_views)
    resumed = open_store(store.url)
    resumed.prepare_epoch(0)  # what precompute calls again on resume
    cols = _random_chunk(meta, 16, 5)
    resumed.write_chunk(0, 0, cols)
    got = open_store(store.url).read_chunk(0, 0)
    assert all(got[k].tobytes() == a.tobytes() for k, a in cols.items())
