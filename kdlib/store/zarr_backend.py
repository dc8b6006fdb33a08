"""zarr v3 backend: one group per epoch, one sharded, zstd-compressed array per column.

A shard holds exactly one chunk of views (the write unit), so a rank writing its chunks
touches only its own files, and a chunk is one file per column. Inside a shard, inner
chunks of at most 1024 views keep reads of a few views cheap (random access).
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import zarr
from zarr.codecs import ZstdCodec

from .base import Chunk, Store
from .format import StoreMeta
from .objectstore import store_faults

__all__ = ["ZarrStore"]

OBJECT_STORE_THREADS = 8  # a chunk's columns read or written at once on object storage
INNER_VIEWS = 1024


class ZarrStore(Store):
    """A store whose columns are sharded zarr v3 arrays, one group per epoch, see the module docstring."""

    backend = "zarr"

    def __init__(self, url: str, meta: StoreMeta, storage_options: dict[str, Any] | None = None) -> None:
        super().__init__(url, meta, storage_options)
        self._arrays: dict[tuple[str, str], zarr.Array] = {}
        self._prepared: set[int] = set()  # epochs seen to have every column array (one probe per epoch, not per chunk)
        # zarr opens file:// URLs through fsspec without auto_mkdir; a plain path uses its LocalStore.
        local = self._local()
        self._zarr_url = self.root if local else url
        self._zarr_options = None if local else self.storage_options

    def __getstate__(self) -> dict:  # DataLoader workers reopen arrays lazily
        state = super().__getstate__()
        state["_arrays"] = {}
        return state

    def _after_fork(self) -> None:  # the arrays hold the parent's (async, not fork-safe) filesystem
        self._arrays = {}

    def _group_path(self, epoch: int) -> str:
        return f"e{epoch:05d}"

    def _root_group(self) -> zarr.Group:
        return zarr.open_group(store=self._zarr_url, mode="a", zarr_format=3, storage_options=self._zarr_options)

    def _create(self, group: str, name: str, dtype: str, trail: tuple[int, ...], n: int, shard: int) -> zarr.Array:
        inner = min(shard, INNER_VIEWS)
        while shard % inner:  # inner chunks must tile the shard
            inner -= 1
        return zarr.create_array(
            store=self._zarr_url,
            storage_options=self._zarr_options,
            name=f"{group}/{name}",
            shape=(n, *trail),
            dtype=dtype,
            chunks=(inner, *trail),
            shards=(shard, *trail),
            compressors=ZstdCodec(level=3),
            fill_value=0,
            overwrite=False,
        )

    @store_faults
    def prepare_epoch(self, epoch: int) -> None:
        """Create the epoch's group and every column array that is missing (a kill may have left some)."""
        group = self._group_path(epoch)
        self._root_group().require_group(group)
        for name, (dtype, trail) in self.meta.columns.items():
            if not self.fs.exists(self._path(group, name, "zarr.json")):
                self._create(group, name, dtype, trail, *self.meta.epoch_rows(name))

    def _array(self, group: str, name: str) -> zarr.Array:
        key = (group, name)
        self._check_fork()
        if key not in self._arrays:
            self._arrays[key] = zarr.open_array(
                store=self._zarr_url,
                path=f"{group}/{name}",
                mode="r+",
                zarr_format=3,  # no probing for version-2 metadata: a request less per array on object storage
                storage_options=self._zarr_options,
            )
        return self._arrays[key]

    def _write_arrays(self, epoch: int, chunk: int, cols: Chunk, ranges: dict[str, tuple[int, int]]) -> None:
        group = self._group_path(epoch)
        if epoch not in self._prepared:
            if not all(self.fs.exists(self._path(group, n, "zarr.json")) for n in cols):
                self.prepare_epoch(epoch)
            self._prepared.add(epoch)

        def put(name: str) -> None:
            lo, hi = ranges[name]
            self._array(group, name)[lo:hi] = cols[name]

        self._each(put, cols)

    def _read_arrays(self, epoch: int, chunk: int, ranges: dict[str, tuple[int, int]]) -> Chunk:
        group = self._group_path(epoch)

        def get(name: str) -> np.ndarray:
            lo, hi = ranges[name]
            return np.asarray(self._array(group, name)[lo:hi])

        return self._each(get, ranges)

    def _each(self, fn: Callable[[str], Any], names: Iterable[str]) -> dict[str, Any]:
        """{name: fn(name)} over a chunk's columns: on local disk one after the other; on object storage,
        where each is a round trip or two (a shard's index, then its bytes), all at once in threads."""
        names = list(names)
        if self._local() or len(names) < 2:
            return {n: fn(n) for n in names}
        with ThreadPoolExecutor(min(len(names), OBJECT_STORE_THREADS), thread_name_prefix="kdlib-zarr") as pool:
            return dict(zip(names, pool.map(fn, names)))

    def _write_named(self, name: str, cols: Chunk) -> None:
        n = len(next(iter(cols.values())))
        for col, a in cols.items():
            arr = (
                self._create(name, col, str(a.dtype), a.shape[1:], n, max(n, 1))
                if not self.fs.exists(self._path(name, col, "zarr.json"))
                else self._array(name, col)
            )
            arr[:] = a

    def _read_named(self, name: str, fields: dict, n: int) -> Chunk:
        return {col: np.asarray(self._array(name, col)[:n]) for col in fields}

    def _describe_file(self, epoch: int, chunk: int, column: str) -> str:
        return posixpath.join(self.url, self._group_path(epoch), column, "c", str(chunk))

    @store_faults
    def bytes_on_disk(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for path, info in self.fs.find(self.root, detail=True).items():
            rel = posixpath.relpath(path, self.root).split("/")
            if len(rel) >= 3 and rel[0].startswith("e") and rel[2] == "c":
                out[rel[1]] = out.get(rel[1], 0) + int(info.get("size", 0))
        return out
