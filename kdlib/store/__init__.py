"""The store: per-epoch view params and soft labels, with meta.json, in zarr or webdataset.

`open_store(url)` reads an existing store; `create_store(url, meta)` makes one, or reopens
one written for the same source, teacher, recipe and k (to resume or extend it) and refuses
anything else with a `StoreMismatchError`. A URL may name object storage (`s3://bucket/run`):
both take fsspec's `storage_options` (default: `$KDLIB_STORAGE_OPTIONS`, set by `--storage-options`,
and the standard `AWS_*` variables), see `kdlib.store.objectstore`.
"""

from __future__ import annotations

from typing import Any

from ..errors import BucketNotFoundError, ConfigError, KdlibError, StoreMismatchError, StoreNotFoundError
from ..source import Source, open_source
from .base import Chunk, ChunkCache, Store
from .codecs import Codec, TeacherOutput, decode_chunk, register_codec, view_fields
from .format import BACKENDS, FORMAT_VERSION, StoreMeta, check_compatible
from .wds_backend import WdsStore
from .zarr_backend import ZarrStore

__all__ = [
    "Store",
    "StoreMeta",
    "Chunk",
    "ChunkCache",
    "Codec",
    "TeacherOutput",
    "register_codec",
    "decode_chunk",
    "FORMAT_VERSION",
    "open_store",
    "create_store",
    "open_store_source",
]


def _backend(name: str) -> type[Store]:
    if name == "zarr":
        return ZarrStore
    if name == "wds":
        return WdsStore
    raise ConfigError(f"store format {name!r} is not available; choose one of {BACKENDS}")


def open_store(url: str, storage_options: dict[str, Any] | None = None) -> Store:
    """An existing store (raises StoreNotFoundError / StoreVersionError with the path, CorruptStoreError when
    meta.json disagrees with the commit records)."""
    meta = Store.read_meta(str(url), storage_options)
    view_fields(meta)  # every column kind it holds has a codec here (an unknown extra kind is refused now)
    store = _backend(meta.backend)(str(url), meta, storage_options)
    store.check_consistent()
    return store


def create_store(url: str, meta: StoreMeta, storage_options: dict[str, Any] | None = None) -> Store:
    """A new store with `meta`, or the existing one at `url` if it was written for the same thing.

    The store comes back holding its write lock (a flock, or a lease on object storage: a second
    precompute into it is refused); temp files a killed or failed writer left are removed before
    anything is written. An object store's bucket must exist (it is never created here)."""
    url = str(url)
    try:
        found = Store.read_meta(url, storage_options)
    except BucketNotFoundError:
        raise
    except StoreNotFoundError:
        store = _backend(meta.backend)(url, meta, storage_options)
        if store._local():
            store.fs.makedirs(store.root, exist_ok=True)
        store.lock_for_writing()
        store.write_meta()
        return store
    check_compatible(found, meta, url)
    store = _backend(found.backend)(url, found, storage_options)
    store.lock_for_writing()
    store.meta = Store.read_meta(url, storage_options)  # as the lock holder saw it last
    store.check_consistent()
    store.remove_temp_files()
    return store


def open_store_source(store: Store, data: str | None = None, limit: int | None = None) -> Source:
    """The train source a store was written for, refusing one whose fingerprint differs."""
    meta = store.meta
    from_meta = not data  # then the path is the one the store's meta.json names, not the user's
    whose = f" (the path named in {store.url}/meta.json: give --data to name the source)" if from_meta else ""
    data = data or meta.source.get("data")
    limit = limit if limit is not None else meta.source.get("limit")
    try:
        source = open_source(
            data, "train", limit, index_dirs=(f"{store.url.rstrip('/')}/index",)
        )  # sizes kept by precompute
    except (KdlibError, FileNotFoundError) as exc:
        if not from_meta:
            raise
        raise type(exc)(f"{exc}{whose}") from exc
    if source.fingerprint() != meta.source["fingerprint"]:
        raise StoreMismatchError(
            f"store {store.url} was written for source {meta.source.get('data')!r} (limit {meta.source.get('limit')}, "
            f"fingerprint {meta.source['fingerprint'][:12]}); this command has {data!r}{whose} (limit {limit}, "
            f"fingerprint {source.fingerprint()[:12]})"
        )
    return source
