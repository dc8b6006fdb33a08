"""ImageFolder at scale and at its edges (issues 11 and 12): the size index (read once, kept, a changed
folder noticed, kept in the store), 16-bit PNGs, empty class folders, test classes from the train split."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

import kdlib.source as source_mod
from kdlib.errors import SourceError
from kdlib.source import ImageFolderSource, _header_size, open_source


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KDLIB_INDEX_CACHE", str(tmp_path / "index-cache"))


def _img(path, h=12, w=20, seed=0, **save):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, **save)


def test_header_reader_agrees_with_pil(tmp_path):
    rng = np.random.default_rng(1)
    cases = {
        "plain.jpg": {},
        "progressive.jpg": {"progressive": True},
        "exif.jpg": {"exif": b"Exif\0\0" + b"x" * 3000},
        "p.png": {},
    }
    for name, kw in cases.items():
        _img(tmp_path / name, 13, 37, **kw)
    Image.fromarray(rng.integers(0, 256, (9, 31, 4), dtype=np.uint8), "CMYK").save(tmp_path / "cmyk.jpg")
    Image.new("L", (5, 3)).save(tmp_path / "gray.jpg")
    for p in sorted(tmp_path.iterdir()):
        with Image.open(p) as im:
            assert _header_size(str(p)) == (im.size[1], im.size[0]), p.name


def test_sixteen_bit_png_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 16).round().astype(np.uint16).reshape(16, 64)
    path = tmp_path / "a" / "ramp.png"
    path.parent.mkdir()
    Image.fromarray(ramp).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I")  # what PIL gives for a 16-bit grayscale PNG
    x = open_source(str(tmp_path)).decode(0)
    want = np.round(ramp.astype(np.float64) * 255 / 65535)
    assert x.shape == (3, 16, 64) and (np.abs(x[0] - want) <= 0.5).all() and (x[0] == x[2]).all()
    assert x[0, 0, 0] == 0 and x[0, -1, -1] == 255 and abs(x.mean() - 127.5) < 1  # not 97 % white


def test_empty_class_folder_is_refused_by_name(tmp_path):
    _img(tmp_path / "cat" / "a.png")
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "notes.txt").write_text("no images here")
    with pytest.raises(SourceError, match=r"class folder .*dog has no .jpg/.jpeg/.png files"):
        open_source(str(tmp_path))


def test_test_split_classes_come_from_train_and_map_by_name(tmp_path):
    for c in ("a", "b", "c"):
        _img(tmp_path / "train" / c / "x.png")
    _img(tmp_path / "test" / "a" / "x.png")
    _img(tmp_path / "test" / "c" / "x.png")  # no b/ in test
    test = open_source(str(tmp_path), "test")
    assert test.classes == ["a", "b", "c"] and test.labels().tolist() == [0, 2]
    _img(tmp_path / "test" / "zebra" / "x.png")
    with pytest.raises(SourceError, match=r"\['zebra'\] are not classes of the training split"):
        open_source(str(tmp_path), "test")


def test_index_is_kept_and_a_changed_folder_is_noticed(tmp_path, monkeypatch):
    monkeypatch.setattr(source_mod, "_CACHE_MIN_FILES", 1)  # index even this small folder
    data = tmp_path / "data"
    for i in range(6):
        _img(data / f"c{i % 2}" / f"{i}.png", 10 + i, 20, seed=i)
    first = open_source(str(data))
    sizes = first.sizes()
    cached = list((tmp_path / "index-cache").glob("*.npz"))
    assert len(cached) == 1 and first.listing_digest[:32] in cached[0].name

    # same listing (names, bytes, mtimes): the index answers, no header is read
    victim = data / "c0" / "0.png"
    st = victim.stat()
    victim.write_bytes(b"\0" * st.st_size)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    again = open_source(str(data))
    assert again.listing_digest == first.listing_digest and (again.sizes() == sizes).all()

    # a touched file changes the listing: rescanned, and the damage is found
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(SourceError, match="0.png"):
        open_source(str(data)).sizes()
    _img(victim, 10, 20, seed=0)
    _img(data / "c1" / "new.png", 7, 9)  # an added file: another listing, its size included
    grown = open_source(str(data))
    assert grown.listing_digest != first.listing_digest and len(grown) == 7 and [7, 9] in grown.sizes().tolist()


def test_store_keeps_the_index_train_reads_it(tmp_path, monkeypatch):
    from kdlib.precompute import PrecomputeConfig, precompute
    from kdlib.store import open_store, open_store_source

    data = tmp_path / "data"
    for i in range(8):
        _img(data / f"c{i % 2}" / f"{i}.png", 30, 34, seed=i)
    (tmp_path / "r.yaml").write_text(
        "name: t\nsize: 16\ncrop: inception\nscale: [0.5, 1.0]\nflip: false\nmix: none\n"
        "images_per_group: 1\ncrops_per_image: 1\nseed: 0\n"
    )
    store = precompute(
        PrecomputeConfig(
            teacher="resnet8",
            data=str(data),
            out=str(tmp_path / "s"),
            recipe=str(tmp_path / "r.yaml"),
            k=2,
            workers=0,
            test=False,
        )
    )
    kept = list((tmp_path / "s" / "index").glob("*.npz"))
    assert len(kept) == 1
    monkeypatch.setenv("KDLIB_INDEX_CACHE", "off")
    src = open_store_source(open_store(store.url))
    assert isinstance(src, ImageFolderSource) and src._load_index() is not None
    # headers are no longer read: break one (same bytes count and mtime) and the store's index still answers
    victim = data / "c0" / "0.png"
    st = victim.stat()
    victim.write_bytes(b"\0" * st.st_size)
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert open_source(str(data), index_dirs=(str(tmp_path / "s" / "index"),)).sizes().tolist()[0] == [30, 34]


def test_threaded_scan_gives_the_same_sizes(tmp_path, monkeypatch):
    blobs = []
    for i in range(4):
        _img(tmp_path / f"b{i}.jpg", 10 + i, 30 - i)
        blobs.append((tmp_path / f"b{i}.jpg").read_bytes())
    paths = []
    for i in range(700):
        p = tmp_path / "many" / f"{i}.jpg"
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(blobs[i % 4])
        paths.append(str(p))
    want = np.array([[10 + i % 4, 30 - i % 4] for i in range(700)])
    assert (source_mod._read_sizes(paths) == want).all()
    monkeypatch.setattr(source_mod, "_FAST_FILES_PER_S", 1e12)  # as if the disk were slow: threads take over
    assert (source_mod._read_sizes(paths) == want).all()


def test_index_keeps_the_statistics(tmp_path, monkeypatch):
    monkeypatch.setattr(source_mod, "_CACHE_MIN_FILES", 1)
    data = tmp_path / "data"
    for i in range(4):
        _img(data / f"c{i % 2}" / f"{i}.png", 10, 12, seed=i)
    first = open_source(str(data))
    first.sizes()
    stats = first.mean_std()
    again = open_source(str(data))
    assert again.mean_std() == stats and again._sizes is not None  # from the index, no decode needed
