"""Data sources at scale (issue 18, part 2): webdataset tars (`wds:PATTERN`) and Hugging Face datasets on disk
(`hf:PATH`), made from Fashion-MNIST by precompute/convert_fashion_mnist.py, hold the same images as its
ImageFolder form: the same bytes per id, the same store content digest from one teacher; the wds member
index is built once and kept in the store; bad input is one `error:` line naming it."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from conftest import CLI_ENV, FMNIST_RECIPE, REPO, kdlib_cli, one_line

import kdlib.source_wds as source_wds
from kdlib.cli import _one_line
from kdlib.errors import SourceError
from kdlib.source import HFSource, WdsSource, open_source

N = 48  # images per split
SHARD = 16  # images per tar: 3 shards per split


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KDLIB_INDEX_CACHE", str(tmp_path / "index-cache"))


@pytest.fixture(scope="module")
def forms(tmp_path_factory) -> dict[str, str]:
    """The converter's --data values: {"folder", "wds", "hf", "parquet"} of the first 48 images of each split."""
    out = tmp_path_factory.mktemp("fmnist-forms")
    p = subprocess.run(
        [sys.executable, str(REPO / "precompute" / "convert_fashion_mnist.py"), "--out", str(out),
         "--format", "folder,wds,hf,parquet", "--limit", str(N), "--shard-size", str(SHARD)],
        env={**CLI_ENV, "KDLIB_DATA": os.environ["KDLIB_DATA"]}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    lines = dict(line.split(": --data ", 1) for line in p.stdout.splitlines())
    return {fmt: data.strip("'") for fmt, data in lines.items()}


def test_every_form_holds_the_same_images_in_the_same_order(forms):
    assert (
        forms["wds"]
        == f"wds:{os.path.dirname(forms['folder'])}/wds/train-{{000000..000002}}.tar?test=test-{{000000..000002}}.tar"
    )
    for split in ("train", "test"):
        folder = open_source(forms["folder"], split)
        for fmt in ("wds", "hf", "parquet"):
            other = open_source(forms[fmt], split)
            assert len(other) == len(folder) == N and other.channels == 3
            assert other.classes == folder.classes and other.classes[0] == "0_T-shirt-top"
            assert (other.labels() == folder.labels()).all() and (other.sizes() == folder.sizes()).all()
            assert other.fingerprint() != folder.fingerprint()  # the fingerprint names the kind and the names
            revived = pickle.loads(pickle.dumps(other))  # as a spawned DataLoader worker gets it
            for i in range(N):
                with open(folder._path(i), "rb") as f:
                    assert other._content(i) == f.read()  # the replay contract: the same id, the same PNG bytes
                assert (revived.decode(i) == folder.decode(i)).all()
    assert open_source(forms["hf"]).fingerprint() == open_source(forms["parquet"]).fingerprint()


def test_one_teacher_gives_one_store_digest_from_folder_wds_and_hf(forms, tmp_path, monkeypatch):
    import torch

    from kdlib.precompute import PrecomputeConfig, precompute
    from kdlib.store import open_store, open_store_source

    stores = {}
    for fmt in ("folder", "wds", "hf"):
        torch.manual_seed(0)  # one teacher: resnet8's initial weights
        stores[fmt] = precompute(
            PrecomputeConfig(teacher="resnet8", data=forms[fmt], out=str(tmp_path / fmt), recipe=FMNIST_RECIPE,
                             epochs=1, k=3, chunk_views=32, batch_size=32, cpu=True, test=fmt == "wds",
                             workers=2 if fmt == "wds" else 0)  # forked workers read the tars
        )  # fmt: skip
    assert len({s.meta.teacher["digest"] for s in stores.values()}) == 1
    digests = {fmt: s.content_digest() for fmt, s in stores.items()}
    assert len(set(digests.values())) == 1, digests
    assert stores["wds"].meta.test is not None  # the ?test= shards were found and predicted
    assert stores["wds"].meta.source["data"] == forms["wds"]
    # train reopens the wds source from the member index the store keeps: no tar is scanned again
    assert len(list((tmp_path / "wds" / "index").glob("*.npz"))) == 1
    monkeypatch.setenv("KDLIB_INDEX_CACHE", "off")

    def no_scan(*a):
        raise AssertionError("the tars were scanned again")

    monkeypatch.setattr(source_wds, "_build_index", no_scan)
    again = open_store_source(open_store(str(tmp_path / "wds")))
    assert isinstance(again, WdsSource) and again.fingerprint() == stores["wds"].meta.source["fingerprint"]
    assert isinstance(open_store_source(open_store(str(tmp_path / "hf"))), HFSource)
    # a store in object storage keeps its index there too: the same file through an fsspec URL
    assert again.save_index("memory://store/index") == f"memory://store/index/{again.listing_digest[:32]}.npz"
    src = open_source(forms["wds"], index_dirs=("memory://store/index",))
    assert (src.sizes() == again.sizes()).all() and src.mean_std() == again.mean_std()


def _rewrite(tar_path, rename):
    """Rewrite a shard with its members renamed by `rename`, same bytes per member, same mtime."""
    st = os.stat(tar_path)
    with tarfile.open(tar_path) as tf:
        members = [(ti, tf.extractfile(ti).read()) for ti in tf.getmembers()]
    with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for ti, data in members:
            ti.name = rename(ti.name)
            tf.addfile(ti, io.BytesIO(data))
    os.utime(tar_path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.path.getsize(tar_path) == st.st_size


def test_wds_index_is_built_once_and_a_shard_changed_behind_it_is_refused(forms, tmp_path, monkeypatch):
    import shutil

    wds = tmp_path / "wds"
    shutil.copytree(os.path.dirname(forms["folder"]) + "/wds", wds)
    spec = f"wds:{wds}/train-{{000000..000002}}.tar"
    first = open_source(spec)
    before = first.decode(0)
    built = []
    real = source_wds._build_index
    monkeypatch.setattr(source_wds, "_build_index", lambda *a: built.append(1) or real(*a))
    assert (open_source(spec).decode(0) == before).all() and not built  # from the cache: no tar read again
    # the same byte count and mtime, another name at the indexed offset: refused, never read as another image
    _rewrite(wds / "train-000000.tar", lambda n: "x" + n[1:])
    stale = open_source(spec)
    assert not built
    with pytest.raises(SourceError, match=r"changed since its index was built.*holds 'x0.*the index names '0") as e:
        stale.decode(0)
    assert _one_line(e.value)[0] == 2
    os.utime(wds / "train-000000.tar")  # a new mtime: another listing, a new index
    fresh = open_source(spec)
    assert built and (fresh.decode(0) == before).all() and fresh._names()[0].startswith("train-000000.tar/x")


def test_brace_expansion_is_webdatasets():
    assert source_wds.expand_braces("a-{008..011}.tar") == ["a-008.tar", "a-009.tar", "a-010.tar", "a-011.tar"]
    assert source_wds.expand_braces("{x,y}/p-{0..1}.tar") == ["x/p-0.tar", "x/p-1.tar", "y/p-0.tar", "y/p-1.tar"]
    assert source_wds.expand_braces("s3://b/k.tar") == ["s3://b/k.tar"]


def _tar(path, members: dict[str, bytes]):
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


def _png(value=0) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((6, 9), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _error_line(spec: str, split: str = "train", *words: str) -> str:
    with pytest.raises(SourceError) as e:
        src = open_source(spec, split)
        src.decode(0)
    code, line = _one_line(e.value)
    assert code == 2 and "\n" not in line, line
    for w in words:
        assert w in line, (w, line)
    return line


def test_wds_bad_input_is_one_line_naming_it(tmp_path):
    _error_line(f"wds:{tmp_path}/none-{{0..3}}.tar", "train", "none-0.tar", "does not exist")
    _error_line(f"wds:{tmp_path}/none-*.tar", "train", "matches no file")
    _tar(tmp_path / "nolabel.tar", {"a.png": _png(), "a.cls": b"0", "b.png": _png(1), "b.txt": b"hi"})
    _error_line(f"wds:{tmp_path}/nolabel.tar", "train", "nolabel.tar", "'b'", "has no label", "b.cls")
    _tar(tmp_path / "webp.tar", {"a.png": _png(), "a.cls": b"0", "c.webp": b"RIFF", "c.cls": b"1"})
    _error_line(f"wds:{tmp_path}/webp.tar", "train", "webp.tar", "'c'", "no .jpg/.jpeg/.png member", "c.webp")
    _tar(tmp_path / "badcls.tar", {"a.png": _png(), "a.cls": b"cat"})
    _error_line(f"wds:{tmp_path}/badcls.tar", "train", "a.cls", "class id")
    (tmp_path / "junk.tar").write_bytes(b"not a tar" * 100)
    _error_line(f"wds:{tmp_path}/junk.tar", "train", "junk.tar", "as a tar")
    _error_line(f"wds:{tmp_path}/x.tar?tset=y.tar", "train", "unknown option 'tset'")
    _tar(tmp_path / "ok.tar", {"a.png": _png(), "a.json": json.dumps({"label": 1, "class_name": "dog"}).encode()})
    ok = f"wds:{tmp_path}/ok.tar"
    assert open_source(ok).classes == ["0", "dog"]  # a name where the metadata gives one, else the id
    _error_line(ok, "test", "no test split", "?test=PATTERN")
    _error_line(f"{ok}?test=missing.tar", "test", str(tmp_path / "missing.tar"), "test pattern")


def _hf(path, columns: dict, features=None):
    import datasets

    datasets.disable_progress_bars()
    return datasets.Dataset.from_dict(columns, features=features)


def test_hf_bad_input_is_one_line_naming_it(tmp_path, monkeypatch):
    import datasets

    img = datasets.Features({"img": datasets.Image(), "label": datasets.Value("int64")})
    _hf(tmp_path, {"img": [{"bytes": _png(), "path": None}], "label": [0]}, img).save_to_disk(str(tmp_path / "one"))
    one = f"hf:{tmp_path / 'one'}"
    _error_line(one, "train", "no image column 'image'", "['img', 'label']", "?image=COLUMN")
    _error_line(f"{one}?image=picture", "train", "no image column 'picture'")
    assert open_source(f"{one}?image=img").classes == ["0"]  # plain int labels: the class ids
    _error_line(f"{one}?image=img&label=fine_label", "train", "no label column 'fine_label'")
    _error_line(f"{one}?image=img", "test", "no split 'test'", "['train']", "?test=NAME")
    (tmp_path / "empty").mkdir()
    _error_line(f"hf:{tmp_path / 'empty'}", "train", "is not a Hugging Face dataset on disk")
    _error_line(f"hf:{tmp_path / 'nowhere'}", "train", "does not exist")
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if the extra were not installed
    _error_line(f"{one}?image=img", "train", "pip install 'kdlib[hf]'")


def test_hf_splits_by_name(forms, tmp_path):
    import datasets

    dd = datasets.load_from_disk(forms["hf"][3:])
    datasets.DatasetDict({"train": dd["train"], "validation": dd["test"]}).save_to_disk(str(tmp_path / "v"))
    spec = f"hf:{tmp_path / 'v'}"
    test = open_source(spec, "test")  # no split named test: validation is the test split
    assert len(test) == N and test.describe()["root"] == str(tmp_path / "v")
    assert (open_source(f"{spec}?test=train", "test").labels() == open_source(spec).labels()).all()
    _error_line(f"{spec}?test=holdout", "test", "no split 'holdout'", "['train', 'validation']")


def test_cli_refuses_a_wds_pattern_that_matches_nothing(tmp_path):
    p = kdlib_cli("precompute", "--data", f"wds:{tmp_path}/train-{{000..009}}.tar", "--teacher", "resnet8",
                  "--out", tmp_path / "s", "--cpu")  # fmt: skip
    one_line(p, 2, f"{tmp_path}/train-000.tar", "(and 9 more)", "does not exist")
    assert not (tmp_path / "s").exists()  # refused before anything was written
