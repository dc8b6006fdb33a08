"""The store: per-epoch view params and soft labels, with meta.json, in zarr or webdataset.

`open_store(url)` reads an existing store; `create_store(url, meta)` makes one, or reopens
one written for the same source, teacher, recipe and k (to resume or extend it) and refuses
anything else with a `StoreMismatchError`.
"""

from __future__ import annotations

from ..errors import ConfigError, StoreNotFoundError
from .base import Chunk, ChunkCache, Store, decoded
from .format import BACKENDS, FORMAT_VERSION, StoreMeta, check_compatible
from .zarr_backend import ZarrStore

__all__ = ["Store", "StoreMeta", "Chunk", "ChunkCache", "decoded", "FORMAT_VERSION", "open_store", "create_store",
           "open_store_source"]


def _backend(name: str) -> type[Store]:
    if name == "zarr":
        return ZarrStore
    if name == "wds":
        from .wds_backend import WdsStore

        return WdsStore
    raise ConfigError(f"store format {name!r} is not available; choose one of {BACKENDS}")


def open_store(url: str) -> Store:
    """An existing store (raises StoreNotFoundError / StoreVersionError with the path)."""
    meta = Store.read_meta(str(url))
    return _backend(meta.backend)(str(url), meta)


def create_store(url: str, meta: StoreMeta) -> Store:
    """A new store with `meta`, or the existing one at `url` if it was written for the same thing."""
    url = str(url)
    try:
        found = Store.read_meta(url)
    except StoreNotFoundError:
        store = _backend(meta.backend)(url, meta)
        store.write_meta()
        return store
    check_compatible(found, meta, url)
    return _backend(found.backend)(url, found)


def open_store_source(store: Store, data: str | None = None, limit: int | None = None):
    """The train source a store was written for, refusing one whose fingerprint differs."""
    from ..errors import StoreMismatchError
    from ..source import open_source

    meta = store.meta
    data = data or meta.source.get("data")
    limit = limit if limit is not None else meta.source.get("limit")
    source = open_source(data, "train", limit, index_dirs=(f"{store.root}/index",))  # sizes kept by precompute
    if source.fingerprint() != meta.source["fingerprint"]:
        raise StoreMismatchError(
            f"store {store.url} was written for source {meta.source.get('data')!r} (limit {meta.source.get('limit')}, "
            f"fingerprint {meta.source['fingerprint'][:12]}); this command has {data!r} (limit {limit}, "
            f"fingerprint {source.fingerprint()[:12]})")
    return source
