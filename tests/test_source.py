"""Tests for kdlib.source on real data: Fashion-MNIST from the Debian package, and ImageFolders
and .npz files written here with PIL and numpy."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import shutil

import numpy as np
import pytest
from conftest import FMNIST_DIR as FMNIST  # noqa: E402  (the Debian path, or KDLIB_DATA on a GPU machine)
from PIL import Image

from kdlib import source as source_mod
from kdlib.errors import SourceError
from kdlib.source import (
    FASHION_MNIST_CLASSES,
    FashionMNISTSource,
    ImageFolderSource,
    LimitedSource,
    NpzSource,
    open_source,
)

needs_fmnist = pytest.mark.skipif(
    not os.path.isfile(os.path.join(FMNIST, "t10k-images-idx3-ubyte.gz")),
    reason="apt-get install dataset-fashion-mnist",
)


@pytest.fixture(autouse=True)
def _suite_kdlib_data(monkeypatch):
    # A KDLIB_DATA from the caller's shell must not change what these tests open: the suite's folder.
    monkeypatch.setenv("KDLIB_DATA", FMNIST)


@pytest.fixture(scope="module")
def fmnist_test():
    return open_source("fashion-mnist", "test")


# ---------------------------------------------------------------- Fashion-MNIST


@needs_fmnist
def test_fashion_mnist_train_and_test():
    train = open_source("fashion-mnist", "train")
    assert isinstance(train, FashionMNISTSource)
    assert len(train) == 60000 and train.name == "fashion-mnist" and train.split == "train"
    assert train.channels == 1 and train.num_classes == 10 and train.classes == FASHION_MNIST_CLASSES
    labels = train.labels()
    assert labels.dtype == np.int64 and labels.shape == (60000,)
    assert labels.min() == 0 and labels.max() == 9 and np.bincount(labels).tolist() == [6000] * 10
    sizes = train.sizes()
    assert sizes.dtype == np.int32 and sizes.shape == (60000, 2) and (sizes == 28).all()
    image = train.decode(59999)
    assert image.shape == (1, 28, 28) and image.dtype == np.uint8 and image.flags.c_contiguous


@needs_fmnist
def test_fashion_mnist_test_split(fmnist_test):
    assert len(fmnist_test) == 10000 and fmnist_test.root == FMNIST
    labels = fmnist_test.labels()
    assert labels.min() == 0 and labels.max() == 9
    assert fmnist_test.decode(0).shape == (1, 28, 28)
    mean, std = fmnist_test.mean_std()
    assert len(mean) == len(std) == 1
    assert abs(mean[0] - 0.286) < 0.01 and abs(std[0] - 0.353) < 0.01  # the well-known values
    info = fmnist_test.describe()
    assert json.loads(json.dumps(info)) == info
    assert info["num_images"] == 10000 and info["channels"] == 1 and "limit" not in info
    with pytest.raises(SourceError, match="out of range"):
        fmnist_test.decode(10000)
    with pytest.raises(SourceError, match="splits"):
        open_source("fashion-mnist", "val")


@needs_fmnist
def test_fashion_mnist_fingerprint_stable_and_per_split(fmnist_test):
    again = open_source("fashion-mnist", "test")
    assert again.fingerprint() == fmnist_test.fingerprint()
    assert len(fmnist_test.fingerprint()) == 64
    assert open_source("fashion-mnist", "test", limit=100).fingerprint() != fmnist_test.fingerprint()


def _copy_test_idx(to_dir, images=True):
    os.makedirs(to_dir, exist_ok=True)
    names = ["t10k-labels-idx1-ubyte.gz"] + (["t10k-images-idx3-ubyte.gz"] if images else [])
    for name in names:
        shutil.copy(os.path.join(FMNIST, name), to_dir)


@needs_fmnist
def test_kdlib_data_dir_and_torchvision_root(tmp_path, monkeypatch, fmnist_test):
    flat = tmp_path / "flat"
    _copy_test_idx(flat)
    # Uncompressed files are read too (and preferred).
    with gzip.open(flat / "t10k-images-idx3-ubyte.gz") as f:
        (flat / "t10k-images-idx3-ubyte").write_bytes(f.read())
    monkeypatch.setenv("KDLIB_DATA", str(flat))
    src = open_source("fashion-mnist", "test")
    assert src.root == str(flat) and len(src) == 10000
    assert src.fingerprint() == fmnist_test.fingerprint()  # same data elsewhere: same fingerprint

    tv_root = tmp_path / "tv"
    _copy_test_idx(tv_root / "FashionMNIST" / "raw")
    monkeypatch.setenv("KDLIB_DATA", str(tv_root))
    assert open_source("fashion-mnist", "test").root == str(tv_root / "FashionMNIST" / "raw")


@needs_fmnist
def test_bad_idx_magic_and_truncation_name_the_file(tmp_path, monkeypatch):
    _copy_test_idx(tmp_path, images=False)
    bad = tmp_path / "t10k-images-idx3-ubyte"
    bad.write_bytes(b"\x00\x00\x08\x01" + b"\x00" * 100)
    monkeypatch.setenv("KDLIB_DATA", str(tmp_path))
    with pytest.raises(SourceError, match="magic") as err:
        open_source("fashion-mnist", "test")
    assert str(bad) in str(err.value)

    dims = (10000).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    bad.write_bytes(b"\x00\x00\x08\x03" + dims + b"\x00" * 500)  # right magic, far too few pixels
    with pytest.raises(SourceError, match="truncated") as err:
        open_source("fashion-mnist", "test")
    assert str(bad) in str(err.value)


def test_fashion_mnist_not_found_lists_places(tmp_path, monkeypatch):
    # Nothing on disk and a download that fails (the download itself is replaced: tests are offline).
    def offline(root, split):
        raise OSError("no network")

    monkeypatch.setattr(source_mod, "_SYSTEM_FASHION_MNIST", str(tmp_path / "system"))
    monkeypatch.setattr(source_mod, "_download_fashion_mnist", offline)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KDLIB_DATA", str(tmp_path / "env"))
    with pytest.raises(SourceError) as err:
        open_source("fashion-mnist")
    message = str(err.value)
    for place in ["env", "env/FashionMNIST/raw", "system", "home/.cache/kdlib/FashionMNIST/raw"]:
        assert str(tmp_path / place) in message
    assert "apt-get install dataset-fashion-mnist" in message and "KDLIB_DATA" in message
    assert "no network" in message


# ---------------------------------------------------------------- ImageFolder


def _write_folder(root):
    """cat: RGB JPEG + grayscale PNG in a subfolder; dog: RGBA PNG + palette PNG. Sizes all differ."""
    (root / "cat" / "sub").mkdir(parents=True)
    (root / "dog").mkdir(parents=True)
    (root / ".hidden").mkdir()
    Image.new("RGB", (30, 20), (200, 40, 10)).save(root / "cat" / "a.jpg", quality=95)
    Image.new("L", (9, 17), 77).save(root / "cat" / "sub" / "b.PNG")
    Image.new("RGBA", (12, 5), (1, 2, 3, 128)).save(root / "dog" / "c.png")
    palette = Image.new("P", (7, 11), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    palette.save(root / "dog" / "d.png")
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "dog" / "._d.png").write_bytes(b"macOS resource fork")
    Image.new("RGB", (4, 4)).save(root / ".hidden" / "x.png")


def test_image_folder_modes_sizes_and_pixels(tmp_path):
    _write_folder(tmp_path / "train")
    src = open_source(str(tmp_path), "train")
    assert isinstance(src, ImageFolderSource)
    assert src.classes == ["cat", "dog"] and src.channels == 3 and len(src) == 4
    assert src.root == str(tmp_path / "train")
    assert src.labels().tolist() == [0, 0, 1, 1]
    assert src.sizes().tolist() == [[20, 30], [17, 9], [5, 12], [11, 7]]
    images = [src.decode(i) for i in range(len(src))]
    for image, (h, w) in zip(images, src.sizes()):
        assert image.shape == (3, h, w) and image.dtype == np.uint8 and image.flags.c_contiguous
    assert np.abs(images[0].reshape(3, -1).mean(1) - [200, 40, 10]).max() < 3  # JPEG is lossy
    assert (images[1] == 77).all()
    assert (images[2].reshape(3, -1).T == [1, 2, 3]).all()  # alpha dropped
    assert (images[3].reshape(3, -1).T == [10, 20, 30]).all()  # palette looked up
    assert src.describe()["num_classes"] == 2


def test_image_folder_splits(tmp_path):
    _write_folder(tmp_path / "train")
    _write_folder(tmp_path / "val")
    assert open_source(str(tmp_path), "test").root == str(tmp_path / "val")
    plain = tmp_path / "train"
    assert open_source(str(plain), "train").root == str(plain)  # no train/: the folder itself
    with pytest.raises(SourceError, match="test"):
        open_source(str(plain), "test")
    only_val = tmp_path / "only_val"
    _write_folder(only_val / "val")
    with pytest.raises(SourceError, match="no train/"):
        open_source(str(only_val), "train")


def test_image_folder_empty(tmp_path):
    with pytest.raises(SourceError) as err:
        open_source(str(tmp_path))
    assert str(tmp_path) in str(err.value)
    (tmp_path / "cat").mkdir()
    with pytest.raises(SourceError, match="no .jpg"):
        open_source(str(tmp_path))


def test_image_folder_corrupt_files_name_the_path(tmp_path):
    _write_folder(tmp_path)
    garbage = tmp_path / "dog" / "e.jpg"
    garbage.write_bytes(b"this is not a jpeg")
    src = open_source(str(tmp_path))
    assert len(src) == 5  # opening does not read images
    with pytest.raises(SourceError) as err:
        src.decode(4)
    assert str(garbage) in str(err.value)
    with pytest.raises(SourceError) as err:
        src.sizes()
    assert str(garbage) in str(err.value)

    garbage.unlink()
    truncated = tmp_path / "dog" / "e.png"
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)  # incompressible
    Image.fromarray(noise).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:2000])  # header intact, pixel data cut
    src = open_source(str(tmp_path))
    assert src.sizes()[4].tolist() == [64, 64]
    with pytest.raises(SourceError) as err:
        src.decode(4)
    assert str(truncated) in str(err.value)


def test_image_folder_fingerprint(tmp_path):
    _write_folder(tmp_path / "one")
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    one, two = open_source(str(tmp_path / "one")), open_source(str(tmp_path / "two"))
    assert one.fingerprint() == two.fingerprint()  # root is not hashed
    Image.new("L", (9, 17), 78).save(tmp_path / "two" / "cat" / "sub" / "b.PNG")
    assert open_source(str(tmp_path / "two")).fingerprint() != one.fingerprint()
    limited = open_source(str(tmp_path / "one"), limit=2)
    assert limited.sizes().tolist() == [[20, 30], [17, 9]]
    assert limited.fingerprint() != one.fingerprint()


# ---------------------------------------------------------------- npz


def _gray(n=10, h=8, w=6):
    images = (np.arange(n * h * w) % 251).astype(np.uint8).reshape(n, h, w)
    return images, (np.arange(n) % 3).astype(np.int32)


def test_npz_gray_and_rgb(tmp_path):
    images, labels = _gray()
    np.savez(tmp_path / "gray.npz", images=images, labels=labels)
    gray = open_source(str(tmp_path / "gray.npz"), "test")  # a .npz is used for any split
    assert isinstance(gray, NpzSource) and gray.split == "test"
    assert gray.channels == 1 and gray.classes == ["0", "1", "2"] and len(gray) == 10
    assert gray.sizes().tolist() == [[8, 6]] * 10 and gray.labels().dtype == np.int64
    assert np.array_equal(gray.decode(3), images[3][None])

    rgb_images = np.stack([images[:4]] * 3, axis=-1)
    rgb_images[..., 2] = 255 - rgb_images[..., 2]
    classes = np.array(["cat", "dog"])
    np.savez(tmp_path / "rgb.npz", images=rgb_images, labels=np.array([0, 1, 1, 0]), classes=classes)
    rgb = open_source(str(tmp_path / "rgb.npz"))
    assert rgb.channels == 3 and rgb.classes == ["cat", "dog"]
    decoded = rgb.decode(2)
    assert decoded.shape == (3, 8, 6) and decoded.flags.c_contiguous
    assert np.array_equal(decoded, rgb_images[2].transpose(2, 0, 1))


def test_npz_mean_std(tmp_path):
    images = np.zeros((4, 2, 2), np.uint8)
    images[2:] = 255
    np.savez(tmp_path / "x.npz", images=images, labels=np.zeros(4, np.int64))
    mean, std = open_source(str(tmp_path / "x.npz")).mean_std()
    assert mean == pytest.approx([0.5]) and std == pytest.approx([0.5])


def test_npz_bad_files(tmp_path):
    images, labels = _gray()
    np.savez(tmp_path / "nolabels.npz", images=images)
    np.savez(tmp_path / "float.npz", images=images.astype(np.float32), labels=labels)
    np.savez(tmp_path / "few.npz", images=images, labels=labels, classes=np.array(["a"]))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    cases = [("nolabels", "labels"), ("float", "uint8"), ("few", "classes"), ("junk", "cannot read")]
    for name, words in cases:
        with pytest.raises(SourceError, match=words) as err:
            open_source(str(tmp_path / f"{name}.npz"))
        assert str(tmp_path / f"{name}.npz") in str(err.value)
    with pytest.raises(SourceError, match="does not exist"):
        open_source(str(tmp_path / "missing.npz"))


def test_npz_fingerprint_changes(tmp_path):
    images, labels = _gray(n=200)
    np.savez(tmp_path / "a.npz", images=images, labels=labels)
    np.savez(tmp_path / "b.npz", images=images, labels=labels)
    base = open_source(str(tmp_path / "a.npz")).fingerprint()
    assert open_source(str(tmp_path / "b.npz")).fingerprint() == base

    sampled = int(source_mod._evenly_spaced(200, 64)[5])
    changed = images.copy()
    changed[sampled, 3, 2] ^= 1
    np.savez(tmp_path / "pixel.npz", images=changed, labels=labels)
    assert open_source(str(tmp_path / "pixel.npz")).fingerprint() != base

    relabeled = labels.copy()
    relabeled[7] = (relabeled[7] + 1) % 3
    np.savez(tmp_path / "label.npz", images=images, labels=relabeled)
    assert open_source(str(tmp_path / "label.npz")).fingerprint() != base

    limited = open_source(str(tmp_path / "a.npz"), limit=150)
    assert limited.fingerprint() not in (base, open_source(str(tmp_path / "a.npz"), limit=149).fingerprint())


def test_evenly_spaced_ids():
    ids = source_mod._evenly_spaced(60000, 64)
    assert len(ids) == 64 and ids[0] == 0 and ids[-1] == 59999 and (np.diff(ids) > 0).all()
    assert source_mod._evenly_spaced(5, 64).tolist() == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------- limit, pickling, errors


def test_limit(tmp_path):
    images, labels = _gray()
    np.savez(tmp_path / "x.npz", images=images, labels=labels)
    path = str(tmp_path / "x.npz")
    whole = open_source(path)
    limited = open_source(path, limit=3)
    assert isinstance(limited, LimitedSource) and len(limited) == 3
    assert limited.labels().tolist() == whole.labels()[:3].tolist() and limited.sizes().shape == (3, 2)
    assert limited.describe()["limit"] == 3 and limited.describe()["num_images"] == 3
    assert np.array_equal(limited.decode(2), whole.decode(2))
    with pytest.raises(SourceError, match="out of range"):
        limited.decode(3)
    big = open_source(path, limit=1000)  # more than there is: the whole source
    assert len(big) == 10 and big.fingerprint() == whole.fingerprint()
    for bad in [0, -1, 2.5, True, "3"]:
        with pytest.raises(SourceError, match="limit"):
            open_source(path, limit=bad)


def test_pickle_round_trip(tmp_path):
    _write_folder(tmp_path / "folder")
    images, labels = _gray()
    np.savez(tmp_path / "x.npz", images=images, labels=labels)
    sources = [open_source(str(tmp_path / "folder")), open_source(str(tmp_path / "x.npz"), limit=4)]
    if os.path.isdir(FMNIST):
        sources.append(open_source("fashion-mnist", "test", limit=50))
    for src in sources:
        copy = pickle.loads(pickle.dumps(src))
        assert type(copy) is type(src) and len(copy) == len(src)
        assert copy.fingerprint() == src.fingerprint()
        assert np.array_equal(copy.decode(len(src) - 1), src.decode(len(src) - 1))


def test_unknown_data():
    with pytest.raises(SourceError) as err:
        open_source("no-such-dataset")
    message = str(err.value)
    assert "'no-such-dataset'" in message and "fashion-mnist" in message and ".npz" in message
    assert "ImageFolder" in message
