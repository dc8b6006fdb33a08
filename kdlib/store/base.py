"""What every store backend shares: meta.json, commit records, checksums.

A chunk (a run of `chunk_views` consecutive views of one epoch) is the unit of writing,
checksumming and resuming. Writing a chunk is two steps: the backend writes its arrays,
then a commit record (`commits/eEEEEE/cCCCCCC.json`, with the crc32 of every column) is
put atomically (temp name, then rename). A chunk without a commit record does not exist,
whatever bytes a killed process left behind; a committed chunk whose bytes do not match
their crc32 is reported as corrupt, never returned.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import posixpath
import re
import socket
import threading
import time
import uuid
import weakref
import zlib
from typing import Any

import numpy as np

from ..errors import CorruptStoreError, StoreBusyError, StoreError, StoreMismatchError, StoreNotFoundError
from ..plan import pack_params
from .codecs import decode_chunk, item_columns, pixel_fields
from .format import StoreMeta
from .objectstore import FsHandle, Lease, fault, faults, print_note, store_faults

__all__ = ["Store", "Chunk", "ChunkCache", "FileLock"]

Chunk = dict[str, np.ndarray]
META = "meta.json"
LOCK = "precompute.lock"  # advisory: held (flock) by the one precompute writing the store; says who
LEASE = "precompute.lease"  # the same for an object store: a lease object (objectstore.Lease)
TMP = ".tmp-"  # a file being written: `<final name>.tmp-<8 hex>`, moved to its final name when whole
ZARR_TMP = re.compile(r".+\.[0-9a-f]{32}\.partial")  # zarr's LocalStore writes a shard so, then renames it


def _is_temp(name: str) -> bool:
    return TMP in name or ZARR_TMP.fullmatch(name) is not None


def _owner() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()}"


_HELD: weakref.WeakSet[FileLock] = weakref.WeakSet()  # the locks this process holds (see _forked)


def _forked() -> None:
    """In a forked child (a DataLoader worker): let go of the parent's locks. The child's copy of the
    descriptor would keep the flock after the parent is killed, until the child notices (seconds);
    closing it here leaves the parent's lock held, and the child can never release it by mistake."""
    for lock in list(_HELD):
        fd, lock.fd = lock.fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
    _HELD.clear()


os.register_at_fork(after_in_child=_forked)


class FileLock:
    """An advisory lock (flock) on a local file that names its holder ("pid N on HOST") inside it.

    The kernel drops the lock when the holding process ends, however it ends, so a killed process
    never leaves a stale lock; the file only says who held it last. The store's write lock and a
    run directory's train lock are both one of these."""

    TRIES = 5  # a `holder` probe holds a shared lock for microseconds: a taker retries across it
    RETRY_S = 0.05

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock (creating the file) and write this process's name into it; -> None when
        taken (or already held by this very process), else the name of the process holding it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        for attempt in range(self.TRIES):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt + 1 < self.TRIES:
                    time.sleep(self.RETRY_S)
        else:
            owner = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            return None if owner == _owner() else owner  # ours: an earlier holder not yet collected
        os.ftruncate(fd, 0)
        os.pwrite(fd, (_owner() + "\n").encode(), 0)
        self.fd = fd
        _HELD.add(self)
        return None

    def release(self) -> None:
        fd, self.fd = self.fd, None
        _HELD.discard(self)
        if fd is not None:
            os.close(fd)  # closing the descriptor drops the flock

    @staticmethod
    def holder(path: str) -> str | None:
        """The name of the live process holding the lock on `path`, or None (free, no file, or this
        process). Probes with a shared lock released at once; creates and writes nothing."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                return None if owner == _owner() else owner
            return None  # closing the descriptor below drops the shared lock
        finally:
            os.close(fd)


def crc32(a: np.ndarray) -> int:
    """crc32 of an array's bytes (C order): what a commit record checks a column by."""
    return zlib.crc32(np.ascontiguousarray(a).tobytes())


class Store:
    """A store at `url` (a local path or an fsspec URL; `storage_options` as in `objectstore`). Subclasses
    store the arrays."""

    backend = ""

    def __init__(self, url: str, meta: StoreMeta, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url
        self.meta = meta
        self.handle = FsHandle(url, storage_options)
        self.root = self.handle.root
        self._pid = os.getpid()

    @property
    def fs(self) -> Any:
        """The store's fsspec filesystem, made again in a forked DataLoader worker (s3fs is not fork-safe)."""
        self._check_fork()
        return self.handle.fs

    def _check_fork(self) -> None:
        if self._pid != os.getpid():  # a forked (or spawned) copy: nothing of the parent's connections is used
            self._pid = os.getpid()
            self._after_fork()

    @property
    def storage_options(self) -> dict[str, Any]:
        return self.handle.options

    def _after_fork(self) -> None:
        """Drop what holds the parent's connections (a backend's open arrays)."""

    def __getstate__(self) -> dict:  # a copy in a DataLoader worker is a reader: it holds no lock
        state = self.__dict__.copy()
        state.pop("_lock", None)
        state.pop("_lease", None)
        return state

    def lock_for_writing(self) -> None:
        """Take the store's write lock, or refuse naming the process that holds it.

        A local store takes an advisory flock: the kernel drops it when its process ends, however it
        ends, so a killed precompute never leaves a stale lock; the file only says who held it last.
        An object store takes a lease (`objectstore.Lease`): a stale one is taken over, with a note."""
        if not self._local():
            lease = Lease(self.handle, self._path(LEASE), self.url)
            with faults(self.url, self.storage_options):
                print_note(lease.acquire())
            self._lease = lease
            return
        path = self._path(LOCK)
        lock = FileLock(path)
        owner = lock.acquire()
        if owner is not None:
            raise StoreBusyError(
                f"store {self.url} is being written by {owner} ({path}); wait for it to finish, "
                f"or stop it: a rerun then resumes where it stopped"
            )
        self._lock = lock

    def writer(self) -> str | None:
        """Who holds the store's write lock now (a precompute still writing it), or None.

        Probed without holding anything: what a reader uses to say that epochs may still be coming."""
        if self._local():
            return FileLock.holder(self._path(LOCK))
        with faults(self.url, self.storage_options):
            return Lease.holder(self.handle, self._path(LEASE))

    def _local(self) -> bool:
        return self.handle.local

    def unlock(self) -> None:
        for name in ("_lock", "_lease"):
            held = self.__dict__.pop(name, None)
            if held is not None:
                held.release()

    def __del__(self) -> None:
        try:
            self.unlock()
        except Exception:
            pass

    # -- meta and commit records (fsspec, atomic puts) ------------------------------------
    def _path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def _put_atomic(self, rel: str, data: bytes) -> None:
        final = self._path(rel)
        if not self._local():  # an object PUT is all or nothing already (a rename would be a copy and a delete)
            self.fs.pipe_file(final, data)
            return
        self.fs.makedirs(posixpath.dirname(final), exist_ok=True)
        tmp = f"{final}{TMP}{uuid.uuid4().hex[:8]}"
        try:
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, final)
        except BaseException:
            self._discard(tmp)
            raise

    @staticmethod
    def log_rel(epoch: int, rank: int) -> str:
        """The log of the chunks `rank` computed of `epoch`: a log per epoch, so that on an object store
        (which puts a log back whole for each line) a line costs at most one epoch's lines, not the run's."""
        return f"logs/e{epoch:05d}/precompute-rank{rank}.jsonl"

    def log_chunk(self, epoch: int, chunk: int, rank: int, teacher_batches: int) -> None:
        """A line in `log_rel(epoch, rank)` for a chunk just committed: what ran, when (history: a chunk
        computed again after a kill has a second line)."""
        record = {"epoch": epoch, "chunk": chunk, "teacher_batches": teacher_batches, "time": time.time()}
        self.append_line(self.log_rel(epoch, rank), json.dumps(record))

    @store_faults
    def append_line(self, rel: str, line: str) -> None:
        """Add a line to a log beside the store (one writer per log). An object store cannot append: the log
        is read and put back whole (a log holds one epoch of one rank's chunks: small), all or nothing, and no
        file object is left to flush from a finalizer at exit (one that did hung the exit when the server had
        gone away)."""
        path = self._path(rel)
        if self._local():
            self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
            with self.fs.open(path, "a") as f:
                f.write(line + "\n")
            return
        try:
            old = self.fs.cat_file(path)
        except FileNotFoundError:
            old = b""
        self.fs.pipe_file(path, old + (line + "\n").encode())

    def _discard(self, path: str) -> None:
        """Remove a temp file after a failed write (a full disk must not keep the partial bytes)."""
        try:
            if self.fs.exists(path):
                self.fs.rm_file(path)
        except OSError:
            pass

    @store_faults
    def remove_temp_files(self) -> list[str]:
        """Delete the temp files a killed or failed writer left (rank 0, before anyone writes): ours
        (`*.tmp-*`) and zarr's local store's (`*.<32 hex>.partial`)."""
        found = (
            [p for p in self.fs.find(self.root) if _is_temp(posixpath.basename(p))] if self.fs.exists(self.root) else []
        )
        for p in found:
            self._discard(p)
        return found

    @staticmethod
    def read_meta(url: str, storage_options: dict[str, Any] | None = None) -> StoreMeta:
        handle = FsHandle(url, storage_options)
        path = posixpath.join(handle.root, META)
        with faults(url, handle.options):
            try:
                data = handle.fs.cat_file(path)
            except FileNotFoundError as exc:
                if fault(exc, url, handle.options):  # no bucket: say so
                    raise
                raise StoreNotFoundError(
                    f"no store at {url}: {path} does not exist (run `kdlib precompute` first)"
                ) from None
        try:
            d = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CorruptStoreError(f"{path} is corrupt (not JSON): {exc}") from exc
        return StoreMeta.from_dict(d, origin=path)

    @store_faults
    def write_meta(self, meta: StoreMeta | None = None) -> None:
        if meta is not None:
            self.meta = meta
        self._put_atomic(META, json.dumps(self.meta.to_dict(), indent=1, sort_keys=True).encode())

    def _commit_rel(self, epoch: int, chunk: int) -> str:
        return f"commits/e{epoch:05d}/c{chunk:06d}.json"

    @store_faults
    def committed_chunks(self, epoch: int) -> set[int]:
        """Chunks of `epoch` whose commit record exists."""
        d = self._path(f"commits/e{epoch:05d}")
        self.fs.invalidate_cache(d)  # other processes (ranks, a writer) commit too: never a cached listing
        if not self.fs.exists(d):
            return set()
        names = [posixpath.basename(p) for p in self.fs.ls(d, detail=False)]
        return {int(n[1:7]) for n in names if n.startswith("c") and n.endswith(".json")}

    def epoch_complete(self, epoch: int) -> bool:
        return len(self.committed_chunks(epoch)) == self.meta.chunks_per_epoch

    # -- chunks ---------------------------------------------------------------------------
    @store_faults
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
        record = {
            "epoch": epoch,
            "chunk": chunk,
            "views": [start, stop],
            "crc32": {k: crc32(a) for k, a in cols.items()},
        }
        lease = self.__dict__.get("_lease")
        if lease is not None:
            lease.check()  # another writer took the store over: commit nothing more
        self._put_atomic(self._commit_rel(epoch, chunk), json.dumps(record).encode())

    @store_faults
    def read_chunk(self, epoch: int, chunk: int) -> Chunk:
        """One committed chunk's columns, checked against their crc32."""
        rel = self._commit_rel(epoch, chunk)
        where = f"{self.url} epoch {epoch} chunk {chunk}"
        try:
            record = json.loads(self.fs.cat_file(self._path(rel)))
        except FileNotFoundError:
            raise StoreError(
                f"{where}: not committed (no {rel}); was precompute interrupted? rerun it to resume"
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CorruptStoreError(f"{where}: commit record {rel} is corrupt: {exc}") from exc
        self._check_record(
            record,
            rel,
            where,
            {"epoch": epoch, "chunk": chunk, "views": list(self.meta.chunk_range(chunk))},
            self.meta.columns,
        )
        ranges = {name: self.meta.rows(name, chunk) for name in self.meta.columns}
        try:
            cols = self._read_arrays(epoch, chunk, ranges)
        except CorruptStoreError:
            raise
        except Exception as exc:  # a codec or a truncated file: name the place, never a bare traceback
            if found := fault(exc, self.url, self.storage_options):  # the server, not the bytes
                raise found from exc
            raise CorruptStoreError(f"{where}: data is corrupt or truncated ({type(exc).__name__}: {exc})") from exc
        for name, a in cols.items():
            if crc32(a) != record["crc32"].get(name):
                raise CorruptStoreError(
                    f"{where}: checksum mismatch in column {name!r} "
                    f"({self._describe_file(epoch, chunk, name)}); the store is corrupt"
                )
        return cols

    def _check_record(self, record: Any, rel: str, where: str, expect: dict[str, Any], columns: dict) -> None:
        """A commit record must say what it commits: these keys, and a crc32 for every column."""
        problem = None
        if not isinstance(record, dict):
            problem = f"is a {type(record).__name__}, not a mapping"
        else:
            for key, want in expect.items():
                if record.get(key) != want:
                    problem = f"has {key}={record.get(key)!r}, expected {want!r}"
                    break
            else:
                crcs = record.get("crc32")
                if not isinstance(crcs, dict):
                    problem = "has no crc32 table"
                else:
                    lacking = sorted(c for c in columns if not isinstance(crcs.get(c), int))
                    if lacking:
                        problem = f"has no crc32 for column(s) {lacking}"
        if problem:
            raise CorruptStoreError(
                f"{where}: commit record {self._path(rel)} {problem}; the store is corrupt "
                f"(rerun `kdlib precompute` into a new --out)"
            )

    @store_faults
    def check_consistent(self) -> None:
        """meta.json against the commit records: every epoch it calls done has exactly its chunks committed,
        and the records' view ranges match `views_per_epoch` and `chunk_views` (an edited meta is caught)."""
        m = self.meta
        for epoch in range(m.epochs_done):
            done = self.committed_chunks(epoch)
            want = set(range(m.chunks_per_epoch))
            if done != want:
                extra, missing = sorted(done - want), sorted(want - done)
                what = (
                    (
                        f"epoch {epoch} chunk {missing[0]} is not committed"
                        + (f" (nor {len(missing) - 1} more)" if len(missing) > 1 else "")
                    )
                    if missing
                    else (f"epoch {epoch} has commit records past its end (chunks {extra[:5]})")
                )
                raise CorruptStoreError(
                    f"{self.url}/{META} counts epoch {epoch} as done ({m.views_per_epoch} views per epoch, chunks of "
                    f"{m.chunk_views}) but {what}: meta.json and the commit records disagree; the store is corrupt "
                    f"(rerun `kdlib precompute` into a new --out)"
                )
            last = m.chunks_per_epoch - 1
            rel = self._commit_rel(epoch, last)
            try:
                record = json.loads(self.fs.cat_file(self._path(rel)))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise CorruptStoreError(f"{self.url}: commit record {rel} is corrupt: {exc}") from exc
            views = record.get("views") if isinstance(record, dict) else None
            if views != list(m.chunk_range(last)):
                raise CorruptStoreError(
                    f"{self.url}/{META} is inconsistent with its commit records: epoch {epoch} chunk {last} should "
                    f"hold views {list(m.chunk_range(last))} ({m.views_per_epoch} views per epoch) but {rel} says "
                    f"{views!r}; the store is corrupt"
                )

    def check_plan(self, epoch: int, params: dict[str, np.ndarray], committed: set[int]) -> None:
        """Refuse to finish a half-written epoch with a plan other than the one its committed chunks hold.

        The plan of an epoch is redrawn when precompute resumes; if the random stream changed since
        (another numpy, another kdlib), the epoch would mix two plans. The first committed chunk's
        stored params must equal the new plan's, byte for byte (DESIGN invariant 1)."""
        if not committed:
            return
        chunk = min(committed)
        a, b = self.meta.chunk_range(chunk)
        want = pack_params({k: v[a:b] for k, v in params.items()}, self.meta.param_packing)
        stored = self.read_chunk(epoch, chunk)
        for name in sorted(want):
            if name in stored and np.ascontiguousarray(want[name]).tobytes() != stored[name].tobytes():
                raise StoreMismatchError(
                    f"{self.url} epoch {epoch}: the plan drawn now differs from the views stored in its committed "
                    f"chunk {chunk} (column {name!r}): the random stream changed since the epoch was started "
                    f"(meta.json: kdlib {self.meta.kdlib_version or '?'}; now numpy {np.__version__}); finish the "
                    f"store with the kdlib and numpy that began it, or precompute into a new --out"
                )

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
    @store_faults
    def write_test(self, arrays: Chunk, source: dict[str, Any]) -> None:
        fields = self.meta.label_fields
        cols = {k: np.ascontiguousarray(arrays[k], dtype=dt) for k, (dt, _) in fields.items()}
        self._write_set("test", cols)
        self.write_meta(self.meta.replace(test={"source": source, "views": len(cols["lse"])}))

    @store_faults
    def read_test(self) -> Chunk | None:
        if self.meta.test is None:
            return None
        return self._read_set("test", self.meta.label_fields, self.meta.test.get("views"), "test predictions")

    # -- a sample of rendered views (verify measures pixel parity against it) ---------------
    @store_faults
    def write_pixels(self, views: np.ndarray, epoch: int, start: int) -> None:
        """Keep rendered views [start, start + len(views)) of `epoch` as the renderer made them."""
        views = np.ascontiguousarray(views, dtype=np.uint8)
        self._write_set("pixels", {"views": views})
        info = {"epoch": epoch, "start": start, "views": len(views), "shape": list(views.shape[1:])}
        self.write_meta(self.meta.replace(render={**self.meta.rendered, "pixels": info}))

    @store_faults
    def read_pixels(self) -> tuple[dict[str, Any], np.ndarray] | None:
        """(where, uint8 views) of the stored pixel sample, or None (version-1 stores have none)."""
        info = (self.meta.render or {}).get("pixels")
        if not info:
            return None
        fields = pixel_fields(tuple(info["shape"]))
        return info, self._read_set("pixels", fields, info["views"], "pixel sample")["views"]

    # -- named sets (test predictions, pixel sample): arrays outside the epochs, with a commit record --
    def _write_set(self, name: str, cols: Chunk) -> None:
        self._write_named(name, cols)
        record = {"crc32": {k: crc32(a) for k, a in cols.items()}, "views": len(next(iter(cols.values())))}
        self._put_atomic(f"commits/{name}.json", json.dumps(record).encode())

    def _read_set(self, name: str, fields: dict, views: Any, what: str) -> Chunk:
        """The set's columns, checked against its commit record (which meta.json says exists)."""
        rel, where = f"commits/{name}.json", f"{self.url} {what}"
        try:
            record = json.loads(self.fs.cat_file(self._path(rel)))
        except FileNotFoundError:
            raise CorruptStoreError(f"{self.url}: meta.json lists the {what} but {rel} is missing") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CorruptStoreError(f"{self.url}: commit record {rel} is corrupt: {exc}") from exc
        self._check_record(record, rel, where, {"views": views}, fields)
        try:
            cols = self._read_named(name, fields, record["views"])
        except Exception as exc:
            if found := fault(exc, self.url, self.storage_options):
                raise found from exc
            raise CorruptStoreError(f"{where} are corrupt ({type(exc).__name__}: {exc})") from exc
        for col, a in cols.items():
            if crc32(a) != record["crc32"][col]:
                raise CorruptStoreError(f"{where}: checksum mismatch in column {col!r}")
        return cols

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


class ChunkCache:
    """Reads views [start, stop) of an epoch through whole checked chunks, keeping the last few.

    Memory stays at a few chunks whatever the store size. Told the batches it will serve (`expect`),
    it reads the next chunk they need in a thread while the current one is served, so a reader that
    walks an epoch in order waits on the store only for the first chunk. One reader per process: the
    feed reads params and soft labels in the main process (`kdlib.views.ViewBatches.key`), so each
    chunk is read once per epoch whatever the number of DataLoader workers.
    """

    def __init__(self, store: Store, keep: int = 2) -> None:
        self.store = store
        self.keep = keep
        self._cache: dict[tuple[int, int], Chunk] = {}
        self._next: dict[tuple[int, int], tuple[int, int]] = {}  # chunk -> the one the batches need after it
        self._ahead: dict[tuple[int, int], _ReadAhead] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict:  # a copy in another process reads for itself: no reads in flight
        return {**self.__dict__, "_cache": {}, "_ahead": {}}

    def expect(self, batches: Any) -> None:
        """The (epoch, start, stop) ranges about to be read, in order: what the read-ahead follows."""
        cv = self.store.meta.chunk_views
        order: list[tuple[int, int]] = []
        for epoch, start, stop in batches:
            for chunk in range(start // cv, (stop - 1) // cv + 1):
                if not order or order[-1] != (epoch, chunk):
                    order.append((epoch, chunk))
        self._next = dict(zip(order, order[1:]))

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

    def item_columns(self, cols: Chunk) -> dict:
        """What a replay item carries from these views' stored columns (soft labels, heads, maps, ...)."""
        return item_columns(cols, self.store.meta)

    def _read(self, key: tuple[int, int]) -> Chunk:
        epoch, chunk = key
        try:
            return decode_chunk(self.store.read_chunk(epoch, chunk), self.store.meta)
        except CorruptStoreError as exc:  # a codec's check (e.g. sampled counts) knows the values, not where
            raise CorruptStoreError(f"store {self.store.url} epoch {epoch} chunk {chunk}: {exc}") from None

    def _chunk(self, epoch: int, chunk: int) -> Chunk:
        if self._pid != os.getpid():  # a forked copy: the parent's reads in flight are not running here
            self._pid, self._ahead = os.getpid(), {}
        key = (epoch, chunk)
        if key not in self._cache:
            pending = self._ahead.pop(key, None)
            cols = pending.result() if pending is not None else None
            if cols is None:  # not read ahead, or that read failed: read here (a real fault is raised here)
                cols = self._read(key)
            while len(self._cache) >= self.keep:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = cols
            after = self._next.get(key)
            if after is not None and after not in self._cache and after not in self._ahead:
                self._ahead[after] = _ReadAhead(self._read, after)
        return self._cache[key]


class _ReadAhead:
    """One chunk read in a daemon thread (an exit never waits on a read in flight); `result()` is the
    chunk, or None when the read failed (the reader reads again and meets the fault itself)."""

    def __init__(self, read: Any, key: tuple[int, int]) -> None:
        self._read, self._key, self._cols = read, key, None
        self._thread = threading.Thread(target=self._run, name="kdlib-read-ahead", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._cols = self._read(self._key)
        except Exception:  # noqa: BLE001  read again where it is needed: the error is raised there
            self._cols = None

    def result(self) -> Chunk | None:
        self._thread.join()
        return self._cols
