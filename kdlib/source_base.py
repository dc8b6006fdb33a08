"""The source interface, and what every kind of source shares: decoding to RGB, image headers, the index cache.

A source (``kdlib.source``, ``kdlib.source_wds``, ``kdlib.source_hf``) is an indexed image collection
``id -> (image, label)`` with a fingerprint; ``kdlib.source.open_source`` picks the kind. Every source
of encoded images (ImageFolder files, tar members, arrow cells) decodes through ``_decode_rgb``, so the
same bytes give the same pixels whichever container held them.
"""

from __future__ import annotations

import abc
import hashlib
import io
import json
import operator
import os
import re
import struct
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO

import fsspec
import numpy as np
from PIL import Image

from kdlib.errors import SourceError

__all__ = ["IMAGE_EXTENSIONS", "Source", "pil_image", "storage_options", "using_storage_options"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")

_FINGERPRINT_VERSION = "kdlib-source-fingerprint-1"  # bump if what is hashed changes
_FINGERPRINT_SAMPLES = 64
_MEAN_STD_SAMPLES = 2000


def _evenly_spaced(n: int, k: int) -> np.ndarray:
    """Up to ``k`` ids spread evenly over ``range(n)``, first and last included (exact ints)."""
    if n <= k:
        return np.arange(n, dtype=np.int64)
    return np.arange(k, dtype=np.int64) * (n - 1) // max(k - 1, 1)


class Source(abc.ABC):
    """An indexed image collection ``id -> (image, label)`` with a fingerprint."""

    def __init__(self, name: str, split: str, root: str, classes: list[str], channels: int):
        self.name = name
        self.split = split
        self.root = root
        self.classes = list(classes)
        self.channels = channels
        self._fingerprint: str | None = None
        self._mean_std: tuple[list[float], list[float]] | None = None

    @property
    def num_classes(self) -> int:
        """Number of classes; labels are in ``range(num_classes)``."""
        return len(self.classes)

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of images."""

    @abc.abstractmethod
    def sizes(self) -> np.ndarray:
        """int32 [N, 2]: (height, width) of every image."""

    @abc.abstractmethod
    def labels(self) -> np.ndarray:
        """int64 [N]: the label of every image."""

    @abc.abstractmethod
    def decode(self, i: int) -> np.ndarray:
        """uint8 [channels, H, W] pixels of image ``i``; SourceError naming it when unreadable."""

    def decode_draft(self, i: int, scale: int) -> tuple[np.ndarray, int]:
        """Image ``i`` decoded ``scale`` times smaller where the format allows it cheaply (JPEG's DCT
        scaling), and the scale actually applied; by default the full image and 1."""
        return self.decode(i), 1

    def decode_image(self, i: int, scale: int = 1) -> tuple[Image.Image, int]:
        """The pixels of ``decode_draft(i, scale)`` as a PIL image (mode L or RGB), and the scale
        applied: what a worker's Pillow renderer reads."""
        pixels, applied = self.decode_draft(i, scale) if scale > 1 else (self.decode(i), 1)
        return pil_image(pixels), applied

    def _sizes_head(self, n: int) -> np.ndarray:
        """Sizes of the first ``n`` ids (a limited view need not read every header)."""
        return self.sizes()[:n]

    def _content(self, i: int) -> bytes:
        """The bytes that stand for image ``i`` in the fingerprint (default: its pixels)."""
        return self.decode(i).tobytes()

    def _names(self) -> list[str] | None:
        """Per-id names that pin the order (file paths), or None where ids have no names."""
        return None

    def _check_id(self, i: int) -> int:
        try:
            j = operator.index(i)
        except TypeError:
            raise SourceError(f"image id must be an int, got {i!r}") from None
        if not 0 <= j < len(self):
            raise SourceError(f"image id {j} out of range: {self.name} {self.split} has {len(self)} images")
        return j

    def fingerprint(self) -> str:
        """Hex sha256 of the data (see the module docstring for what goes in); cached."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            header = {"format": _FINGERPRINT_VERSION, "name": self.name, "num_images": len(self),
                      "classes": self.classes, "channels": self.channels}  # fmt: skip
            h.update(json.dumps(header, sort_keys=True).encode())
            h.update(np.ascontiguousarray(self.sizes(), dtype="<i4").tobytes())
            h.update(np.ascontiguousarray(self.labels(), dtype="<i8").tobytes())
            names = self._names()
            if names is not None:
                h.update(json.dumps(names).encode())
            for i in _evenly_spaced(len(self), _FINGERPRINT_SAMPLES).tolist():
                data = self._content(i)
                h.update(struct.pack("<QQ", i, len(data)))  # framing: samples cannot run together
                h.update(data)
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def mean_std(self) -> tuple[list[float], list[float]]:
        """Per-channel pixel mean and std in [0, 1] over up to 2000 evenly spaced images; cached."""
        if self._mean_std is None:
            total = np.zeros(self.channels)
            squares = np.zeros(self.channels)
            count = 0
            for i in _evenly_spaced(len(self), _MEAN_STD_SAMPLES).tolist():
                x = self.decode(i).reshape(self.channels, -1).astype(np.float64) / 255.0
                total += x.sum(axis=1)
                squares += np.square(x).sum(axis=1)
                count += x.shape[1]
            mean = total / count
            std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))  # clamp float rounding below 0
            self._mean_std = (mean.tolist(), std.tolist())
        return list(self._mean_std[0]), list(self._mean_std[1])

    def describe(self) -> dict:
        """JSON-able summary: name, split, root, sizes of things, classes, fingerprint."""
        return {"name": self.name, "split": self.split, "root": self.root, "num_images": len(self),
                "num_classes": self.num_classes, "channels": self.channels,
                "classes": list(self.classes), "fingerprint": self.fingerprint()}  # fmt: skip

    def __repr__(self) -> str:
        kind = type(self).__name__
        return f"{kind}({self.name!r}, split={self.split!r}, n={len(self)}, root={self.root!r})"


def _cache_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "kdlib")


def _index_cache_dir() -> str | None:
    """Where size indexes are cached: $KDLIB_INDEX_CACHE ("off": nowhere), default ~/.cache/kdlib/index."""
    env = os.environ.get("KDLIB_INDEX_CACHE")
    if env and env.lower() in ("0", "off", "no", "false"):
        return None
    return env or os.path.join(_cache_dir(), "index")


_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def _header_size(path: str) -> tuple[int, int] | None:
    """(height, width) from a JPEG's SOF marker or a PNG's IHDR, without PIL; None if unsure.

    About five times faster than ``Image.open`` for small files (the 1.28 M-file case is
    header-bound); anything unusual falls back to PIL, which gives the same answer or the error."""
    with open(path, "rb") as f:
        return _header_size_of(f)


def _header_size_of(f: BinaryIO) -> tuple[int, int] | None:
    """``_header_size`` of an open binary file positioned at the image's first byte (a file, or the
    leading bytes of a tar member or arrow cell in a ``BytesIO``: running out of bytes gives None)."""
    base = f.tell()
    head = f.read(32)
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        w, h = struct.unpack(">II", head[16:24])
        return h, w
    if head[:2] != b"\xff\xd8":
        return None
    pos = 2
    for _ in range(256):  # markers before the frame header: APPn, DQT, DHT, COM, ...
        f.seek(base + pos)
        seg = f.read(9)
        if len(seg) < 4 or seg[0] != 0xFF:
            return None
        marker = seg[1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _SOF:
            if len(seg) < 9:
                return None
            h, w = struct.unpack(">HH", seg[5:9])
            return (h, w) if h and w else None
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        pos += 2 + struct.unpack(">H", seg[2:4])[0]
    return None


def _size_of_bytes(data: bytes, what: str, formats: tuple[str, ...] | None = None) -> tuple[int, int]:
    """(height, width) of an encoded image held in memory, in one of Pillow's ``formats`` (None: any);
    SourceError naming ``what`` if unreadable."""
    try:
        size = _header_size_of(io.BytesIO(data))
        if size is not None:
            return size
        with Image.open(io.BytesIO(data), formats=formats) as im:  # the header only; pixels stay undecoded
            width, height = im.size
        return height, width
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... on bad files
        raise SourceError(f"cannot read image header of {what}: {_why(e, formats)}") from e


def _why(e: Exception, formats: tuple[str, ...] | None) -> str:
    if formats is not None and isinstance(e, Image.UnidentifiedImageError):
        return f"not a {' or '.join(formats)} image (the only formats kdlib reads from tars and datasets)"
    return repr(e)


def _decode_rgb(
    fp: str | BinaryIO, what: str, scale: int = 1, formats: tuple[str, ...] | None = None
) -> tuple[Image.Image, int]:
    """An encoded image (a path or a binary file) in one of Pillow's ``formats`` (None: any Pillow reads)
    as 8-bit RGB, shrunk ``scale`` times in JPEG's DCT domain where it can be, and the scale applied:
    every encoded source decodes here, alike."""
    try:
        with Image.open(fp, formats=formats) as im:  # only the parsers asked for ever see the bytes
            width = im.size[0]
            # JPEG's DCT-domain downscale (None: not a JPEG, or no scale asked)
            drafted = im.draft("RGB", (im.size[0] // scale, im.size[1] // scale)) if scale > 1 else None
            rgb = _to_rgb(im)
    except Exception as e:  # see _read_sizes
        raise SourceError(f"cannot decode image {what}: {_why(e, formats)}") from e
    return rgb, 1 if drafted is None else round(width / drafted[1][2])


def pil_image(pixels: np.ndarray) -> Image.Image:
    """uint8 [C, H, W] pixels (C = 1 or 3) as a PIL image (mode L or RGB)."""
    return Image.fromarray(pixels[0] if len(pixels) == 1 else pixels.transpose(1, 2, 0))


def _to_rgb(im: Image.Image) -> Image.Image:
    """An 8-bit RGB image, loaded; 16-bit and 32-bit integer images are scaled, not clipped, to 8 bits."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        a = np.asarray(im).astype(np.int64)
        if im.mode == "I" and (a.min() < 0 or a.max() > 65535):
            raise SourceError(f"32-bit integer pixels outside 0..65535 (mode {im.mode})")
        # PNG 16-bit samples are 0..65535: v * 255 / 65535, rounded (65535 -> 255, 257 -> 1)
        a = ((a * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(np.repeat(a[:, :, None], 3, axis=2))
    if im.mode == "RGB":
        im.load()  # decoded now, while the file is open; no copy
        return im
    return im.convert("RGB")


_noted: set[str] = set()  # notes already printed by this process


def _note(line: str) -> None:
    """Print ``line`` on stderr once per process, from the main process only (a reopened split or another
    rank lists the same folder again; DataLoader workers get the source pickled, never list it)."""
    if line in _noted or os.environ.get("RANK", "0") != "0" or os.environ.get("LOCAL_RANK", "0") != "0":
        return
    _noted.add(line)
    print(line, file=sys.stderr, flush=True)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def storage_options() -> dict:
    """The fsspec options of ``--storage-options`` (handed to every process in $KDLIB_STORAGE_OPTIONS)."""
    raw = os.environ.get("KDLIB_STORAGE_OPTIONS")
    if not raw:
        return {}
    try:
        opts = json.loads(raw)
    except json.JSONDecodeError as e:
        raise SourceError(f"$KDLIB_STORAGE_OPTIONS is not JSON ({e.msg}): give --storage-options a JSON object") from e
    if not isinstance(opts, dict):
        raise SourceError("KDLIB_STORAGE_OPTIONS must be a JSON object of fsspec options")
    return opts


@contextmanager
def using_storage_options(opts: dict[str, Any] | None) -> Iterator[None]:
    """`opts` as the fsspec options while the block runs (a config's `storage_options`), set where
    `--storage-options` puts them, so that DataLoader workers and ranks started meanwhile inherit them;
    None: leave them as they are. The environment is the process's: one run per process at a time."""
    if opts is None:
        yield
        return
    if not isinstance(opts, dict):
        raise SourceError(f"storage_options must be a dict of fsspec options, got {type(opts).__name__}")
    try:
        text = json.dumps(opts)
    except (TypeError, ValueError) as exc:
        raise SourceError(
            f"storage_options must be JSON-serialisable fsspec options (they reach every process as text): {exc}"
        ) from None
    before = os.environ.get("KDLIB_STORAGE_OPTIONS")
    os.environ["KDLIB_STORAGE_OPTIONS"] = text
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("KDLIB_STORAGE_OPTIONS", None)
        else:
            os.environ["KDLIB_STORAGE_OPTIONS"] = before


def _load_npz(paths: list[str], digest: str) -> dict[str, np.ndarray] | None:
    """The arrays of the first index file in ``paths`` (local, or fsspec URLs: a store in a bucket keeps
    its index there) made for ``digest`` (its ``listing``), else None."""
    for path in paths:
        try:
            if "://" in path:
                with fsspec.open(path, "rb", **storage_options()) as f:
                    raw: Any = io.BytesIO(f.read())
            else:
                raw = path
            with np.load(raw, allow_pickle=False) as z:  # no pickle: an index file must not run code
                if str(z["listing"]) == digest:
                    return {k: z[k] for k in z.files}
        except Exception:  # missing, unreadable or foreign: rebuild (an index is only a cache)
            continue
    return None


def _save_npz(path: str, **arrays: np.ndarray) -> str | None:
    """Write ``arrays`` to ``path`` atomically (a reader never sees half a file: a local file is renamed
    into place, an object is put whole); None if unwritable."""
    if "://" in path:
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        try:
            fs, inner = fsspec.core.url_to_fs(path, **storage_options())
            fs.pipe_file(inner, buf.getvalue())
        except Exception:  # a bucket that refuses the write costs a rebuild next time, nothing else
            return None
        return path
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}.npz"
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except OSError:
        return None  # a read-only cache costs a rebuild next time, nothing else
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _listing_digest(tag: bytes, entries: list) -> str:
    """sha256 of a JSON listing (names, byte counts, stamps): what keys an index."""
    h = hashlib.sha256(tag)
    h.update(json.dumps(entries).encode())
    return h.hexdigest()


_OPTION_START = re.compile(r"\?(?=[A-Za-z_]+=)")


def spec_options(spec: str, kind: str, known: tuple[str, ...]) -> tuple[str, dict[str, str]]:
    """``KIND:BODY?key=value&key=value`` -> (BODY, options); an unknown key or an empty body is refused.
    Options begin at the first ``?`` followed by ``name=`` (a glob's ``?`` is not one)."""
    body = spec[len(kind) + 1 :]
    opts: dict[str, str] = {}
    m = _OPTION_START.search(body)
    if m:
        body, tail = body[: m.start()], body[m.end() :]
        for part in tail.split("&"):
            key, _, value = part.partition("=")
            if key not in known:
                raise SourceError(f"{spec}: unknown option {key!r}; {kind}: takes {', '.join(known)}")
            if not value:
                raise SourceError(f"{spec}: option {key!r} has no value")
            opts[key] = value
    if not body:
        raise SourceError(f"{spec}: no path after '{kind}:'")
    return body, opts
