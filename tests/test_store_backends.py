"""One store suite run on every backend (zarr, wds): chunk round trips (local path, file:// and
memory:// URLs), commit records, checksums, truncation, test-split predictions, deterministic
bytes; then what only the webdataset backend promises: plain `webdataset` reads its shards."""

from __future__ import annotations

import io
import tarfile
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
from conftest import FMNIST_RECIPE, LIMIT, snapshot

from kdlib.errors import CorruptStoreError, StoreError
from kdlib.plan import make_plan
from kdlib.recipe import Recipe
from kdlib.store import FORMAT_VERSION, ChunkCache, Store, StoreMeta, create_store, open_store
from kdlib.store.format import BACKENDS
from kdlib.store.wds_backend import WdsStore, shard_urls

VIEWS, CHUNK, K = 1000, 256, 3  # 4 chunks per epoch, the last one short (232 views)
RECIPE = Recipe(mix="both")  # m=2 images x c=1 crop; mixup and cutmix: every column varies


@pytest.fixture(params=list(BACKENDS))
def backend(request) -> str:
    return request.param


def _meta(backend: str, **over) -> StoreMeta:
    d = dict(
        format_version=FORMAT_VERSION,
        backend=backend,
        recipe=RECIPE.digest_dict(),
        source={"fingerprint": "f" * 64, "data": "synthetic"},
        teacher={"digest": "d" * 64, "id": "t"},
        num_classes=10,
        k=K,
        id_dtype="uint8",
        views_per_epoch=VIEWS,
        group_size=RECIPE.group_size,
        chunk_views=CHUNK,
    )
    d.update(over)
    return StoreMeta(**d)


def _epoch(epoch: int) -> dict[str, np.ndarray]:
    """Every column of one epoch: the real plan of 1000 images, plus random soft labels."""
    sizes = np.random.default_rng(1234).integers(20, 64, size=(VIEWS, 2))
    cols = make_plan(RECIPE, sizes, epoch)
    rng = np.random.default_rng(100 + epoch)
    logits = np.sort(rng.standard_normal((VIEWS, K)), axis=1)[:, ::-1]
    cols.update(
        ids=rng.integers(0, 10, (VIEWS, K)).astype(np.uint8),
        logits=logits.astype(np.float16),
        lse=(logits[:, 0] + rng.random(VIEWS)).astype(np.float32),
    )
    assert len(cols["image"]) == VIEWS
    return cols


def _rows(cols: dict[str, np.ndarray], a: int, b: int) -> dict[str, np.ndarray]:
    return {k: v[a:b] for k, v in cols.items()}


def _write_epoch(store: Store, epoch: int, chunks=None) -> dict[str, np.ndarray]:
    cols = _epoch(epoch)
    store.prepare_epoch(epoch)
    for c in range(store.meta.chunks_per_epoch) if chunks is None else chunks:
        store.write_chunk(epoch, c, _rows(cols, *store.meta.chunk_range(c)))
    return cols


def _url(kind: str, tmp_path: Path) -> str:
    return {
        "local": lambda: str(tmp_path / "s"),
        "file": lambda: (tmp_path / "s").as_uri(),
        "memory": lambda: f"memory://kdlib-test-{uuid.uuid4().hex}/s",
    }[kind]()


def _same(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for k, a in want.items():
        assert got[k].dtype == a.dtype and got[k].shape == a.shape, k
        assert got[k].tobytes() == a.tobytes(), k


def _data_files(store: Store, epoch: int, chunk: int, column: str) -> tuple[str, int, int]:
    """(path, lo, hi): the file holding `column` of a chunk, and a byte range of its payload there."""
    if isinstance(store, WdsStore):
        path = store.tar_path(epoch, chunk)
        with tarfile.open(path) as tar:
            m = tar.getmember(f"e{epoch:05d}-c{chunk:06d}.{column}.npy")
        return path, m.offset_data + 128, m.offset_data + m.size  # past numpy's 128-byte .npy header
    shard = Path(store.root, f"e{epoch:05d}", column, "c", str(chunk))  # zarr shard: c/<chunk>[/0 per trailing dim]
    path = shard if shard.is_file() else next(p for p in sorted(shard.rglob("*")) if p.is_file())
    return str(path), 0, path.stat().st_size


# -- round trips ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["local", "file", "memory"])
def test_round_trip(backend, kind, tmp_path, request):
    url = _url(kind, tmp_path)
    meta = _meta(backend)
    assert meta.chunks_per_epoch == 4 and meta.chunk_range(3) == (768, 1000)  # last chunk is short
    store = create_store(url, meta)
    written = {0: _write_epoch(store, 0), 1: _write_epoch(store, 1, chunks=[0, 3])}
    reopened = open_store(url)
    assert type(reopened) is type(store) and reopened.backend == backend and reopened.meta == meta
    assert reopened.committed_chunks(0) == {0, 1, 2, 3} and reopened.epoch_complete(0)
    assert reopened.committed_chunks(1) == {0, 3} and not reopened.epoch_complete(1)
    assert reopened.committed_chunks(2) == set() and not reopened.epoch_complete(2)
    for epoch, chunks in ((0, range(4)), (1, (0, 3))):
        for c in chunks:
            _same(reopened.read_chunk(epoch, c), _rows(written[epoch], *meta.chunk_range(c)))
    with pytest.raises(StoreError, match="not committed"):
        reopened.read_chunk(1, 1)
    # a rewritten chunk (what resume does) replaces the old bytes
    other = _rows(_epoch(7), *meta.chunk_range(3))
    reopened.write_chunk(1, 3, other)
    _same(open_store(url).read_chunk(1, 3), other)


def test_chunk_cache_across_chunk_boundaries(backend, tmp_path):
    store = create_store(str(tmp_path / "s"), _meta(backend))
    cols = _write_epoch(store, 0)
    cache = ChunkCache(open_store(store.url))
    _same(cache.views(0, 200, 600), _rows(cols, 200, 600))  # chunks 0, 1, 2
    _same(cache.views(0, 700, 1000), _rows(cols, 700, 1000))  # into the short last chunk
    _same(cache.views(0, 300, 301), _rows(cols, 300, 301))


def test_bytes_without_commit_record_do_not_count(backend, tmp_path):
    store = create_store(str(tmp_path / "s"), _meta(backend))
    cols = _epoch(0)
    store.prepare_epoch(0)
    a, b = store.meta.chunk_range(1)
    store._write_arrays(0, 1, _rows(cols, a, b), {k: (a, b) for k in store.meta.fields})  # a kill before the commit
    reopened = open_store(store.url)
    assert reopened.committed_chunks(0) == set() and not reopened.epoch_complete(0)
    with pytest.raises(StoreError, match="not committed"):
        reopened.read_chunk(0, 1)
    if backend == "wds":
        assert shard_urls(reopened, 0, partial=True) == []
        with pytest.raises(StoreError, match="not complete"):
            shard_urls(reopened, 0)
    reopened.write_chunk(0, 1, _rows(cols, a, b))  # resume rewrites and commits it
    _same(reopened.read_chunk(0, 1), _rows(cols, a, b))


# -- corruption ----------------------------------------------------------------------------------
def test_flipped_byte_is_caught(backend, tmp_path):
    store = create_store(str(tmp_path / "s"), _meta(backend))
    cols = _write_epoch(store, 0)
    path, lo, hi = _data_files(store, 0, 1, "logits")
    data = bytearray(Path(path).read_bytes())
    data[(lo + hi) // 2] ^= 0x40
    Path(path).write_bytes(bytes(data))
    reopened = open_store(store.url)
    with pytest.raises(CorruptStoreError) as err:
        reopened.read_chunk(0, 1)
    msg = str(err.value)
    assert ("checksum" in msg or "corrupt" in msg) and "epoch 0 chunk 1" in msg and store.url in msg, msg
    if backend == "wds":  # the payload is plain: the crc32 catches it, naming the tar and member
        assert "checksum mismatch in column 'logits'" in msg and "e00000-c000001.tar" in msg, msg
    _same(reopened.read_chunk(0, 2), _rows(cols, *store.meta.chunk_range(2)))  # the rest still reads


def test_flipped_byte_in_tar_header_is_caught(tmp_path):
    store = create_store(str(tmp_path / "s"), _meta("wds"))
    _write_epoch(store, 0, chunks=[0])
    path = store.tar_path(0, 0)
    data = bytearray(Path(path).read_bytes())
    data[100] ^= 0x01  # the first member header's mode field: tar's header checksum catches it
    Path(path).write_bytes(bytes(data))
    with pytest.raises(CorruptStoreError, match="epoch 0 chunk 0"):
        open_store(store.url).read_chunk(0, 0)


def test_truncated_file_is_caught(backend, tmp_path):
    store = create_store(str(tmp_path / "s"), _meta(backend))
    _write_epoch(store, 0)
    path, lo, hi = _data_files(store, 0, 2, "lse")
    whole = Path(path).read_bytes()
    cuts = [len(whole) // 2, len(whole) - 1]
    if backend == "wds":  # also exactly at a member boundary: the tar reads as complete but short
        with tarfile.open(path) as tar:
            cuts.append(tar.getmembers()[3].offset)
    for cut in cuts:
        Path(path).write_bytes(whole[:cut])
        with pytest.raises(CorruptStoreError) as err:
            open_store(store.url).read_chunk(0, 2)
        assert "epoch 0 chunk 2" in str(err.value), (cut, str(err.value))


# -- test-split predictions, sizes, determinism ---------------------------------------------------
@pytest.mark.parametrize("kind", ["local", "memory"])
def test_test_predictions_round_trip(backend, kind, tmp_path):
    store = create_store(_url(kind, tmp_path), _meta(backend))
    assert store.read_test() is None
    rng = np.random.default_rng(5)
    preds = {
        "ids": rng.integers(0, 10, (37, K)).astype(np.uint8),
        "logits": rng.standard_normal((37, K)).astype(np.float16),
        "lse": rng.standard_normal(37).astype(np.float32),
    }
    store.write_test(preds, {"fingerprint": "t" * 64})
    reopened = open_store(store.url)
    assert reopened.meta.test == {"source": {"fingerprint": "t" * 64}, "views": 37}
    _same(reopened.read_test(), preds)


def test_bytes_on_disk(backend, tmp_path):
    store = create_store(str(tmp_path / "s"), _meta(backend))
    _write_epoch(store, 0)
    sizes = store.bytes_on_disk()
    assert set(sizes) <= set(store.meta.fields) and all(v > 0 for v in sizes.values())
    assert {"ids", "logits", "lse", "box"} <= set(sizes)
    per_view = sum(sizes.values()) / VIEWS
    raw = sum(np.dtype(dt).itemsize * int(np.prod(tr)) for dt, tr in store.meta.fields.values())
    assert raw == 49
    if backend == "wds":  # every byte of every epoch tar is attributed to exactly one column
        tars = [p for p in (tmp_path / "s" / "wds").iterdir() if p.name.startswith("e")]
        assert sum(p.stat().st_size for p in tars) == sum(sizes.values())
        assert raw < per_view < 2 * raw  # uncompressed: payload plus tar/npy headers
    else:
        assert per_view < raw  # zstd


def test_same_content_gives_same_bytes(backend, tmp_path):
    snaps = []
    for name in ("a", "b"):
        store = create_store(str(tmp_path / name), _meta(backend))
        _write_epoch(store, 0)
        snaps.append({k: v for k, v in snapshot(tmp_path / name).items() if not k.startswith("meta.json")})
    data = [k for k in snaps[0] if k.startswith("wds/" if backend == "wds" else "e00000/")]
    assert len(data) >= 4
    assert snaps[0] == snaps[1]  # data files and commit records, byte for byte


# -- webdataset only: the shards are plain webdataset ---------------------------------------------
def test_plain_webdataset_reads_shards(tmp_path):
    import webdataset as wds

    store = create_store(str(tmp_path / "s"), _meta("wds"))
    cols = _write_epoch(store, 0)
    _write_epoch(store, 1)
    urls = shard_urls(open_store(store.url), 0)
    assert urls == sorted(urls) and len(urls) == 4
    assert [Path(u).name for u in urls] == [f"e00000-c{c:06d}.tar" for c in range(4)]
    for pipeline in (
        wds.WebDataset(urls, shardshuffle=False).decode(),
        wds.WebDataset(
            urls, shardshuffle=False, nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker
        ).decode(),
    ):  # 1 node, 1 worker: all
        samples = list(pipeline)
        assert [s["__key__"] for s in samples] == [f"e00000-c{c:06d}" for c in range(4)]
        for c, s in enumerate(samples):
            got = {k[: -len(".npy")]: v for k, v in s.items() if k.endswith(".npy")}
            _same(got, _rows(cols, *store.meta.chunk_range(c)))
    # the file:// form of the same URLs works too, and epoch 1 has its own shards
    assert len(list(wds.WebDataset([Path(u).as_uri() for u in urls], shardshuffle=False))) == 4
    assert [Path(u).name for u in shard_urls(store, 1)] == [f"e00001-c{c:06d}.tar" for c in range(4)]


def test_tar_members_are_deterministic_and_sorted(tmp_path):
    store = create_store(str(tmp_path / "s"), _meta("wds"))
    _write_epoch(store, 0, chunks=[3])
    with tarfile.open(store.tar_path(0, 3)) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names) == [f"e00000-c000003.{c}.npy" for c in sorted(store.meta.fields)]
    assert all(
        (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode, m.type) == (0, 0, 0, "", "", 0o444, tarfile.REGTYPE)
        for m in members
    )
    assert not [p for p in (tmp_path / "s" / "wds").iterdir() if ".tmp-" in p.name]  # temp names moved away


def test_shard_urls_refuses_zarr_store_and_names_remote_urls(tmp_path):
    zarr_store = create_store(str(tmp_path / "z"), _meta("zarr"))
    with pytest.raises(StoreError, match="wds"):
        shard_urls(zarr_store, 0)
    url = f"memory://kdlib-test-{uuid.uuid4().hex}/s"
    store = create_store(url, _meta("wds"))
    _write_epoch(store, 0)
    urls = shard_urls(store, 0)
    assert all(u.startswith("memory://") and u.endswith(".tar") for u in urls)
    fs = fsspec.filesystem("memory")
    with tarfile.open(fileobj=io.BytesIO(fs.cat_file(urls[0]))) as tar:
        assert len(tar.getmembers()) == len(store.meta.fields)


# -- end to end: precompute --format wds, then train from it ---------------------------------------
def test_precompute_and_train_with_wds(teacher_dir, tmp_path):
    from kdlib.precompute import PrecomputeConfig, precompute
    from kdlib.train import TrainConfig, train

    out = tmp_path / "store"
    store = precompute(
        PrecomputeConfig(
            teacher=teacher_dir,
            data="fashion-mnist",
            out=str(out),
            recipe=FMNIST_RECIPE,
            epochs=1,
            k=3,
            limit=LIMIT,
            chunk_views=128,
            workers=0,
            backend="wds",
            test=False,
        )
    )
    assert isinstance(store, WdsStore) and store.meta.epochs_done == 1 and store.epoch_complete(0)
    assert len(shard_urls(store, 0)) == store.meta.chunks_per_epoch
    assert not list(out.glob("e0*"))  # no zarr arrays
    train(TrainConfig(out=str(tmp_path / "student"), shards=str(out), epochs=1, workers=0, eval=False, cpu=True))
    assert (tmp_path / "student" / "model.safetensors").is_file()
