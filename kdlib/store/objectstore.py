"""Object storage under the store: fsspec options, filesystems that survive a fork, faults in one line,
and the write lease that keeps a second writer out of an `s3://...` store.

Options: the `storage_options=` a caller gives, else the JSON object in `KDLIB_STORAGE_OPTIONS`
(what `--storage-options` sets, so that DataLoader workers and accelerate ranks inherit it), else
none; s3fs and botocore read the standard variables themselves (`AWS_ENDPOINT_URL`,
`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`, ...). Local paths take none.

Forks: fsspec's async filesystems (s3fs) refuse to run in a process forked from the one that made
them ("This class is not fork-safe"). fsspec resets its event loop and its instance cache in a
forked child, so a child that asks fsspec for the filesystem again gets a fresh one: `FsHandle`
does that whenever the pid changes (and after unpickling, for spawned workers).

The lease: a local store keeps its `flock` (base.FileLock); an object store has none, so the
writer holds `precompute.lease`, an object created only if absent (S3 `If-None-Match: *`)
that names its owner, host and expiry, renewed by a thread every `TTL_S / 4`. A second writer
finds it and is refused; a lease past its expiry, or one whose process is gone from this very
host, is taken over with a conditional replace (S3 `If-Match: <etag>`), and the taker says so.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from typing import Any, TypeVar

import fsspec

from ..errors import BucketNotFoundError, ObjectStoreError, StoreBusyError
from ..source_base import storage_options as env_storage_options

__all__ = ["ENV", "storage_options", "is_local_url", "FsHandle", "fault", "faults", "Lease"]

ENV = "KDLIB_STORAGE_OPTIONS"
LOCAL = ("file", "local")
_CLIENTS = ("botocore", "aiobotocore", "aiohttp")  # the modules whose errors are the object store's


def storage_options(given: dict[str, Any] | None = None) -> dict[str, Any]:
    """The fsspec options for object storage: `given`, else `$KDLIB_STORAGE_OPTIONS` (read where the
    sources read it), else none."""
    return dict(given) if given is not None else env_storage_options()


def is_local_url(url: str) -> bool:
    return fsspec.utils.get_protocol(str(url)) in LOCAL


class FsHandle:
    """The fsspec filesystem of `url`, made again in a process other than the one that made it."""

    def __init__(self, url: str, options: dict[str, Any] | None = None) -> None:
        self.url = str(url)
        self.local = is_local_url(self.url)
        self.options = {} if self.local else storage_options(options)
        self._fs: fsspec.AbstractFileSystem | None = None
        self._pid = -1
        self.root = self.get_root()

    def get_root(self) -> str:
        return fsspec.core.url_to_fs(self.url, **self.options)[1]

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        if self._fs is None or self._pid != os.getpid():
            self._fs = fsspec.core.url_to_fs(self.url, **self.options)[0]  # fsspec's cache is per process
            self._pid = os.getpid()
        return self._fs

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fs": None, "_pid": -1}


# -- faults: the object store unreachable, refusing the credentials, without the bucket ----------
def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _endpoint(options: dict[str, Any]) -> str:
    return (
        options.get("endpoint_url")
        or (options.get("client_kwargs") or {}).get("endpoint_url")
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
        or "the default endpoint"
    )


def _orphan(record: logging.LogRecord) -> bool:
    """False for asyncio's "Task exception was never retrieved" about a client's own connection error."""
    exc = record.exc_info[1] if record.exc_info else None
    return exc is None or not type(exc).__module__.startswith(_CLIENTS)


def _quiet_orphans() -> None:
    """After a connection fault, requests that were in flight beside the one that failed (a chunk's columns
    go at once) end in aiohttp tasks nobody awaits; asyncio would print each one's traceback, burying the
    one `error:` line. Only those records are dropped."""
    log = logging.getLogger("asyncio")
    if _orphan not in log.filters:
        log.addFilter(_orphan)


def fault(exc: BaseException, url: str | None, options: dict[str, Any] | None = None) -> Exception | None:
    """The one-line kdlib error for an object-storage fault behind `exc` (None: not one), naming `url`.

    Without a `url` (a fault met outside the store's own calls) only botocore's and aiohttp's own
    errors are taken for object-storage faults: they name the endpoint URL they failed on."""
    if url is None:
        if not any(type(e).__module__.startswith(_CLIENTS) for e in _chain(exc)):
            return None
    elif is_local_url(url):
        return None
    where = f"{url or 'object storage'} (endpoint {_endpoint(options or {})})"
    todo = "check AWS_ENDPOINT_URL or --storage-options, and that the server is up; a rerun resumes where this stopped"
    for e in _chain(exc):
        kind, module = type(e).__name__, type(e).__module__ or ""
        text = str(e).splitlines()[0] if str(e) else kind
        if module.startswith(_CLIENTS) or isinstance(e, (ConnectionError, TimeoutError)):
            if "Credential" in kind:
                return ObjectStoreError(
                    f"{where}: no credentials ({text}); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                    f'or give --storage-options \'{{"key": ..., "secret": ...}}\''
                )
            _quiet_orphans()
            return ObjectStoreError(f"{where}: the object store cannot be reached ({kind}: {text}); {todo}")
        if isinstance(e, PermissionError):
            return ObjectStoreError(
                f"{where}: access refused ({text}); check the credentials (AWS_ACCESS_KEY_ID, "
                f"AWS_SECRET_ACCESS_KEY, or --storage-options) and their rights on the bucket"
            )
        if isinstance(e, FileNotFoundError) and "bucket" in text.lower() and url:
            bucket = fsspec.core.url_to_fs(url, **(options or {}))[1].split("/", 1)[0]
            return BucketNotFoundError(
                f"{where}: bucket {bucket!r} does not exist ({text}); create it (e.g. `aws s3 mb s3://{bucket}`) "
                f"or fix the URL"
            )
    return None


@contextmanager
def faults(url: str, options: dict[str, Any] | None = None) -> Iterator[None]:
    """Re-raise an object-storage fault inside the block as one kdlib error naming `url`."""
    try:
        yield
    except Exception as exc:
        found = (
            None
            if isinstance(exc, (ObjectStoreError, StoreBusyError, BucketNotFoundError))
            else fault(exc, url, options)
        )
        if found is None:
            raise
        raise found from exc


F = TypeVar("F", bound=Callable[..., Any])


def store_faults(method: F) -> F:
    """A Store method whose object-storage faults come out as one kdlib error naming the store."""

    @wraps(method)
    def wrapper(self, *args, **kwargs):
        if self.handle.local:
            return method(self, *args, **kwargs)
        with faults(self.url, self.handle.options):
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


# -- the write lease ------------------------------------------------------------------------------
def _pidns() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


class Lease:
    """A write lease on an object store (see the module docstring): `acquire`, renewed by a thread, `release`."""

    TTL_S = 120.0  # a writer that stops renewing (killed, cut off) is taken over this long after its last renewal

    def __init__(self, handle: FsHandle, path: str, url: str) -> None:
        self.handle, self.path, self.url = handle, path, url
        self.token = uuid.uuid4().hex
        self.etag: str | None = None
        self.lost: str | None = None  # who took the lease from us, if anyone did
        self._pid = os.getpid()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> bytes:
        host = socket.gethostname()
        return json.dumps(
            {
                "owner": f"pid {os.getpid()} on {host}",
                "pid": os.getpid(),
                "host": host,
                "pidns": _pidns(),
                "token": self.token,
                "expires": time.time() + self.TTL_S,
                "ttl_s": self.TTL_S,
            }
        ).encode()

    def _put(self, **condition: Any) -> None:
        out = self.handle.fs.pipe_file(self.path, self._record(), **condition)
        self.etag = (out or {}).get("ETag") if isinstance(out, dict) else None

    def read(self) -> tuple[dict[str, Any] | None, str | None]:
        """(the lease record, its etag), or (None, None) when there is no lease; an unreadable record is {}."""
        fs = self.handle.fs
        fs.invalidate_cache(self.path)  # another writer may have renewed it since this process listed the store
        try:
            with fs.open(self.path, "rb", cache_type="none") as f:  # etag and bytes of one version (s3fs)
                etag, data = (getattr(f, "details", None) or {}).get("ETag"), f.read()
        except FileNotFoundError:
            return None, None
        try:
            record = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError):
            record = {}
        return (record if isinstance(record, dict) else {}), etag

    @staticmethod
    def stale(record: dict[str, Any]) -> str | None:
        """Why the lease in `record` may be taken over (expired, or its process gone from this host), or None."""
        expires = record.get("expires")
        if not isinstance(expires, (int, float)):
            return "its record is unreadable"
        if expires < time.time():
            return f"it expired at {_utc(expires)}"
        if record.get("host") == socket.gethostname() and record.get("pidns") == _pidns():
            pid = record.get("pid")
            if isinstance(pid, int) and pid != os.getpid() and not _alive(pid):
                return f"process {pid} is gone from this host"
        return None

    def acquire(self) -> str | None:
        """Take the lease; -> None, or a note saying whose stale lease was taken over. Raises StoreBusyError."""
        note = None
        try:
            self._put(mode="create")
        except FileExistsError:
            record, etag = self.read()
            if record is None:  # released between our put and our read: try once more
                return self.acquire()
            why = self.stale(record)
            owner = record.get("owner", "another process")
            ours = record.get("pid") == os.getpid() and record.get("host") == socket.gethostname()
            if why is None and not ours:  # (ours: an earlier store of this process, not yet collected)
                raise StoreBusyError(
                    f"store {self.url} is being written by {owner} (its lease {self.path} runs until "
                    f"{_utc(record['expires'])}, renewed while it writes); wait for it to finish, or stop it: "
                    f"a rerun then resumes where it stopped"
                ) from None
            try:  # only if nobody renewed or took it since we read it (a filesystem without etags: best effort)
                self._put(**({"IfMatch": etag} if etag else {}))
            except OSError:
                taker, _ = self.read()
                raise StoreBusyError(
                    f"store {self.url}: another writer ({(taker or {}).get('owner', '?')}) took over the stale lease "
                    f"of {owner} first; wait for it to finish"
                ) from None
            note = None if ours else f"note: took over the write lease of {owner} on {self.url}: {why}"
        mine, _ = self.read()  # a server that ignores conditional puts would let two writers "succeed"
        if not mine or mine.get("token") != self.token:
            raise StoreBusyError(
                f"store {self.url}: another writer ({(mine or {}).get('owner', '?')}) holds the lease {self.path}"
            )
        self._thread = threading.Thread(target=self._renew, name="kdlib-lease", daemon=True)
        self._thread.start()
        atexit.register(self.release)
        return note

    def _renew(self) -> None:
        while not self._stop.wait(self.TTL_S / 4):
            try:
                self._put(IfMatch=self.etag) if self.etag else self._put()
            except Exception:  # refused (another writer's etag?) or the server away for a moment (s3fs: OSError)
                try:
                    record, etag = self.read()
                except Exception:  # still away: the next renewal tries again (this thread must not end)
                    continue
                if record is not None and record.get("token") != self.token:
                    self.lost = record.get("owner", "another process")
                    return
                if record is not None:  # still ours: a renewal whose answer was lost changed the etag
                    self.etag = etag

    def check(self) -> None:
        """Refuse to go on writing once another writer has taken the lease over."""
        if self.lost:
            raise StoreBusyError(
                f"store {self.url}: this writer's lease was taken over by {self.lost} (it was not renewed for "
                f"{self.TTL_S:.0f} s); stopped so that two writers never mix; rerun once the other one is done"
            )

    def release(self) -> None:
        """Stop renewing and delete the lease, if it is still ours (only in the process that took it)."""
        if os.getpid() != self._pid or self._stop.is_set():
            return
        self._stop.set()
        atexit.unregister(self.release)
        try:
            record, _ = self.read()
            if record is not None and record.get("token") == self.token:
                self.handle.fs.rm_file(self.path)
        except Exception:  # unreachable now: the lease expires by itself, or a rerun here sees its process gone
            pass

    @classmethod
    def holder(cls, handle: FsHandle, path: str) -> str | None:
        """The owner of a live lease on the store (not this process), or None."""
        try:
            handle.fs.invalidate_cache(path)
            with handle.fs.open(path, "rb", cache_type="none") as f:
                record = json.loads(f.read())
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return None
        ours = record.get("pid") == os.getpid() and record.get("host") == socket.gethostname()
        if not isinstance(record, dict) or cls.stale(record) or ours:
            return None
        return record.get("owner", "another process")


def print_note(note: str | None) -> None:
    if note:
        print(note, file=sys.stderr, flush=True)
