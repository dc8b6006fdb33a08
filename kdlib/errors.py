"""One error hierarchy for kdlib.

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
    "ConfigError",
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
