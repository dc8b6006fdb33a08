"""A Hugging Face ``datasets`` dataset on disk as a source: ``hf:PATH[?image=COL&label=COL&train=NAME&test=NAME]``.

PATH is a ``save_to_disk`` folder (a DatasetDict with one folder per split, or a single Dataset, used
as the train split) or a folder of parquet files (``train-00000-of-00004.parquet``, ``data/test-*.parquet``,
``train/*.parquet``: the split is the file's leading word, or its folder's name), which ``datasets``
converts once into its cache (``$KDLIB_INDEX_CACHE/hf``). The image column (default ``image``) is an
``Image`` feature; its stored encoded bytes (PNG, JPEG) are decoded by kdlib, as an ImageFolder's files
are. A cell holding only a file path (as ``Dataset.to_parquet`` writes one) is refused: the file is not
part of the dataset kdlib fingerprints (``save_to_disk`` embeds the files). The label column (default
``label``) is a ``ClassLabel``, whose names are the classes, or plain integers (the classes are then the
ids). ``train=``/``test=`` name the splits kdlib calls train and
test (default: ``train``; ``test``, else ``validation``, else ``val``). The test split has the train
split's classes.

Image sizes are read from the encoded headers once and kept in an index keyed by the split's files
(names, byte counts, modification times), like an ImageFolder's. ``datasets`` (``pip install
'kdlib[hf]'``) is imported only when such a source is opened.
"""

from __future__ import annotations

import io
import json
import os
import re

import numpy as np
from PIL import Image

from kdlib.errors import SourceError
from kdlib.source_base import (
    Source,
    _decode_rgb,
    _header_size_of,
    _index_cache_dir,
    _listing_digest,
    _load_npz,
    _save_npz,
    _size_of_bytes,
    spec_options,
)

__all__ = ["HFSource"]

_INDEX_TAG = b"kdlib-hf-index-1\0"
_HEAD_BYTES = 65536
_MAX_CLASS_ID = 10_000_000  # ImageNet-21k has 21841 classes; a larger id is a corrupt label
_FORMATS = ("PNG", "JPEG")  # what an image cell may hold (Pillow's format names)
_SPLIT_FOLDERS = ("train", "test", "validation", "valid", "val")
_LEADING_WORD = re.compile(r"^[A-Za-z]+")


def _datasets():
    try:
        import datasets  # optional: the hf extra
    except ImportError as e:
        raise SourceError(f"hf: sources need the datasets package ({e}): pip install 'kdlib[hf]'") from e
    datasets.disable_progress_bars()  # one line per fault, no bars: kdlib prints its own progress
    return datasets


def _files_under(root: str, suffix: str) -> list[str]:
    found = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        # cache-*.arrow: what a .map() on the loaded dataset left beside it, not the saved data
        keep = [f for f in sorted(files) if f.endswith(suffix) and not f.startswith(("cache-", "."))]
        found += [os.path.relpath(os.path.join(d, f), root) for f in keep]
    return found


def _parquet_split(rel: str) -> str:
    parts = rel.split(os.sep)
    for folder in parts[:-1]:
        if folder.lower() in _SPLIT_FOLDERS:
            return folder
    m = _LEADING_WORD.match(parts[-1])
    return m.group(0) if m else parts[-1]


def _layout(path: str, spec: str) -> tuple[str, dict[str, tuple[str, list[str]]]]:
    """("disk" | "parquet", {split name: (its folder, its files relative to ``path``)})."""
    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        try:
            with open(os.path.join(path, "dataset_dict.json")) as f:
                names = json.load(f)["splits"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SourceError(f"{spec}: unreadable {path}/dataset_dict.json ({e!r}); save it again") from e
        return "disk", {
            n: (d := os.path.join(path, n), [os.path.join(n, f) for f in _files_under(d, "")]) for n in names
        }
    if os.path.isfile(os.path.join(path, "state.json")):
        return "disk", {"train": (path, _files_under(path, ""))}  # one Dataset: the train split
    parquet: dict[str, tuple[str, list[str]]] = {}
    for rel in _files_under(path, ".parquet"):
        parquet.setdefault(_parquet_split(rel), (path, []))[1].append(rel)
    if parquet:
        return "parquet", parquet
    raise SourceError(
        f"{spec}: {path} is not a Hugging Face dataset on disk: no dataset_dict.json or state.json (save_to_disk) "
        "and no .parquet files"
    )


def _pick_split(split: str, splits: list[str], opts: dict[str, str], spec: str) -> str:
    if split == "train":
        want = [opts.get("train", "train")]
    elif split in ("test", "val"):
        want = [opts["test"]] if "test" in opts else ["test", "validation", "val"]
    else:
        raise SourceError(f"{spec}: kdlib reads splits 'train' and 'test' (named with ?train=/?test=), not {split!r}")
    for name in want:
        if name in splits:
            return name
    which = "?train=NAME" if split == "train" else "?test=NAME"
    raise SourceError(f"{spec} has no split {want[0]!r} (its splits: {splits}); name the {split} split with {which}")


class HFSource(Source):
    """A ``datasets`` dataset on disk (see the module docstring)."""

    def __init__(self, spec: str, split: str = "train", index_dirs: tuple[str, ...] = ()):
        body, opts = spec_options(spec, "hf", ("image", "label", "train", "test"))
        path = os.path.abspath(os.path.expanduser(body))
        if not os.path.isdir(path):
            what = "does not exist" if not os.path.exists(path) else "is not a folder"
            raise SourceError(f"{spec}: {path} {what}; give a save_to_disk folder or a folder of parquet files")
        self.spec = spec
        self._kind, splits = _layout(path, spec)
        self._split_name = _pick_split(split, list(splits), opts, spec)
        self._folder, self._files = splits[self._split_name]
        self._image_col = opts.get("image", "image")
        self._label_col = opts.get("label", "label")
        entries = [[f, (st := os.stat(os.path.join(path, f))).st_size, st.st_mtime_ns] for f in self._files]
        self.listing_digest = _listing_digest(_INDEX_TAG, [self._image_col, self._label_col, entries])
        self._path = path
        self._index_dirs = tuple(index_dirs)
        self._table = None
        ds = self._dataset()
        features = ds.features
        if self._image_col not in features or not isinstance(features[self._image_col], _datasets().Image):
            kind = "is not an Image feature" if self._image_col in features else "is missing"
            raise SourceError(f"{spec}: split {self._split_name!r} has no image column {self._image_col!r} ({kind}; "
                              f"its columns: {list(features)}): name it with ?image=COLUMN")  # fmt: skip
        if self._label_col not in features:
            raise SourceError(f"{spec}: split {self._split_name!r} has no label column {self._label_col!r} (its "
                              f"columns: {list(features)}): name it with ?label=COLUMN")  # fmt: skip
        labels = ds.data.table.column(self._label_col)
        if labels.null_count or not str(labels.type).startswith(("int", "uint")):
            raise SourceError(f"{spec}: label column {self._label_col!r} of split {self._split_name!r} must hold "
                              f"integers without gaps, it is {labels.type} with {labels.null_count} nulls")  # fmt: skip
        self._labels = labels.to_numpy().astype(np.int64)
        if len(self._labels) == 0:
            raise SourceError(f"{spec}: split {self._split_name!r} is empty")
        if self._labels.max() > _MAX_CLASS_ID:  # plain ids: the classes are 0..max, one entry each
            raise SourceError(f"{spec}: split {self._split_name!r} has label {self._labels.max()} (row "
                              f"{int(self._labels.argmax())}), above {_MAX_CLASS_ID}: class ids run 0..N-1 for N "
                              "classes")  # fmt: skip
        if self._labels.min() < 0:
            raise SourceError(f"{spec}: split {self._split_name!r} has label {self._labels.min()} (unlabelled "
                              "rows?): every row needs a class id >= 0")  # fmt: skip
        feature = features[self._label_col]
        own = list(feature.names) if isinstance(feature, _datasets().ClassLabel) else None
        if split == "train":
            classes = own or [str(i) for i in range(int(self._labels.max()) + 1)]
        else:
            classes = HFSource(spec, "train", index_dirs).classes
            if own is not None and own != classes:
                raise SourceError(f"{spec}: split {self._split_name!r} has classes {own[:5]}..., the train split "
                                  f"{classes[:5]}...: its labels would not mean the student's classes")  # fmt: skip
        if self._labels.max() >= len(classes):
            raise SourceError(f"{spec}: split {self._split_name!r} has label {self._labels.max()}, outside the "
                              f"{len(classes)} classes")  # fmt: skip
        super().__init__("hf", self._split_name, path, classes, 3)
        self.split = split  # kdlib's name of the split
        self._sizes: np.ndarray | None = None
        self._table = ds.data.table.column(self._image_col)  # memory-mapped: nothing is read yet

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_table": None}  # workers reopen the memory-mapped files

    def _dataset(self):
        datasets = _datasets()
        try:
            if self._kind == "disk":
                ds = datasets.load_from_disk(self._folder)
            else:
                cache = _index_cache_dir()
                ds = datasets.Dataset.from_parquet(
                    [os.path.join(self._path, f) for f in self._files],
                    cache_dir=os.path.join(cache, "hf") if cache else None,
                )
        except Exception as e:  # datasets raises FileNotFoundError, ValueError, ArrowInvalid, ...
            raise SourceError(f"{self.spec}: cannot load split {self._split_name!r}: {type(e).__name__}: {e}") from e
        if not isinstance(ds, datasets.Dataset):
            raise SourceError(f"{self.spec}: split {self._split_name!r} is not one dataset ({type(ds).__name__})")
        return ds

    def _images(self):
        if self._table is None:
            self._table = self._dataset().data.table.column(self._image_col)
        return self._table

    def _index_name(self) -> str:
        return f"{self.listing_digest[:32]}.npz"

    def _load_index(self) -> np.ndarray | None:
        paths = [os.path.join(d, self._index_name()) for d in (*self._index_dirs, _index_cache_dir()) if d]
        index = _load_npz(paths, self.listing_digest)
        if index is None or index["sizes"].shape != (len(self), 2):
            return None
        if "mean" in index and self._mean_std is None:
            self._mean_std = (index["mean"].tolist(), index["std"].tolist())
        return index["sizes"].astype(np.int32)

    def save_index(self, directory: str | None = None) -> str | None:
        """Write the size index (and the pixel mean/std) into ``directory`` (default: the user cache)."""
        directory = directory or _index_cache_dir()
        if directory is None:
            return None
        mean, std = self.mean_std()
        arrays = {"listing": np.array(self.listing_digest), "sizes": self.sizes(), "mean": np.array(mean),
                  "std": np.array(std)}  # fmt: skip
        return _save_npz(os.path.join(directory, self._index_name()), **arrays)

    def __len__(self) -> int:
        return len(self._labels)

    def labels(self) -> np.ndarray:
        return self._labels.copy()

    def sizes(self) -> np.ndarray:
        if self._sizes is None:
            self._sizes = self._load_index()
        if self._sizes is None:
            sizes = np.empty((len(self), 2), np.int32)
            for i in range(len(self)):
                head = self._encoded(i, _HEAD_BYTES)
                size = _header_size_of(io.BytesIO(head))
                sizes[i] = size if size is not None else _size_of_bytes(self._encoded(i), self._where(i), _FORMATS)
            self._sizes = sizes
            if (cache := _index_cache_dir()) is not None:
                _save_npz(os.path.join(cache, self._index_name()), listing=np.array(self.listing_digest), sizes=sizes)
        return self._sizes.copy()

    def mean_std(self) -> tuple[list[float], list[float]]:
        if self._mean_std is None and self._sizes is None:
            self._sizes = self._load_index()  # an index also holds the statistics
        return super().mean_std()

    def _where(self, i: int) -> str:
        return f"{self._path} split {self._split_name!r} row {i}"

    def _encoded(self, i: int, limit: int | None = None) -> bytes:
        """The stored encoded bytes of row ``i`` (its first ``limit`` bytes).

        A cell holding only a path is refused: the path would be opened relative to wherever kdlib runs,
        and the file is outside the listing that keys the index and the store (a changed file, a stale store)."""
        cell = self._images()[i]
        data = cell["bytes"]
        if data.is_valid:
            buf = data.as_buffer()
            return (buf if limit is None else buf.slice(0, min(limit, buf.size))).to_pybytes()
        path = cell["path"].as_py()
        holds = f"only a path ({path!r}), not the image's bytes" if path else "neither bytes nor a path"
        raise SourceError(
            f"{self._where(i)}: the image cell holds {holds}; kdlib reads images stored in the dataset: load it, "
            f"cast_column({self._image_col!r}, Image(decode=True)) and save_to_disk (which embeds the files)"
        )

    def decode_image(self, i: int, scale: int = 1) -> tuple[Image.Image, int]:
        j = self._check_id(i)
        return _decode_rgb(io.BytesIO(self._encoded(j)), self._where(j), scale, _FORMATS)

    def decode(self, i: int) -> np.ndarray:
        return np.ascontiguousarray(np.asarray(self.decode_image(i)[0]).transpose(2, 0, 1))

    def decode_draft(self, i: int, scale: int) -> tuple[np.ndarray, int]:
        im, applied = self.decode_image(i, scale)
        return np.ascontiguousarray(np.asarray(im).transpose(2, 0, 1)), applied

    def _content(self, i: int) -> bytes:
        return self._encoded(i)  # the stored encoded image, as an ImageFolder's file
