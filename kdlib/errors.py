"""One error hierarchy for kdlib.

Bad input (a flag, a file, a store that does not fit) is a ``KdlibError``: the CLI prints one
line and exits 2. An environment fault (a full disk, a read-only filesystem, no permission)
is a ``StorageError`` (or a bare ``OSError`` with such an errno): one line, exit 1.

Each error is also the built-in kind a caller would expect (a missing file is a
``FileNotFoundError``, a bad value a ``ValueError``), so generic handlers still work.
Messages name the bad value and the path it came from.
"""

from __future__ import annotations

__all__ = [
    "KdlibError",
    "SourceError",
    "RecipeError",
    "ModelError",
    "StoreError",
    "StoreNotFoundError",
    "StoreMismatchError",
    "StoreVersionError",
    "CorruptStoreError",
    "StoreBusyError",
    "ConfigError",
    "StorageError",
    "RunBusyError",
    "NonFiniteLossError",
    "ObjectStoreError",
    "BucketNotFoundError",
]


class KdlibError(Exception):
    """Base of every error kdlib raises on purpose."""


class ConfigError(KdlibError, ValueError):
    """A flag or config value is invalid (names the key and the value)."""


class SourceError(KdlibError, ValueError):
    """An image source cannot be opened or an image cannot be decoded."""


class RecipeError(ConfigError):
    """A recipe file or field is invalid."""


class ModelError(KdlibError, ValueError):
    """A model spec cannot be resolved or its weights cannot be loaded."""


class StoreError(KdlibError):
    """Base of store errors."""


class StoreNotFoundError(StoreError, FileNotFoundError):
    """No store (no meta.json) at the given path."""


class StoreMismatchError(StoreError, ValueError):
    """A store was written for another source, teacher, recipe, k or class count."""


class StoreVersionError(StoreError, ValueError):
    """A store's format version is unknown or newer than this kdlib can read."""


class CorruptStoreError(StoreError, IOError):
    """A chunk failed its checksum, is truncated, or cannot be decoded."""


class StoreBusyError(StoreError, BlockingIOError):
    """Another precompute holds the store's write lock."""


class StorageError(KdlibError, OSError):
    """The filesystem refused a write (full, read-only, no permission): an environment fault, exit 1."""


class RunBusyError(StorageError, BlockingIOError):
    """Another live `kdlib train` holds the run directory's lock: another process, not the input (exit 1)."""


class NonFiniteLossError(KdlibError, FloatingPointError):
    """Training stopped at a non-finite loss, teacher logit or weight (names the step and the student)."""


class ObjectStoreError(StorageError):
    """The object store behind an `s3://...` URL cannot be reached or refuses the credentials (names the URL
    and the endpoint): an environment fault, exit 1."""


class BucketNotFoundError(StoreNotFoundError):
    """The bucket an object-store URL names does not exist (kdlib never creates one)."""
