"""Webdataset tar shards as a source: ``wds:PATTERN[?test=PATTERN]``, random access through a member index.

A shard is a tar whose members are grouped into samples by key (the member name up to the first dot of
its base name, as webdataset does; extensions compared lower-cased): ``KEY.jpg|.jpeg|.png`` is the image
(PNG or JPEG bytes), ``KEY.cls`` holds the class id as text, or ``KEY.json`` holds ``{"label": id}`` (and
optionally ``"class_name"``); other members are ignored. Images are numbered in pattern order, then in
tar order. A member name that is not UTF-8 is kept as the tar's bytes.

The pattern is brace-expanded as webdataset's braceexpand does (``train-{000000..001281}.tar``, ``{a,b}``,
nested lists, padding to the wider end of a range; ``expand_braces``) or, if it
holds ``*`` ``?`` ``[``, globbed; local paths and fsspec URLs (``s3://...``, opened with the options of
``--storage-options``) alike. The test split is named by ``?test=PATTERN``; a test pattern without a
``/`` is in the train pattern's folder. Classes come from the train split: ``class_name`` where the
``.json`` members give it, else the class ids; the test split uses the train split's classes.

The member index (for every image: shard, tar offsets, byte count, label, height and width) is built
once by reading the tar headers, and kept, like an ImageFolder's size index, keyed by the shard listing
(base names, byte counts, modification stamps): in the store that planned with it and in
``$KDLIB_INDEX_CACHE``. An image is then one ranged read of its tar header and bytes; the header's name
is checked against the index, and a read that comes back short refused, so a shard changed behind the
index is refused, never read as another image or as part of one.
"""

from __future__ import annotations

import glob as globlib
import io
import itertools
import json
import os
import re
import string
import tarfile
from concurrent.futures import ThreadPoolExecutor

import fsspec
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
    storage_options,
)

__all__ = ["WdsSource", "expand_braces"]

_INDEX_TAG = b"kdlib-wds-index-1\0"  # bump if what the index holds changes
_IMAGE_EXTS = ("jpg", "jpeg", "png")
_HEAD_BYTES = 65536  # enough for a JPEG's frame header behind its EXIF block; else the whole member is read
_MAX_CLASS_ID = 10_000_000  # ImageNet-21k has 21841 classes; a larger id is a corrupt label
_FORMATS = ("PNG", "JPEG")  # what a tar's image members may be (Pillow's format names)
# braceexpand 0.1.7's grammar (webdataset expands shard patterns with it; kdlib does not import it)
_INT_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.-?(\d+))?$")
_CHAR_RANGE = re.compile(r"^([A-Za-z])\.\.([A-Za-z])(?:\.\.-?(\d+))?$")
_LETTERS = string.ascii_uppercase + string.ascii_lowercase
_ESCAPED = re.compile(r"\\(.)")


def expand_braces(pattern: str) -> list[str]:
    """Every name of a brace pattern, as webdataset's braceexpand (0.1.7) gives them, in its order:
    ``{x,y}``, nested ``{a,{b,c}}``, ranges ``{000..099}`` (a leading zero on either end pads every
    number to the wider end), ``{a..e}``, steps ``{0..10..2}``, ``\\{`` for a literal brace. A brace
    that is not a range or a list stays literal; unbalanced braces are refused."""
    return [_ESCAPED.sub(r"\1", s) for s in _expand(pattern)]


def _expand(pattern: str) -> list[str]:
    """braceexpand's parse_pattern: the pattern's literal runs and top-level brace groups, multiplied out
    (escapes kept: they are removed once, from the finished names)."""
    parts: list[list[str]] = []
    start = depth = pos = 0
    while pos < len(pattern):
        c = pattern[pos]
        if c == "\\":
            pos += 2
            continue
        if c == "{":
            if depth == 0 and pos > start:
                parts.append([pattern[start:pos]])
                start = pos
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                body = pattern[start + 1 : pos]
                items = _brace_items(body)
                parts += [["{"], _expand(body), ["}"]] if items is None else [items]
                start = pos + 1
        pos += 1
    if depth != 0:
        raise SourceError(
            f"unbalanced braces in {pattern!r}: every {{ needs its }} (a literal brace is written \\{{ or \\}})"
        )
    if start < pos:
        parts.append([pattern[start:]])
    return ["".join(p) for p in itertools.product(*parts)]


def _brace_items(body: str) -> list[str] | None:
    """The names one brace group stands for: a number or letter range, else a comma list; None if neither."""
    if m := _INT_RANGE.match(body):
        first, last, step = m.groups()
        padded = any(s.startswith(("0", "-0")) for s in (first, last) if s not in ("0", "-0"))
        width = max(len(first), len(last)) if padded else 0
        a, b, n = int(first), int(last), (int(step) or 1) if step else 1
        return [f"{i:0{width}d}" for i in (range(a, b + 1, n) if a < b else range(a, b - 1, -n))]
    if m := _CHAR_RANGE.match(body):
        first, last, step = m.groups()
        a, b, n = _LETTERS.index(first), _LETTERS.index(last), (int(step) or 1) if step else 1
        return list(_LETTERS[a : b + 1 : n] if a < b else _LETTERS[a : (b or -len(_LETTERS)) - 1 : -n])
    items: list[str] = []
    start = depth = pos = 0
    commas = False
    while pos < len(body):
        c = body[pos]
        if c == "\\":
            pos += 2
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
        elif c == "," and depth == 0:
            items += _expand(body[start:pos])
            start, commas = pos + 1, True
        pos += 1
    if depth != 0 or not commas:
        return None
    return items + _expand(body[start:])


def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _local(path: str) -> str:
    return os.path.expanduser(path[len("file://") :] if path.startswith("file://") else path)


class _Shards:
    """The shard URLs of one split, and byte reads from them; the fsspec filesystem is made per process
    (one made before a fork must not be used after it) and never pickled."""

    _OPEN_FILES = 64  # local shards kept open per process (a worker reads across all of them)

    def __init__(self, urls: list[str]):
        self.urls = urls
        self._fs: tuple[int, object] | None = None
        self._fds: dict[int, int] = {}
        self._fds_pid = os.getpid()
        self._paths: dict[str, str] = {}  # url -> the path in its filesystem: worked out once, not per image

    def __getstate__(self) -> dict:
        return {"urls": self.urls, "_fs": None, "_fds": {}, "_fds_pid": -1, "_paths": self._paths}

    def __del__(self) -> None:
        if getattr(self, "_fds_pid", -1) == os.getpid():
            for fd in self._fds.values():
                os.close(fd)

    def _fd(self, i: int) -> int:
        """An open descriptor of local shard ``i``: read with pread (positional), so a forked worker
        sharing it moves no offset of another's."""
        if self._fds_pid != os.getpid():
            self._fds, self._fds_pid = {}, os.getpid()  # the parent's stay the parent's to close
        fd = self._fds.pop(i, None)
        if fd is None:
            if len(self._fds) >= self._OPEN_FILES:
                os.close(self._fds.pop(next(iter(self._fds))))  # the least recently used
            fd = os.open(_local(self.urls[i]), os.O_RDONLY)
        self._fds[i] = fd  # most recently used last
        return fd

    def fs(self, url: str):
        if self._fs is None or self._fs[0] != os.getpid():
            self._fs = (os.getpid(), fsspec.core.url_to_fs(url, **storage_options())[0])
        return self._fs[1]

    def path(self, url: str) -> str:
        if url not in self._paths:
            self._paths[url] = fsspec.core.url_to_fs(url, **storage_options())[1] if _is_url(url) else _local(url)
        return self._paths[url]

    def open(self, i: int):
        url = self.urls[i]
        if _is_url(url):
            return self.fs(url).open(self.path(url), "rb", block_size=8 << 20)
        return open(_local(url), "rb")

    def read(self, i: int, start: int, end: int) -> bytes:
        url = self.urls[i]
        try:
            if _is_url(url):
                return self.fs(url).cat_file(self.path(url), start=start, end=end)
            return os.pread(self._fd(i), end - start, start)
        except Exception as e:  # OSError locally; botocore / aiohttp errors from object stores
            if _is_url(url) and 0 <= self._size(url) <= start:  # (-1: the store cannot be reached: say so)
                return b""  # an object store refuses a range past the end (HTTP 416): none of its bytes are there
            raise SourceError(f"cannot read wds shard {url} (bytes {start}..{end}): {type(e).__name__}: {e}") from e

    def _size(self, url: str) -> int:
        """The object's size now, not as listed when opened (-1 if that cannot be read either)."""
        try:
            fs, path = self.fs(url), self.path(url)
            fs.invalidate_cache(path)
            return int(fs.size(path))
        except Exception:
            return -1


def _resolve(pattern: str, base: str) -> str:
    """A test pattern without a '/' lives in the train pattern's folder."""
    if "/" in pattern or "/" not in base:
        return pattern
    return base.rsplit("/", 1)[0] + "/" + pattern


def _remote_infos(urls: list[str], spec: str) -> dict[str, dict | None]:
    """fsspec info of every URL (None: absent), from one listing per folder (1282 shards: 2 requests, not
    1282), or one request per URL where the folder cannot be listed."""
    fs, _ = fsspec.core.url_to_fs(urls[0], **storage_options())
    paths = {u: fsspec.core.url_to_fs(u, **storage_options())[1] for u in urls}
    folders: dict[str, dict[str, dict]] = {}
    out: dict[str, dict | None] = {}
    for url, path in paths.items():
        parent = path.rsplit("/", 1)[0]
        try:
            if parent not in folders:
                folders[parent] = {i["name"].rstrip("/"): i for i in fs.ls(parent, detail=True)}
            out[url] = folders[parent].get(path)
        except FileNotFoundError:
            out[url] = None
        except PermissionError:  # may read objects but not list them
            try:
                out[url] = fs.info(path)
            except FileNotFoundError:
                out[url] = None
        except Exception as e:  # credentials, endpoint, bucket: one line naming the URL
            raise SourceError(f"{spec}: cannot list wds shard {url}: {type(e).__name__}: {e}") from e
    return out


_BUCKET_STORES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "oss", "r2")  # the path's first part: a bucket


def _refuse_missing_bucket(url: str, spec: str) -> None:
    """One line naming the bucket of object-store URL ``url`` if that bucket does not exist; else nothing."""
    protocol = url.split("://", 1)[0]
    if protocol not in _BUCKET_STORES:
        return
    try:
        fs, path = fsspec.core.url_to_fs(url, **storage_options())
        bucket = path.split("/", 1)[0]
        exists = fs.exists(bucket)
    except Exception:  # cannot tell: the caller's own error says what was not found
        return
    if not exists:
        raise SourceError(f"{spec}: bucket {bucket!r} ({protocol}://{bucket}) does not exist (or these credentials "
                          "cannot see it): check the bucket name in the pattern and the endpoint in "
                          "--storage-options")  # fmt: skip


def _list_shards(pattern: str, spec: str, split: str) -> tuple[list[str], list]:
    """The shard URLs of ``pattern`` in order, and their listing entries (base name, bytes, stamp)."""
    named: list[str] = []
    try:
        pieces = expand_braces(pattern)
    except SourceError as e:
        raise SourceError(f"{spec}: the {split} pattern has {e}") from e
    for piece in pieces:
        if not any(c in piece for c in "*?["):
            named.append(piece)
            continue
        try:  # a glob: its matches, sorted
            if _is_url(piece):
                fs, path = fsspec.core.url_to_fs(piece, **storage_options())
                protocol = piece.split("://", 1)[0]
                named += [f"{protocol}://{p}" for p in sorted(fs.glob(path)) if not fs.isdir(p)]
            else:
                named += [p for p in sorted(globlib.glob(_local(piece))) if os.path.isfile(p)]
        except Exception as e:
            _refuse_missing_bucket(piece, spec)
            raise SourceError(f"{spec}: cannot list wds shards {piece}: {type(e).__name__}: {e}") from e
    remote = [u for u in named if _is_url(u)]
    infos = _remote_infos(remote, spec) if remote else {}
    urls: list[str] = []
    entries: list = []
    missing: list[str] = []
    for url in named:
        if _is_url(url):
            info = infos[url]
            if info is None or info.get("type") == "directory":
                missing.append(url)
                continue
            stamp = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
            urls.append(url)
            entries.append([url.rsplit("/", 1)[-1], int(info["size"]), str(stamp)])
        else:
            local = _local(url)
            try:
                st = os.stat(local)
            except FileNotFoundError:
                missing.append(local)
                continue
            urls.append(os.path.abspath(local))
            entries.append([os.path.basename(local), st.st_size, st.st_mtime_ns])
    if not urls:  # nothing found: on an object store, is the bucket there at all?
        _refuse_missing_bucket((missing or pieces)[0], spec)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise SourceError(f"{spec}: the {split} pattern {pattern!r} names shard {missing[0]}{more}, which does "
                          "not exist; check the pattern")  # fmt: skip
    if not urls:
        raise SourceError(f"{spec}: the {split} pattern {pattern!r} matches no file; check the pattern")
    return urls, entries


def _key_ext(name: str) -> tuple[str, str] | None:
    """webdataset's split of a member name into sample key and extension (at the base name's first dot)."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot <= slash:
        return None  # no extension, or a hidden file: not part of a sample
    return name[:dot], name[dot + 1 :]


def _label_of(data: bytes, ext: str, where: str) -> tuple[int, str | None]:
    """(class id, class name or None) from a ``.cls`` or ``.json`` member."""
    try:
        obj = int(data.decode().strip()) if ext == "cls" else json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise SourceError(f"{where}: not a class id ({e}): a .cls member holds the class id as text") from e
    label = obj if ext == "cls" else obj.get("label") if isinstance(obj, dict) else None
    if not isinstance(label, int) or isinstance(label, bool):
        raise SourceError(f'{where}: no integer "label" in this .json member (it holds {str(obj)[:80]})')
    if label > _MAX_CLASS_ID:  # the class list has max + 1 entries: a stray id must not exhaust memory
        raise SourceError(f"{where}: class id {label} is above {_MAX_CLASS_ID}: class ids run 0..N-1 for N classes")
    name = obj.get("class_name") if isinstance(obj, dict) else None
    return label, name if isinstance(name, str) else None


def _scan_shard(shards: _Shards, i: int) -> list[dict]:
    """Every sample of shard ``i``, in tar order: its image member (name, header and data offsets, bytes,
    height, width), label and class name. Reads the tar headers, the label members and each image's head."""
    url = shards.urls[i]
    samples: dict[str, dict] = {}
    try:
        with shards.open(i) as f, tarfile.open(fileobj=f, mode="r:") as tf:
            while (ti := tf.next()) is not None:
                if not ti.isfile() or (ke := _key_ext(ti.name)) is None:
                    continue
                key, ext = ke[0], ke[1].lower()  # webdataset lowercases extensions: .PNG, .CLS, .JSON
                s = samples.setdefault(key, {"others": []})
                where = f"wds shard {url}: member {ti.name!r}"
                if ext in _IMAGE_EXTS:
                    if "image" in s:
                        raise SourceError(f"{where}: sample {key!r} has a second image ({s['image'][0]}); keep one")
                    f.seek(ti.offset_data)
                    head = f.read(min(ti.size, _HEAD_BYTES))
                    size = _header_size_of(io.BytesIO(head)) if len(head) else None
                    if size is None:
                        f.seek(ti.offset_data)
                        size = _size_of_bytes(f.read(ti.size), where, _FORMATS)
                    s["image"] = (ti.name, ti.offset, ti.offset_data, ti.size, *size)
                elif ext in ("cls", "json"):
                    label, name = _label_of(tf.extractfile(ti).read(), ext, where)
                    if ext == "cls" or "label" not in s:  # .cls names the id when both are there
                        s["label"] = label
                    s["name"] = name if name is not None else s.get("name")
                else:
                    s["others"].append(ti.name)
    except SourceError:
        raise
    except (tarfile.TarError, EOFError, OSError) as e:
        raise SourceError(f"cannot read wds shard {url} as a tar: {type(e).__name__}: {e}") from e
    out = []
    for key, s in samples.items():
        if "image" not in s:
            has = [m for m in s["others"]] + ([f"{key}.cls/.json"] if "label" in s else [])
            raise SourceError(f"wds shard {url}: sample {key!r} has no .jpg/.jpeg/.png member (it has {has}); "
                              "kdlib reads those image members")  # fmt: skip
        if "label" not in s:
            raise SourceError(f"wds shard {url}: sample {key!r} ({s['image'][0]}) has no label: add {key}.cls "
                              f'(the class id as text) or {key}.json with {{"label": id}}')  # fmt: skip
        out.append(s)
    return out


def _build_index(shards: _Shards, spec: str) -> dict[str, np.ndarray]:
    with ThreadPoolExecutor(min(16, len(shards.urls))) as pool:  # object stores: overlap the waits
        per_shard = list(pool.map(lambda i: _scan_shard(shards, i), range(len(shards.urls))))
    rows = [(i, s) for i, samples in enumerate(per_shard) for s in samples]
    if not rows:
        raise SourceError(f"{spec}: its shards hold no samples")
    labels = np.array([s["label"] for _, s in rows], np.int64)
    if labels.min() < 0:
        bad = next(s for _, s in rows if s["label"] < 0)
        raise SourceError(f"{spec}: sample {bad['image'][0]} has label {bad['label']}: class ids start at 0")
    names = [""] * int(labels.max() + 1)
    for i, s in rows:
        name = s.get("name")
        if name is not None:
            if names[s["label"]] not in ("", name):
                raise SourceError(f"{spec}: class {s['label']} is named both {names[s['label']]!r} and {name!r} "
                                  f"(shard {shards.urls[i]}, {s['image'][0]}); give one name per class")  # fmt: skip
            names[s["label"]] = name
    return {
        "shard": np.array([i for i, _ in rows], np.int32),
        # the name's bytes as the tar holds them (tarfile decodes with surrogateescape: any bytes round-trip)
        "member": np.array([s["image"][0].encode(tarfile.ENCODING, "surrogateescape") for _, s in rows], np.bytes_),
        "offset": np.array([s["image"][1] for _, s in rows], np.int64),
        "data_offset": np.array([s["image"][2] for _, s in rows], np.int64),
        "length": np.array([s["image"][3] for _, s in rows], np.int64),
        "sizes": np.array([s["image"][4:6] for _, s in rows], np.int32).reshape(-1, 2),
        "labels": labels,
        "class_names": np.array(names, dtype=np.str_),
    }


def _plain_header(block: bytes) -> tarfile.TarInfo:
    """Name and size of a ustar/gnu header block, read from their fields (the reader's full parse costs more
    than decoding a small PNG); a block that is no header gives a name and size that match nothing."""
    if block[124] & 0x80:  # a base-256 size (over 8 GiB): the full parse
        ti = tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
    else:
        name = block[:100].split(b"\0", 1)[0]
        if block[257:262] == b"ustar" and block[345]:  # a long name split into prefix/name
            name = block[345:500].split(b"\0", 1)[0] + b"/" + name
        ti = tarfile.TarInfo(name.decode(tarfile.ENCODING, "surrogateescape"))
        try:
            ti.size = int(block[124:136].strip(b"\0 ") or b"0", 8)
        except ValueError:
            ti.size = -1
    ti.offset_data = tarfile.BLOCKSIZE
    return ti


class WdsSource(Source):
    """Webdataset tar shards, indexed by member (see the module docstring)."""

    def __init__(self, spec: str, split: str = "train", index_dirs: tuple[str, ...] = ()):
        pattern, opts = spec_options(spec, "wds", ("test",))
        if split == "train":
            chosen = pattern
        elif split in ("test", "val"):
            if "test" not in opts:
                raise SourceError(f"{spec} has no test split: name its shards with ?test=PATTERN")
            chosen = _resolve(opts["test"], pattern)
        else:
            raise SourceError(f"{spec}: wds sources have splits 'train' and 'test', not {split!r}")
        self.spec = spec
        urls, entries = _list_shards(chosen, spec, "train" if split == "train" else "test")
        self._shards = _Shards(urls)
        self.listing_digest = _listing_digest(_INDEX_TAG, entries)
        self._index_dirs = tuple(index_dirs)
        index = _load_npz(self._index_paths(), self.listing_digest)
        mean_std = None
        if index is None:
            index = _build_index(self._shards, spec)
            index["listing"] = np.array(self.listing_digest)
            if (cache := _index_cache_dir()) is not None:  # built once: tars are read end to end to build it
                _save_npz(os.path.join(cache, self._index_name()), **index)
        elif "mean" in index:
            mean_std = (index["mean"].tolist(), index["std"].tolist())
        self._index = {k: v for k, v in index.items() if k not in ("listing", "mean", "std")}
        labels = self._index["labels"]
        if split == "train":
            classes = [n or str(i) for i, n in enumerate(self._index["class_names"].tolist())]
        else:
            classes = WdsSource(spec, "train", index_dirs).classes  # the student's classes are the train split's
            self._check_test_classes(classes, labels)
        super().__init__("wds", split, chosen, classes, 3)
        self._mean_std = mean_std

    def _check_test_classes(self, classes: list[str], labels: np.ndarray) -> None:
        if labels.max() >= len(classes):
            raise SourceError(f"{self.spec}: the test split has label {labels.max()}, the train split only "
                              f"{len(classes)} classes")  # fmt: skip
        for i, name in enumerate(self._index["class_names"].tolist()):
            if name and name != classes[i]:
                raise SourceError(f"{self.spec}: the test split names class {i} {name!r}, the train split "
                                  f"{classes[i]!r}: its labels would not mean the student's classes")  # fmt: skip

    def _index_name(self) -> str:
        return f"{self.listing_digest[:32]}.npz"

    def _index_paths(self) -> list[str]:
        return [os.path.join(d, self._index_name()) for d in (*self._index_dirs, _index_cache_dir()) if d]

    def save_index(self, directory: str | None = None) -> str | None:
        """Write the member index (and the pixel mean/std) into ``directory`` (default: the user cache)."""
        directory = directory or _index_cache_dir()
        if directory is None:
            return None
        mean, std = self.mean_std()
        arrays = {**self._index, "listing": np.array(self.listing_digest), "mean": np.array(mean), "std": np.array(std)}
        return _save_npz(os.path.join(directory, self._index_name()), **arrays)

    def __len__(self) -> int:
        return len(self._index["labels"])

    def sizes(self) -> np.ndarray:
        return self._index["sizes"].copy()

    def labels(self) -> np.ndarray:
        return self._index["labels"].copy()

    def _names(self) -> list[str]:
        base = [u.rsplit("/", 1)[-1] for u in self._shards.urls]  # where the shards live is not hashed
        members = [m.decode(tarfile.ENCODING, "surrogateescape") for m in self._index["member"]]
        return [f"{base[s]}/{m}" for s, m in zip(self._index["shard"].tolist(), members)]

    def member_bytes(self, i: int) -> bytes:
        """The encoded bytes of image ``i``: one ranged read of its tar header and data, the name checked."""
        j = self._check_id(i)
        shard, start = int(self._index["shard"][j]), int(self._index["offset"][j])
        data_at, length = int(self._index["data_offset"][j]), int(self._index["length"][j])
        member = self._index["member"][j].decode(tarfile.ENCODING, "surrogateescape")
        url = self._shards.urls[shard]
        blob = self._shards.read(shard, start, data_at + length)
        if len(blob) < data_at + length - start:  # the shard ends before the indexed member does
            raise SourceError(
                f"wds shard {url}: got {len(blob)} of {data_at + length - start} bytes at byte {start} ({member!r}): "
                "the shard changed since its index was built: rebuild the index or restore the shard"
            )
        try:
            if data_at - start == tarfile.BLOCKSIZE:  # one plain header block: its name and size fields suffice
                ti = _plain_header(blob[: tarfile.BLOCKSIZE])
            else:  # extended headers (long names, pax) before it: the tar reader resolves them
                with tarfile.open(fileobj=io.BytesIO(blob), mode="r:") as tf:
                    ti = tf.firstmember
        except (tarfile.TarError, EOFError) as e:
            ti, err = None, f"no tar header there ({e})"
        else:
            err = "" if ti is None else f"it holds {ti.name!r} ({ti.size} bytes)"
        if ti is None or ti.name != member or ti.size != length or ti.offset_data != data_at - start:
            raise SourceError(
                f"wds shard {url} changed since its index was built: at byte {start} {err or 'nothing'}, the index "
                f"names {member!r} ({length} bytes); rebuild the index (KDLIB_INDEX_CACHE, the store's index/) or "
                "restore the shard"
            )
        return blob[data_at - start :]

    def decode_image(self, i: int, scale: int = 1) -> tuple[Image.Image, int]:
        j = self._check_id(i)
        member = self._index["member"][j].decode(tarfile.ENCODING, "surrogateescape")
        where = f"{self._shards.urls[int(self._index['shard'][j])]}:{member!r}"
        return _decode_rgb(io.BytesIO(self.member_bytes(j)), where, scale, _FORMATS)

    def decode(self, i: int) -> np.ndarray:
        return np.ascontiguousarray(np.asarray(self.decode_image(i)[0]).transpose(2, 0, 1))

    def decode_draft(self, i: int, scale: int) -> tuple[np.ndarray, int]:
        im, applied = self.decode_image(i, scale)
        return np.ascontiguousarray(np.asarray(im).transpose(2, 0, 1)), applied

    def _content(self, i: int) -> bytes:
        return self.member_bytes(i)  # the encoded member, as an ImageFolder's file
