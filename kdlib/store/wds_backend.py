"""webdataset backend: one plain tar per chunk, for streaming epochs from object stores.

Layout under the store root (meta.json and commits/ are the shared ones, see `base.py`):

```
wds/e00000-c000000.tar   # chunk 0 of epoch 0: ONE tar sample, key "e00000-c000000"
    e00000-c000000.box.npy  e00000-c000000.cutbox.npy ... e00000-c000000.lse.npy
wds/e00000-c000001.tar
...
wds/test.tar             # the teacher on the test split: sample "test", members test.ids.npy ...
```

One sample holds a whole chunk of views (every column a `.npy` array with one row per view),
not one sample per view: a 512-byte tar header per 50-byte view would be mostly waste. File
names sort in training order (epoch, then chunk). Members are written in sorted name order with
fixed metadata (ustar, mtime 0, uid/gid 0, no user/group names, mode 0o444), so the same
content always gives the same bytes. The archive ends with the two zero blocks tar requires and
is not padded to tar's 10 KiB record size (every tar reader accepts that). No compression: the
columns are small and a plain tar can be read member by member; bytes are counted in
`bytes_on_disk`.

A chunk's tar is written to a temp name (`*.tar.tmp-XXXXXXXX`, never matched by `*.tar`) and
moved to its final name (atomic on a local filesystem; on object storage one PUT, atomic by
itself, writes the final name), then the base class writes the commit record; as everywhere, a
tar without a commit record does not exist.

Plain webdataset reads the shards with no kdlib code::

    import webdataset as wds
    from kdlib.store import open_store
    from kdlib.store.wds_backend import shard_urls

    store = open_store("shards/run")
    urls = shard_urls(store, epoch=0)            # training order, committed chunks only
    ds = wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node,
                        workersplitter=wds.split_by_worker).decode()
    for sample in ds:                            # one sample = one chunk of views
        key = sample["__key__"]                  # "e00000-c000003"
        lse = sample["lse.npy"]                  # numpy arrays, one row per view
        ids, logits = sample["ids.npy"], sample["logits.npy"]

`split_by_node` gives each rank (torch.distributed) every world_size-th shard and
`split_by_worker` each DataLoader worker every num_workers-th of those; since one shard is one
chunk, use at least ranks x workers chunks per epoch, or some readers get nothing. Splitting by
shard changes which views a rank sees: kdlib's own trainer instead reads each rank's slice of
every global batch through `ChunkCache` (global order fixed, DESIGN invariant 6).

URLs are local paths for a local store, otherwise fsspec URLs (`s3://...`, `gs://...`,
`https://...`); webdataset opens http(s) and gs itself, for others use a `pipe:` URL
(e.g. `f"pipe:aws s3 cp {url} -"`).
"""

from __future__ import annotations

import io
import posixpath
import tarfile
import uuid

import numpy as np

from ..errors import StoreError
from .base import TMP, Chunk, Store
from .objectstore import store_faults

__all__ = ["WdsStore", "shard_urls", "tar_bytes"]

DIR = "wds"
BLOCK = tarfile.BLOCKSIZE  # 512


def _key(epoch: int, chunk: int) -> str:
    return f"e{epoch:05d}-c{chunk:06d}"


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def tar_bytes(key: str, cols: Chunk) -> bytes:
    """A deterministic tar holding one webdataset sample `key` with one `.npy` member per column."""
    out = io.BytesIO()
    for name in sorted(cols):
        data = _npy(cols[name])
        info = tarfile.TarInfo(f"{key}.{name}.npy")
        info.size, info.mtime, info.mode = len(data), 0, 0o444
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.type = tarfile.REGTYPE
        out.write(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict"))
        out.write(data)
        out.write(b"\0" * (-len(data) % BLOCK))
    out.write(b"\0" * (2 * BLOCK))  # end of archive
    return out.getvalue()


def _read_tar(data: bytes, key: str, fields: dict, n: int | dict[str, int], where: str) -> Chunk:
    """Columns `fields` of sample `key` (n rows each, or n[column]) from tar bytes; raises on anything odd."""
    found: dict[str, bytes] = {}
    end = 0
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for member in tar:
            end = member.offset_data + member.size + (-member.size % BLOCK)
            if member.isfile():
                found[member.name] = tar.extractfile(member).read()
                if len(found[member.name]) != member.size:
                    raise tarfile.ReadError(f"{where}: {member.name}: unexpected end of data (truncated)")
    if data[end : end + 2 * BLOCK] != bytes(2 * BLOCK):  # a tar ends with two zero blocks
        raise tarfile.ReadError(f"{where} has no end-of-archive marker after byte {end} (truncated)")
    cols = {}
    for col, (dtype, trail) in fields.items():
        name = f"{key}.{col}.npy"
        if name not in found:
            raise tarfile.ReadError(f"{where} has no member {name} (truncated)")
        a = np.load(io.BytesIO(found[name]), allow_pickle=False)
        rows = n[col] if isinstance(n, dict) else n
        if a.dtype != np.dtype(dtype) or a.shape != (rows, *trail):
            raise ValueError(f"{where} member {name} is {a.dtype}{list(a.shape)}, expected {dtype}{[rows, *trail]}")
        cols[col] = a
    return cols


class WdsStore(Store):
    """A store whose chunks are plain tars (one webdataset sample per chunk), see the module docstring."""

    backend = "wds"

    def _rel(self, name: str) -> str:
        return f"{DIR}/{name}.tar"

    def tar_path(self, epoch: int, chunk: int) -> str:
        """The filesystem path (no protocol) of a chunk's tar."""
        return self._path(self._rel(_key(epoch, chunk)))

    def _put_tar(self, name: str, data: bytes) -> None:
        final = self._path(self._rel(name))
        if not self._local():  # an object PUT is all or nothing already (a rename would be a copy and a delete)
            self.fs.pipe_file(final, data)
            return
        self.fs.makedirs(posixpath.dirname(final), exist_ok=True)
        tmp = f"{final}{TMP}{uuid.uuid4().hex[:8]}"
        try:
            with self.fs.open(tmp, "wb") as f:
                f.write(data)
            self.fs.mv(tmp, final)
        except BaseException:
            self._discard(tmp)  # a full disk must not leave a partial tar behind
            raise

    def prepare_epoch(self, epoch: int) -> None:
        if self._local():  # object stores have no directories
            self.fs.makedirs(self._path(DIR), exist_ok=True)

    def _write_arrays(self, epoch: int, chunk: int, cols: Chunk, ranges: dict[str, tuple[int, int]]) -> None:
        key = _key(epoch, chunk)
        self._put_tar(key, tar_bytes(key, cols))

    def _read_arrays(self, epoch: int, chunk: int, ranges: dict[str, tuple[int, int]]) -> Chunk:
        key = _key(epoch, chunk)
        path = self.tar_path(epoch, chunk)
        rows = {name: hi - lo for name, (lo, hi) in ranges.items()}
        return _read_tar(self.fs.cat_file(path), key, self.meta.columns, rows, path)

    def _write_named(self, name: str, cols: Chunk) -> None:
        self._put_tar(name, tar_bytes(name, cols))

    def _read_named(self, name: str, fields: dict, n: int) -> Chunk:
        path = self._path(self._rel(name))
        return _read_tar(self.fs.cat_file(path), name, fields, n, path)

    def _describe_file(self, epoch: int, chunk: int, column: str) -> str:
        key = _key(epoch, chunk)
        return f"{posixpath.join(self.url, DIR, key)}.tar member {key}.{column}.npy"

    @store_faults
    def bytes_on_disk(self) -> dict[str, int]:
        """Bytes per column over every epoch's tars (not test.tar); the sum is the tars' total size.

        A column gets its member's bytes in the tar: its 512-byte header, its `.npy` payload
        (numpy's ~128-byte header included) and the zero padding to a 512-byte block. The
        archive's 1 KiB end marker is shared among columns in proportion to their payload sizes.
        """
        out: dict[str, int] = {}
        d = self._path(DIR)
        if not self.fs.exists(d):
            return out
        for path, info in sorted(self.fs.find(d, detail=True).items()):
            name = posixpath.basename(path)
            if not (name.startswith("e") and name.endswith(".tar")):
                continue
            spans: dict[str, int] = {}
            sizes: dict[str, int] = {}
            with self.fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
                for m in tar:
                    col = m.name.split(".")[-2] if m.name.count(".") >= 2 else m.name
                    spans[col] = spans.get(col, 0) + (m.offset_data - m.offset) + m.size + (-m.size % BLOCK)
                    sizes[col] = sizes.get(col, 0) + m.size
            rest = int(info.get("size", 0)) - sum(spans.values())
            total = sum(sizes.values()) or 1
            shares = {c: rest * s // total for c, s in sizes.items()}
            if shares:
                shares[max(sizes, key=sizes.get)] += rest - sum(shares.values())
            for c in spans:
                out[c] = out.get(c, 0) + spans[c] + shares.get(c, 0)
        return out


def shard_urls(store: Store, epoch: int, partial: bool = False) -> list[str]:
    """The tar URLs of `epoch`, in training order, for `webdataset.WebDataset(urls)`.

    Only committed chunks are listed; unless `partial`, an epoch that is not complete is refused
    (a shard list with holes would silently train on part of an epoch).
    """
    if not isinstance(store, WdsStore):
        raise StoreError(
            f"store {store.url} is in {store.backend!r} format; shard_urls needs a 'wds' store "
            f"(precompute with --format wds)"
        )
    done = store.committed_chunks(epoch)
    if not partial and len(done) != store.meta.chunks_per_epoch:
        missing = sorted(set(range(store.meta.chunks_per_epoch)) - done)
        raise StoreError(
            f"store {store.url} epoch {epoch} is not complete: chunks {missing[:10]}"
            f"{'...' if len(missing) > 10 else ''} not committed; finish `kdlib precompute` first"
        )
    local = "file" in (store.fs.protocol if isinstance(store.fs.protocol, tuple) else (store.fs.protocol,))
    paths = [store.tar_path(epoch, c) for c in sorted(done)]
    return paths if local else [store.fs.unstrip_protocol(p) for p in paths]
