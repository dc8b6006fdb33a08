"""What every store backend shares: meta.json, commit records, checksums.

A chunk (a run of `chunk_views` consecutive views of one epoch) is the unit of writing,
checksumming and resuming. Writing a chunk is two steps: the backend writes its arrays,
then a commit record (`commits/eEEEEE/cCCCCCC.json`, with the crc32 of every column) is
put atomically (temp name, then rename). A chunk without a commit record does not exist,
whatever bytes a killed process left behind; a committed chunk whose bytes do not match
their crc32 is reported as corrupt, never returned.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import uuid
import zlib
from typing import Any

import fsspec
import numpy as np

from ..errors import CorruptStoreError, StoreError, StoreNotFoundError
from .format import StoreMeta

__all__ = ["Store", "Chunk", "ChunkCache", "decoded"]

Chunk = dict[str, np.ndarray]
META = "meta.json"


def crc32(a: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(a).tobytes())


class Store:
    """A store at `url` (a local path or an fsspec URL). Subclasses store the arrays."""

    backend = ""

    def __init__(self, url: str, meta: StoreMeta) -> None:
        self.url = url
        self.meta = meta
        self.fs, self.root = fsspec.core.url_to_fs(url)

    # -- meta and commit records (fsspec, atomic puts) ------------------------------------
    def _path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def _put_atomic(self, rel: str, data: bytes) -> None:
        final = self._path(rel)
        self.fs.makedirs(posixpath.dirname(final), exist_ok=True)
        tmp = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
        self.fs.pipe_file(tmp, data)
        self.fs.mv(tmp, final)

    @staticmethod
    def read_meta(url: str) -> StoreMeta:
        fs, root = fsspec.core.url_to_fs(url)
        path = posixpath.join(root, META)
        if not fs.exists(path):
            raise StoreNotFoundError(f"no store at {url}: {path} does not exist (run `kdlib precompute` first)")
        try:
            d = json.loads(fs.cat_file(path))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CorruptStoreError(f"{path} is corrupt (not JSON): {exc}") from exc
        return StoreMeta.from_dict(d, origin=path)

    def write_meta(self, meta: StoreMeta | None = None) -> None:
        if meta is not None:
            self.meta = meta
        self._put_atomic(META, json.dumps(self.meta.to_dict(), indent=1, sort_keys=True).encode())

    def _commit_rel(self, epoch: int, chunk: int) -> str:
        return f"commits/e{epoch:05d}/c{chunk:06d}.json"

    def committed_chunks(self, epoch: int) -> set[int]:
        """Chunks of `epoch` whose commit record exists."""
        d = self._path(f"commits/e{epoch:05d}")
        if not self.fs.exists(d):
            return set()
        names = [posixpath.basename(p) for p in self.fs.ls(d, detail=False)]
        return {int(n[1:7]) for n in names if n.startswith("c") and n.endswith(".json")}

    def epoch_complete(self, epoch: int) -> bool:
        return len(self.committed_chunks(epoch)) == self.meta.chunks_per_epoch

    # -- chunks ---------------------------------------------------------------------------
    def write_chunk(self, epoch: int, chunk: int, arrays: Chunk) -> None:
        """Write one chunk's columns, then commit it (the commit is what makes it exist)."""
        start, stop = self.meta.chunk_range(chunk)
        cols, ranges = {}, {}
        for name, (dtype, trail) in self.meta.columns.items():
            if name not in arrays:
                raise StoreError(f"write_chunk: column {name!r} missing for epoch {epoch} chunk {chunk}")
            a = np.ascontiguousarray(arrays[name], dtype=dtype)
            lo, hi = ranges[name] = self.meta.rows(name, chunk)
            if a.shape != (hi - lo, *trail):
                raise StoreError(f"write_chunk: column {name!r} has shape {a.shape}, expected {(hi - lo, *trail)}")
            cols[name] = a
        self._write_arrays(epoch, chunk, cols, ranges)
        record = {"epoch": epoch, "chunk": chunk, "views": [start, stop],
                  "crc32": {k: crc32(a) for k, a in cols.items()}}
        self._put_atomic(self._commit_rel(epoch, chunk), json.dumps(record).encode())

    def read_chunk(self, epoch: int, chunk: int) -> Chunk:
        """One committed chunk's columns, checked against their crc32."""
        rel = self._commit_rel(epoch, chunk)
        where = f"{self.url} epoch {epoch} chunk {chunk}"
        try:
            record = json.loads(self.fs.cat_file(self._path(rel)))
        except FileNotFoundError:
            raise StoreError(f"{where}: not committed (no {rel}); was precompute interrupted? rerun it to resume") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CorruptStoreError(f"{where}: commit record {rel} is corrupt: {exc}") from exc
        ranges = {name: self.meta.rows(name, chunk) for name in self.meta.columns}
        try:
            cols = self._read_arrays(epoch, chunk, ranges)
        except CorruptStoreError:
            raise
        except Exception as exc:  # a codec or a truncated file: name the place, never a bare traceback
            raise CorruptStoreError(f"{where}: data is corrupt or truncated ({type(exc).__name__}: {exc})") from exc
        for name, a in cols.items():
            if crc32(a) != record["crc32"].get(name):
                raise CorruptStoreError(f"{where}: checksum mismatch in column {name!r} "
                                        f"({self._describe_file(epoch, chunk, name)}); the store is corrupt")
        return cols

    def content_digest(self) -> str:
        """sha256 of every complete epoch's params and soft labels in a canonical order (epoch, chunk,
        column): the same content gives the same digest whichever backend or world size wrote it."""
        h = hashlib.sha256()
        for epoch in range(self.meta.epochs_done):
            for chunk in range(self.meta.chunks_per_epoch):
                self.digest_update(h, self.read_chunk(epoch, chunk))
        return h.hexdigest()

    def digest_update(self, h: Any, cols: Chunk) -> None:
        """Feed one chunk to `h` as `content_digest` does (for readers that also use the chunk)."""
        for name in self.meta.fields:
            h.update(name.encode())
            h.update(np.ascontiguousarray(cols[name]).tobytes())

    # -- teacher predictions on the test split --------------------------------------------
    def write_test(self, arrays: Chunk, source: dict[str, Any]) -> None:
        fields = self.meta.label_fields
        cols = {k: np.ascontiguousarray(arrays[k], dtype=dt) for k, (dt, _) in fields.items()}
        self._write_named("test", cols)
        record = {"crc32": {k: crc32(a) for k, a in cols.items()}, "views": len(cols["lse"])}
        self._put_atomic("commits/test.json", json.dumps(record).encode())
        self.write_meta(self.meta.replace(test={"source": source, "views": len(cols["lse"])}))

    def read_test(self) -> Chunk | None:
        if self.meta.test is None:
            return None
        record = json.loads(self.fs.cat_file(self._path("commits/test.json")))
        fields = self.meta.label_fields
        try:
            cols = self._read_named("test", fields, record["views"])
        except Exception as exc:
            raise CorruptStoreError(f"{self.url} test predictions are corrupt ({type(exc).__name__}: {exc})") from exc
        for name, a in cols.items():
            if crc32(a) != record["crc32"][name]:
                raise CorruptStoreError(f"{self.url} test predictions: checksum mismatch in column {name!r}")
        return cols

    # -- a sample of rendered views (verify measures pixel parity against it) ---------------
    def write_pixels(self, views: np.ndarray, epoch: int, start: int) -> None:
        """Keep rendered views [start, start + len(views)) of `epoch` as the renderer made them."""
        views = np.ascontiguousarray(views, dtype=np.uint8)
        self._write_named("pixels", {"views": views})
        self._put_atomic("commits/pixels.json", json.dumps({"crc32": crc32(views)}).encode())
        info = {"epoch": epoch, "start": start, "views": len(views), "shape": list(views.shape[1:])}
        self.write_meta(self.meta.replace(render={**self.meta.rendered, "pixels": info}))

    def read_pixels(self) -> tuple[dict[str, Any], np.ndarray] | None:
        """(where, uint8 views) of the stored pixel sample, or None (version-1 stores have none)."""
        info = (self.meta.render or {}).get("pixels")
        if not info:
            return None
        try:
            record = json.loads(self.fs.cat_file(self._path("commits/pixels.json")))
            views = self._read_named("pixels", {"views": ("uint8", tuple(info["shape"]))}, info["views"])["views"]
        except Exception as exc:
            raise CorruptStoreError(f"{self.url} pixel sample is corrupt ({type(exc).__name__}: {exc})") from exc
        if crc32(views) != record.get("crc32"):
            raise CorruptStoreError(f"{self.url} pixel sample: checksum mismatch")
        return info, views

    # -- what a backend implements --------------------------------------------------------
    def _write_arrays(self, epoch: int, chunk: int, cols: Chunk, ranges: dict[str, tuple[int, int]]) -> None:
        """Write each column's rows ranges[name] of the epoch (view columns: the chunk's views)."""
        raise NotImplementedError

    def _read_arrays(self, epoch: int, chunk: int, ranges: dict[str, tuple[int, int]]) -> Chunk:
        raise NotImplementedError

    def _write_named(self, name: str, cols: Chunk) -> None:
        raise NotImplementedError

    def _read_named(self, name: str, fields: dict, n: int) -> Chunk:
        raise NotImplementedError

    def _describe_file(self, epoch: int, chunk: int, column: str) -> str:
        return f"epoch {epoch} chunk {chunk} column {column}"

    def prepare_epoch(self, epoch: int) -> None:
        """Create whatever an epoch needs before ranks write chunks into it (rank 0 only)."""

    def bytes_on_disk(self) -> dict[str, int]:
        """Bytes per column over all epochs, as stored (compressed)."""
        raise NotImplementedError


def decoded(cols: Chunk, meta: StoreMeta) -> Chunk:
    """Columns in the plan's dtypes and `logits` as float top-k logits, whatever the store's codecs."""
    from ..plan import unpack_params
    from ..softlabel import decode_logits

    out = unpack_params(cols, meta.param_packing)
    if meta.logit_codec != "fp16":
        out = {k: v for k, v in out.items() if k != "top"}
        out["logits"] = decode_logits(cols, meta.logit_codec)
    if meta.heads or meta.attention:  # v2: DIH head labels and attention maps (kdlib.extras)
        from ..extras import decode_columns

        out = decode_columns(dict(out), meta)
    return out


class ChunkCache:
    """Reads views [start, stop) of an epoch through whole checked chunks, keeping the last few.

    Memory stays at a few chunks whatever the store size; a DataLoader worker holds its own.
    """

    def __init__(self, store: Store, keep: int = 2) -> None:
        self.store = store
        self.keep = keep
        self._cache: dict[tuple[int, int], Chunk] = {}

    def views(self, epoch: int, start: int, stop: int) -> Chunk:
        cv = self.store.meta.chunk_views
        parts = []
        for chunk in range(start // cv, (stop - 1) // cv + 1):
            cols = self._chunk(epoch, chunk)
            lo = max(start, chunk * cv) - chunk * cv
            hi = min(stop, (chunk + 1) * cv) - chunk * cv
            parts.append({k: a[lo:hi] for k, a in cols.items()})
        if len(parts) == 1:
            return parts[0]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _chunk(self, epoch: int, chunk: int) -> Chunk:
        key = (epoch, chunk)
        if key not in self._cache:
            if len(self._cache) >= self.keep:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = decoded(self.store.read_chunk(epoch, chunk), self.store.meta)
        return self._cache[key]
