"""Sources: indexed image collections ``id -> (image, label)`` with a fingerprint.

:func:`open_source` picks the kind from its ``data`` argument:

* ``"fashion-mnist"``: the Fashion-MNIST IDX files (grayscale 28x28), found on disk or downloaded.
* a directory: an ImageFolder, ``<dir>[/<split>]/<class>/**/*.{jpg,jpeg,png}``, decoded to RGB.
* a ``.npz`` file with ``images`` and ``labels`` arrays; the file is used as-is for every split.
* ``wds:PATTERN[?test=PATTERN]``: webdataset tar shards, local or fsspec URLs (``kdlib.source_wds``).
* ``hf:PATH[?image=COL&label=COL&train=NAME&test=NAME]``: a Hugging Face dataset saved on disk
  (``save_to_disk`` or parquet files; ``kdlib.source_hf``).

The fingerprint names the data, not where it lives: it hashes the name, image count, classes,
channels, every image size and label, file names (ImageFolder, wds) and the bytes of ~64 evenly spaced
images. The same data opened twice or from another path gives the same fingerprint; a change of
content, order, size or limit gives another one. Split and root are not hashed, so one ``.npz``
used for two splits has one fingerprint.

Sources hold only paths and numpy arrays (no open files), so they pickle into DataLoader workers.
Samples are evenly spaced ids, never random draws, so they are the same in every process.
"""

from __future__ import annotations

import difflib
import errno
import gzip
import hashlib
import json
import math
import os
import struct
import time
import unicodedata
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
from PIL import Image

from kdlib.errors import SourceError
from kdlib.source_base import (  # noqa: F401 (_evenly_spaced, pil_image, _header_size: kdlib.source's names too)
    IMAGE_EXTENSIONS,
    Source,
    _cache_dir,
    _decode_rgb,
    _evenly_spaced,
    _header_size,
    _index_cache_dir,
    _load_npz,
    _note,
    _plural,
    _save_npz,
    pil_image,
)
from kdlib.source_hf import HFSource
from kdlib.source_wds import WdsSource

__all__ = [
    "FASHION_MNIST_CLASSES", "IMAGE_EXTENSIONS", "Source", "FashionMNISTSource", "ImageFolderSource",
    "NpzSource", "WdsSource", "HFSource", "LimitedSource", "open_source", "save_source_index",
]  # fmt: skip

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip

_SYSTEM_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"  # Debian package dataset-fashion-mnist
_ACCEPTED = (
    "'fashion-mnist', an ImageFolder directory (<dir>[/train|test|val]/<class>/*.jpg|png), "
    "a .npz file with 'images' and 'labels' arrays, wds:PATTERN (webdataset tars) or hf:PATH "
    "(a Hugging Face dataset on disk)"
)


class _ArraySource(Source):
    """Images held in memory: uint8 [N, H, W] (1 channel) or [N, H, W, 3] (RGB), labels int64 [N]."""

    def __init__(self, name: str, split: str, root: str, classes: list[str], images: np.ndarray,
                 labels: np.ndarray):  # fmt: skip
        super().__init__(name, split, root, classes, 1 if images.ndim == 3 else 3)
        self._images = np.ascontiguousarray(images)
        self._labels = labels.astype(np.int64)

    def __len__(self) -> int:
        return len(self._images)

    def sizes(self) -> np.ndarray:
        return np.tile(np.array(self._images.shape[1:3], np.int32), (len(self), 1))

    def labels(self) -> np.ndarray:
        return self._labels.copy()

    def decode(self, i: int) -> np.ndarray:
        image = self._images[self._check_id(i)]
        if self.channels == 1:
            return image[None].copy()  # copy: callers may write into it
        return np.ascontiguousarray(image.transpose(2, 0, 1))  # HWC -> CHW (copies)


def _read_idx(path: str, ndim: int) -> np.ndarray:
    """A uint8 IDX array with ``ndim`` dims (magic 0x000008<ndim>), from a plain or .gz file."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise SourceError(f"cannot read IDX file {path}: {e}") from e
    header = 4 + 4 * ndim
    if len(raw) < header or raw[:4] != bytes([0, 0, 0x08, ndim]):
        want = f"000008{ndim:02x} (uint8, {ndim} dims)"
        raise SourceError(f"bad IDX magic {raw[:4].hex()} in {path}: want {want}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    size = math.prod(dims)
    if len(raw) - header != size:
        have = len(raw) - header
        raise SourceError(f"IDX file {path} is truncated or too long: {list(dims)} need {size} bytes, has {have}")
    return np.frombuffer(raw, np.uint8, count=size, offset=header).reshape(dims)


def _idx_files(directory: str, split: str) -> tuple[str, str] | None:
    """(images, labels) paths of a split in ``directory``, or None if either is missing."""
    if split not in ("train", "test"):
        raise SourceError(f"Fashion-MNIST has splits 'train' and 'test', not {split!r}")
    prefix = "train" if split == "train" else "t10k"
    found = []
    for stem in (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"):
        paths = [os.path.join(directory, stem + ext) for ext in ("", ".gz")]  # plain first: faster
        found += [p for p in paths if os.path.isfile(p)][:1]
    return (found[0], found[1]) if len(found) == 2 else None


class FashionMNISTSource(_ArraySource):
    """Fashion-MNIST from IDX files in ``root``; the split is held in memory as uint8 [N, 28, 28]."""

    def __init__(self, root: str, split: str = "train"):
        files = _idx_files(root, split)
        if files is None:
            raise SourceError(f"no Fashion-MNIST {split} IDX files in {root}")
        images, labels = _read_idx(files[0], 3), _read_idx(files[1], 1)
        if len(labels) != len(images):
            raise SourceError(f"{files[1]}: {len(labels)} labels for {len(images)} images in {files[0]}")
        if len(labels) and labels.max() >= len(FASHION_MNIST_CLASSES):
            raise SourceError(f"{files[1]}: label {labels.max()} outside 0..9")
        super().__init__("fashion-mnist", split, os.path.abspath(root), FASHION_MNIST_CLASSES, images, labels)


def _download_fashion_mnist(root: str, split: str) -> None:
    import torchvision  # imported here: slow to import and only needed without local files

    torchvision.datasets.FashionMNIST(root=root, train=split == "train", download=True)


def _open_fashion_mnist(split: str) -> FashionMNISTSource:
    places = []
    if os.environ.get("KDLIB_DATA"):
        env = os.path.expanduser(os.environ["KDLIB_DATA"])
        places += [env, os.path.join(env, "FashionMNIST", "raw")]
    cache_raw = os.path.join(_cache_dir(), "FashionMNIST", "raw")
    places += [_SYSTEM_FASHION_MNIST, cache_raw]
    for directory in places:
        if _idx_files(directory, split):
            return FashionMNISTSource(directory, split)
    try:
        _download_fashion_mnist(_cache_dir(), split)
    except Exception as e:  # offline: URLError, RuntimeError, ... depending on where it fails
        reason = f"{type(e).__name__}: {e}"
    else:
        if _idx_files(cache_raw, split):
            return FashionMNISTSource(cache_raw, split)
        reason = f"no IDX files in {cache_raw} after download"
    raise SourceError(
        f"Fashion-MNIST {split} IDX files not found; looked in: {', '.join(places)}; "
        f"download into {_cache_dir()} failed ({reason}). Install them with "
        "`apt-get install dataset-fashion-mnist`, or set KDLIB_DATA to a directory holding "
        "the IDX files (or a torchvision root with FashionMNIST/raw)."
    )


def _split_dir(path: str, split: str) -> str:
    """The folder holding the class folders of ``split`` under ``path``."""
    names = [split] + (["val"] if split == "test" else [])
    for name in names:
        if os.path.isdir(os.path.join(path, name)):
            return os.path.join(path, name)
    if split == "train":
        # A root with test/ or val/ but no train/ would turn split folders into classes.
        if any(os.path.isdir(os.path.join(path, n)) for n in ("test", "val")):
            raise SourceError(f"{path} has test/ or val/ but no train/ folder for split 'train'")
        return path
    raise SourceError(f"no {' or '.join(n + '/' for n in names)} folder in {path} for split {split!r}")


_FAST_FILES_PER_S = 10000  # header reads faster than this are not waiting on the disk
_CACHE_MIN_FILES = 10000  # smaller folders scan in well under a second: no need to write to the user's cache


def _read_size(path: str) -> tuple[int, int]:
    try:
        size = _header_size(path)
        if size is not None:
            return size
        with Image.open(path) as im:  # reads the header only; pixels stay undecoded
            width, height = im.size
        return height, width
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... on bad files
        raise SourceError(f"cannot read image header of {path}: {e!r}") from e


def _read_sizes(paths: list[str]) -> np.ndarray:
    """(height, width) of every file. Serial while the files come fast (page cache, local SSD: the
    parser is GIL-bound and threads only contend); threads when reads are slow (a cold disk, a
    network file system), where overlapping the waits is what helps."""
    sizes = np.empty((len(paths), 2), np.int32)
    t0, i = time.perf_counter(), 0
    for i, p in enumerate(paths):
        sizes[i] = _read_size(p)
        if i == 511 and time.perf_counter() - t0 > 512 / _FAST_FILES_PER_S:
            break
    else:
        return sizes
    rest = paths[i + 1 :]
    with ThreadPoolExecutor(16) as pool:
        for j, hw in enumerate(pool.map(_read_size, rest, chunksize=64), start=i + 1):
            sizes[j] = hw
    return sizes


def _code_points(name: str) -> str:
    """``name`` quoted, with its code points when it is not plain ASCII (NFC and NFD forms print alike)."""
    if name.isascii():
        return repr(name)
    return f"{name!r} ({' '.join(f'U+{ord(c):04X}' for c in name)})"


def _count_extensions(counts: dict[str, int]) -> str:
    """``{".webp": 3, ".txt": 1}`` -> ``".webp: 3, .txt: 1"``, most frequent first, at most 8 named."""
    items = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    text = ", ".join(f"{ext}: {n}" for ext, n in items[:8])
    return text + (f", {len(items) - 8} more kinds" if len(items) > 8 else "")


class _Listing(NamedTuple):
    files: list[str]  # relative to root, '/'-separated
    labels: list[int]
    stamps: list[tuple[int, int]]  # (bytes, mtime_ns) per file
    skipped: dict[str, int]  # extension -> files kdlib does not read, in the class folders
    loops: list[str]  # symlinks not followed: each leads to a folder above it, or to itself


def _dir_id(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _real_ancestors(path: str) -> frozenset[tuple[int, int]]:
    """(st_dev, st_ino) of ``path`` and of every folder above it, symlinks resolved."""
    ids = set()
    p = os.path.realpath(path)
    while True:
        ids.add(_dir_id(os.stat(p)))
        parent = os.path.dirname(p)
        if parent == p:
            return frozenset(ids)
        p = parent


def _listing(root: str, classes: list[str], folders: list[str | None] | None = None) -> _Listing:
    """The image files of every class, labelled; an empty class folder is refused.

    ``folders``: each class's folder name on disk (None: absent from this split), by default the class
    names. Symlinked files and folders are followed, except a folder symlink that leads back to a folder
    above it (or to itself): following it would list the same images again, forever; it is reported."""
    files: list[str] = []
    labels: list[int] = []
    stamps: list[tuple[int, int]] = []
    skipped: dict[str, int] = {}
    loops: list[str] = []
    for label, folder in enumerate(classes if folders is None else folders):
        if folder is None:
            continue
        top = os.path.join(root, folder)
        if not os.path.isdir(top):
            continue  # a split may lack some of the training split's classes
        found = []
        others: dict[str, int] = {}
        # (folder, its path relative to root, '/'-separated: no relpath per file, the (st_dev, st_ino) of it
        # and of every folder above it: one of those met again is a loop)
        stack = [(top, folder + "/", _real_ancestors(top))]
        while stack:
            d, rel, above = stack.pop()
            with os.scandir(d) as it:
                for e in it:
                    if e.name.startswith("."):
                        continue
                    try:
                        is_dir = e.is_dir(follow_symlinks=True)
                        ident = _dir_id(e.stat(follow_symlinks=True)) if is_dir else None
                    except OSError as exc:
                        if exc.errno != errno.ELOOP:
                            raise
                        loops.append(rel + e.name)  # a symlink that resolves to itself (a -> a, a -> b -> a)
                        continue
                    if ident is not None:
                        if ident in above:
                            loops.append(rel + e.name)
                        else:
                            stack.append((e.path, rel + e.name + "/", above | {ident}))
                    elif e.name.lower().endswith(IMAGE_EXTENSIONS):
                        st = e.stat(follow_symlinks=True)
                        found.append((rel + e.name, st.st_size, st.st_mtime_ns))
                    else:
                        ext = os.path.splitext(e.name)[1].lower() or "(no extension)"
                        others[ext] = others.get(ext, 0) + 1
        if not found:
            n = sum(others.values())
            holds = f" (it holds {_plural(n, 'file')} kdlib does not read: {_count_extensions(others)})" if n else ""
            raise SourceError(f"class folder {top} has no .jpg/.jpeg/.png files{holds}: remove it or add images")
        found.sort()  # the file system's order is not stable
        files += [f for f, _, _ in found]
        stamps += [(n, t) for _, n, t in found]
        labels += [label] * len(found)
        for ext, n in others.items():
            skipped[ext] = skipped.get(ext, 0) + n
    return _Listing(files, labels, stamps, skipped, sorted(loops))


def _train_classes(path: str, split: str) -> list[str] | None:
    """The training split's class folder names, when ``split`` is another split of the same root."""
    if split == "train":
        return None
    try:
        train = os.path.abspath(_split_dir(path, "train"))
    except SourceError:
        return None
    if train == os.path.abspath(path):  # no train/ folder: the root holds this split's classes only
        return None
    return sorted(e.name for e in os.scandir(train) if e.is_dir() and not e.name.startswith("."))


def _nfc(name: str) -> str:
    return unicodedata.normalize("NFC", name)


def _class_folders(root: str, own: list[str], classes: list[str]) -> list[str | None]:
    """The folder of ``root`` that holds each training class (None: none does). A folder name matches a
    class exactly or, failing that, after Unicode NFC normalisation (a folder copied through macOS or
    an archive may be stored decomposed, NFD); a folder that matches no class is refused."""
    index = {c: i for i, c in enumerate(classes)}
    by_nfc: dict[str, list[int]] = {}
    for i, c in enumerate(classes):
        by_nfc.setdefault(_nfc(c), []).append(i)
    folders: list[str | None] = [None] * len(classes)
    for name in own:
        if name in index:
            folders[index[name]] = name
    unknown, twice, renamed = [], [], []
    for name in own:
        if name in index:
            continue
        hits = by_nfc.get(_nfc(name), [])
        if len(hits) != 1:
            unknown.append(name)
        elif folders[hits[0]] is not None:
            twice.append((name, folders[hits[0]]))
        else:
            folders[hits[0]] = name
            renamed.append((name, classes[hits[0]]))
    if twice:
        a, b = twice[0]
        raise SourceError(f"{root}: class folders {_code_points(a)} and {_code_points(b)} are the same class "
                          "after Unicode NFC normalisation: merge them into one folder")  # fmt: skip
    if unknown:
        shown = "[" + ", ".join(_code_points(n) for n in unknown[:5]) + "]"
        hint = ""
        if not all(n.isascii() for n in unknown):
            near = difflib.get_close_matches(_nfc(unknown[0]), list(by_nfc), n=1, cutoff=0.5)
            closest = f"; the closest training class is {_code_points(classes[by_nfc[near[0]][0]])}" if near else ""
            hint = f" (names are compared after Unicode NFC normalisation{closest})"
        raise SourceError(
            f"{root}: class folder(s) {shown} are not classes of the training split "
            f"({len(classes)} classes){hint}; rename or remove them"
        )
    for name, cls in renamed:  # said only when nothing is refused: bad input gets one line
        _note(f"note: {root}: class folder {_code_points(name)} is the training split's class {_code_points(cls)}: "
              "names are compared after Unicode NFC normalisation")  # fmt: skip
    return folders


class ImageFolderSource(Source):
    """``<root>[/<split>]/<class>/**/*.{jpg,jpeg,png}``, every image decoded to RGB.

    Classes are the sorted class folder names of the training split (another split maps its
    folders to them by name, compared after Unicode NFC normalisation, and refuses a folder the
    training split lacks); files are sorted by path within a class; hidden files and folders
    (``.x``, e.g. macOS ``._x.jpg``) are skipped; files of other extensions are skipped and
    counted in one ``note:`` on stderr; symlinks are followed, except a folder symlink that loops
    back (noted too); an empty class folder is refused. EXIF orientation is ignored, as in
    torchvision's ImageFolder: pixels are taken as stored. 16-bit PNGs are scaled to 8 bits.

    Image sizes are read once and kept in an index keyed by the listing (names, byte counts,
    mtimes): in ``index_dirs`` (a store keeps the index it planned with) and in
    ``$KDLIB_INDEX_CACHE`` (default ``~/.cache/kdlib/index``); a changed folder has another key.
    """

    def __init__(self, path: str, split: str = "train", index_dirs: tuple[str, ...] = ()):
        root = os.path.abspath(_split_dir(path, split))
        own = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        classes = _train_classes(path, split)
        folders = None if classes is None else _class_folders(root, own, classes)
        classes = own if classes is None else classes
        if not own:
            raise SourceError(f"empty ImageFolder {root}: no class folders")
        files, labels, stamps, skipped, loops = _listing(root, classes, folders)
        if not files:
            raise SourceError(f"empty ImageFolder {root}: no .jpg/.jpeg/.png files in its class folders")
        if skipped:
            _note(f"note: skipped {_plural(sum(skipped.values()), 'file')} kdlib does not read under {root} "
                  f"({_count_extensions(skipped)}); kdlib reads .jpg, .jpeg and .png, in any case")  # fmt: skip
        if loops:
            named = ", ".join(loops[:3]) + (f" and {len(loops) - 3} more" if len(loops) > 3 else "")
            one = len(loops) == 1
            which = (
                "loops back to a folder above it or to itself"
                if one
                else "loop back to a folder above them or to themselves"
            )
            _note(f"note: skipped {_plural(len(loops), 'symlink')} under {root} that {which} ({named}): "
                  "each real folder is listed once")  # fmt: skip
        super().__init__("imagefolder", split, root, classes, 3)
        self._files = files  # relative to root, '/'-separated: the fingerprint must not see root
        self._labels = np.array(labels, np.int64)
        h = hashlib.sha256(b"kdlib-index-1\0")
        h.update(json.dumps([files, stamps]).encode())
        self.listing_digest = h.hexdigest()
        self._index_dirs = tuple(index_dirs)
        self._sizes: np.ndarray | None = None

    def _path(self, i: int) -> str:
        return os.path.join(self.root, self._files[i])

    def __len__(self) -> int:
        return len(self._files)

    def _index_paths(self) -> list[str]:
        name = f"{self.listing_digest[:32]}.npz"
        return [os.path.join(d, name) for d in (*self._index_dirs, _index_cache_dir()) if d]

    def _load_index(self) -> np.ndarray | None:
        z = _load_npz(self._index_paths(), self.listing_digest)
        if z is None or z["sizes"].shape != (len(self), 2):
            return None  # missing, unreadable or foreign: rescan (the index is only a cache)
        if "mean" in z and self._mean_std is None:
            self._mean_std = (z["mean"].tolist(), z["std"].tolist())
        return z["sizes"].astype(np.int32)

    def save_index(self, directory: str | None = None) -> str | None:
        """Write the index (sizes, and the pixel mean/std a from-scratch model is normalised with) into
        ``directory`` (default: the user cache; an fsspec URL too); -> its path, None if unwritable."""
        directory = directory or _index_cache_dir()
        if directory is None:
            return None
        mean, std = self.mean_std()
        return _save_npz(
            os.path.join(directory, f"{self.listing_digest[:32]}.npz"),
            listing=np.array(self.listing_digest), sizes=self.sizes(), mean=np.array(mean), std=np.array(std),
        )  # fmt: skip

    def sizes(self) -> np.ndarray:
        if self._sizes is None:
            sizes = self._load_index()
            if sizes is None:
                self._sizes = _read_sizes([self._path(i) for i in range(len(self))])
                if len(self) >= _CACHE_MIN_FILES:
                    self.save_index()
            else:
                self._sizes = sizes
        return self._sizes.copy()

    def mean_std(self) -> tuple[list[float], list[float]]:
        if self._mean_std is None and self._sizes is None:
            self._sizes = self._load_index()  # an index also holds the statistics
        return super().mean_std()

    def _sizes_head(self, n: int) -> np.ndarray:
        if self._sizes is None:
            self._sizes = self._load_index()
        if self._sizes is not None:
            return self._sizes[:n].copy()
        return _read_sizes([self._path(i) for i in range(n)])

    def labels(self) -> np.ndarray:
        return self._labels.copy()

    def decode(self, i: int) -> np.ndarray:
        return np.ascontiguousarray(np.asarray(self.decode_image(i)[0]).transpose(2, 0, 1))

    def decode_draft(self, i: int, scale: int) -> tuple[np.ndarray, int]:
        im, applied = self.decode_image(i, scale)
        return np.ascontiguousarray(np.asarray(im).transpose(2, 0, 1)), applied

    def decode_image(self, i: int, scale: int = 1) -> tuple[Image.Image, int]:
        path = self._path(self._check_id(i))
        return _decode_rgb(path, path, scale)

    def _content(self, i: int) -> bytes:
        # The encoded file, not decoded pixels: a JPEG decoder update must not change the fingerprint.
        path = self._path(i)
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as e:
            raise SourceError(f"cannot read image {path}: {e}") from e

    def _names(self) -> list[str]:
        return self._files


def save_source_index(source: Source, directory: str) -> str | None:
    """Keep the index a source was opened with (an ImageFolder's or hf dataset's sizes, a wds member index)
    in ``directory`` (e.g. a store's ``index/``); None for sources without one."""
    inner = source.source if isinstance(source, LimitedSource) else source
    if isinstance(inner, WdsSource):
        return inner.save_index(directory)  # built whole whatever the limit
    if not isinstance(inner, (ImageFolderSource, HFSource)) or (inner is not source and inner._sizes is None):
        return None  # a limited view read only its own headers: no full index to keep
    return inner.save_index(directory)


class NpzSource(_ArraySource):
    """Arrays in a ``.npz``: ``images`` uint8 [N,H,W] (1 channel) or [N,H,W,3] (RGB), ``labels`` int [N],
    optional ``classes`` strings (else "0".."C-1", C = max label + 1). Used as-is for every split."""

    def __init__(self, path: str, split: str = "train"):
        path = os.path.abspath(path)
        try:
            with np.load(path, allow_pickle=False) as z:  # no pickle: a data file must not run code
                arrays = {k: z[k] for k in z.files}
        except Exception as e:  # zipfile, OSError, ValueError (object arrays), ...
            raise SourceError(f"cannot read npz file {path}: {e!r}") from e
        if missing := {"images", "labels"} - arrays.keys():
            raise SourceError(f"npz file {path} lacks {sorted(missing)}; it has {sorted(arrays)}")
        images, labels = arrays["images"], arrays["labels"]
        shape = f"{images.dtype} {list(images.shape)}"
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or images.shape[3:] not in ((), (3,)):
            raise SourceError(f"{path}: 'images' must be uint8 [N,H,W] or [N,H,W,3], got {shape}")
        if len(images) == 0 or labels.shape != images.shape[:1] or labels.dtype.kind not in "iu":
            raise SourceError(f"{path}: want N > 0 images and int labels [N], got {shape} and {labels.dtype} "
                              f"{list(labels.shape)}")  # fmt: skip
        names = arrays["classes"] if "classes" in arrays else np.arange(labels.max() + 1).astype(str)
        if names.ndim != 1 or names.dtype.kind not in "US":
            raise SourceError(f"{path}: 'classes' must be a 1-d string array, got {names.dtype}")
        classes = [c.decode() if isinstance(c, bytes) else str(c) for c in names.tolist()]
        if labels.min() < 0 or labels.max() >= len(classes):
            span = f"{labels.min()}..{labels.max()}"
            raise SourceError(f"{path}: labels {span} outside 0..{len(classes) - 1} ({len(classes)} classes)")
        super().__init__("npz", split, path, classes, images, labels)


class LimitedSource(Source):
    """The first ``limit`` ids of another source; nothing is copied."""

    def __init__(self, source: Source, limit: int):
        super().__init__(source.name, source.split, source.root, source.classes, source.channels)
        self.source = source
        self.limit = min(int(limit), len(source))

    def __len__(self) -> int:
        return self.limit

    def sizes(self) -> np.ndarray:
        return self.source._sizes_head(self.limit)

    def labels(self) -> np.ndarray:
        return self.source.labels()[: self.limit]

    def decode(self, i: int) -> np.ndarray:
        return self.source.decode(self._check_id(i))

    def decode_draft(self, i: int, scale: int) -> tuple[np.ndarray, int]:
        return self.source.decode_draft(self._check_id(i), scale)

    def decode_image(self, i: int, scale: int = 1) -> tuple[Image.Image, int]:
        return self.source.decode_image(self._check_id(i), scale)

    def _content(self, i: int) -> bytes:
        return self.source._content(i)

    def _names(self) -> list[str] | None:
        names = self.source._names()
        return None if names is None else names[: self.limit]

    def describe(self) -> dict:
        return {**super().describe(), "limit": self.limit}


def open_source(data: str, split: str = "train", limit: int | None = None, index_dirs: tuple[str, ...] = ()) -> Source:
    """Open ``data`` ("fashion-mnist", an ImageFolder directory, a ``.npz`` file, ``wds:PATTERN`` or
    ``hf:PATH``, see the module docstring) for ``split``.

    ``limit`` keeps the first ``limit`` ids (own fingerprint, ``describe()["limit"]``); a limit of
    at least the source's size gives the whole source itself. "fashion-mnist" is the dataset even
    if a directory of that name exists. ``index_dirs``: where an ImageFolder's size index may
    already be (a store's ``index/``), before the user cache; a wds source's member index and an hf
    dataset's size index are looked up there too.
    """
    if not isinstance(split, str) or not split:
        raise SourceError(f"split must be a non-empty string, got {split!r}")
    # Checked before opening, so a bad flag fails fast rather than after reading the data.
    is_int = isinstance(limit, (int, np.integer)) and not isinstance(limit, bool)
    if limit is not None and not (is_int and limit > 0):
        raise SourceError(f"limit must be a positive int or None, got {limit!r}")
    if not isinstance(data, (str, os.PathLike)):
        raise SourceError(f"data must be a string or path, got {data!r}; accepted: {_ACCEPTED}")
    if data == "fashion-mnist":
        source: Source = _open_fashion_mnist(split)
    elif isinstance(data, str) and data.startswith("wds:"):
        source = WdsSource(data, split, index_dirs=tuple(index_dirs))
    elif isinstance(data, str) and data.startswith("hf:"):
        source = HFSource(data, split, index_dirs=tuple(index_dirs))
    else:
        path = os.path.expanduser(os.fspath(data))
        if os.path.isdir(path):
            source = ImageFolderSource(path, split, index_dirs=tuple(index_dirs))
        elif path.lower().endswith(".npz") and os.path.isfile(path):
            source = NpzSource(path, split)
        elif path.lower().endswith(".npz"):
            raise SourceError(f"npz file {path} does not exist")
        else:
            raise SourceError(f"unknown data {os.fspath(data)!r}: not a dataset name, a directory or a .npz "
                              f"file; accepted: {_ACCEPTED}")  # fmt: skip
    if limit is not None and limit < len(source):
        source = LimitedSource(source, int(limit))
    return source
