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
from s3_server import BUCKET

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


BRACE_PATTERNS = [
    "a-{008..011}.tar", "{00..100}", "{0..100}", "{8..011}", "{-05..3}", "{10..07}", "{-1..01}", "{-0..3}",
    "{0..-3}", "{0..10..3}", "{10..0..3}", "{01..1..0}", "{a..g..2}", "{Z..a}", "{z..A..3}", "{a..9}",
    "{x,y}/p-{0..1}.tar", "{a,{b,c}}", "{{0..2},{a..b}}", "{a,b}{c,{d,e..f}}", "python{2.{5..7},3.{2,3}}",
    "{,a}", "{a,}b", "x{}y", "{abc}", "{a{b,c}}", "}{", r"{1\{2,3}", r"\{1,2\}", r"a\\b{1,2}",
    "s3://b/k.tar", "s3://b/train-{000000..000002}.tar", "gs://b/{train,val}/s-{0000..0011..4}.tar",
]  # fmt: skip


def test_brace_expansion_is_webdatasets():
    from braceexpand import UnbalancedBracesError, braceexpand  # webdataset's (a test-only dependency here)

    assert source_wds.expand_braces("a-{008..011}.tar") == ["a-008.tar", "a-009.tar", "a-010.tar", "a-011.tar"]
    assert source_wds.expand_braces("{a,{b,c}}") == ["a", "b", "c"]  # nested: no duplicates
    assert source_wds.expand_braces("{00..100}")[:2] == ["000", "001"]  # padded to the wider end
    for pattern in BRACE_PATTERNS:
        assert source_wds.expand_braces(pattern) == list(braceexpand(pattern)), pattern
    for pattern in ("{1{2,3}", "a}b{c}", "{0..3"):
        with pytest.raises(UnbalancedBracesError):
            list(braceexpand(pattern))
        with pytest.raises(SourceError, match="unbalanced braces"):
            source_wds.expand_braces(pattern)
    _error_line("wds:/tmp/train-{0..3.tar", "train", "wds:/tmp/train-{0..3.tar", "unbalanced braces")


def test_a_shard_truncated_below_the_index_is_one_line(forms, tmp_path):
    import shutil

    wds = tmp_path / "wds"
    shutil.copytree(os.path.dirname(forms["folder"]) + "/wds", wds)
    src = open_source(f"wds:{wds}/train-{{000000..000002}}.tar")  # indexed while whole
    shard = wds / "train-000001.tar"
    j = int(np.flatnonzero(src._index["shard"] == 1)[-1])  # the shard's last image
    start, end = int(src._index["offset"][j]), int(src._index["data_offset"][j] + src._index["length"][j])
    # inside its bytes; inside its header (the header parse would index past it); before it (nothing read)
    for cut in (end - 7, start + 100, start - 1):
        with open(shard, "r+b") as f:
            f.truncate(cut)
        with pytest.raises(SourceError) as e:
            src.decode(j)
        code, line = _one_line(e.value)
        assert code == 2 and "\n" not in line, line
        for w in (str(shard), f"got {max(cut - start, 0)} of {end - start} bytes at byte {start}", "changed since its index",
                  "rebuild the index or restore the shard"):  # fmt: skip
            assert w in line, (w, line)


class _Members:
    """A source's encoded images as a DataLoader dataset: what its workers read."""

    def __init__(self, source):
        self.source = source

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> bytes:
        return self.source._content(i)


def test_wds_from_s3_with_forked_workers_reads_the_local_bytes(forms, s3, monkeypatch):  # noqa: F811
    from torch.utils.data import DataLoader

    monkeypatch.setenv("KDLIB_STORAGE_OPTIONS", json.dumps(s3.options()))  # what --storage-options hands on
    local_dir = os.path.dirname(forms["folder"]) + "/wds"
    fs = s3.fs()
    for name in sorted(os.listdir(local_dir)):
        fs.put_file(os.path.join(local_dir, name), f"{BUCKET}/wds-source/{name}")
    local = open_source(forms["wds"])
    spec = f"wds:{s3.url('wds-source')}/train-{{000000..000002}}.tar?test=test-*.tar"
    remote = open_source(spec)
    assert remote.listing_digest != local.listing_digest and len(remote) == len(local) == N
    assert (remote.labels() == local.labels()).all() and (remote.sizes() == local.sizes()).all()
    assert remote.classes == local.classes and remote._names() == local._names()
    assert remote.fingerprint() == local.fingerprint()  # where the shards live is not part of the data
    loader = DataLoader(_Members(remote), batch_size=None, num_workers=2, multiprocessing_context="fork")
    assert list(loader) == [local._content(i) for i in range(N)]
    test = open_source(spec, "test")  # ?test= globbed in the same bucket folder
    assert (test.labels() == open_source(forms["wds"], "test").labels()).all()
    # a bucket that is not there: one line naming it, for a brace pattern and a glob alike
    for pattern in ("train-{000000..000002}.tar", "train-*.tar"):
        _error_line(f"wds:s3://kdlib-no-such-bucket/wds-source/{pattern}", "train", "bucket 'kdlib-no-such-bucket'",
                    "does not exist")  # fmt: skip
    # a folder with no such shard in a bucket that is there: the shard is named, not the bucket
    line = _error_line(f"wds:{s3.url('wds-source')}/val-{{0..1}}.tar", "train", "val-0.tar", "does not exist")
    assert "bucket" not in line
    # a shard cut short behind the index: the same line as for a local one (past its end: S3's HTTP 416)
    j = int(np.flatnonzero(remote._index["shard"] == 1)[-1])
    start = int(remote._index["offset"][j])
    with open(os.path.join(local_dir, "train-000001.tar"), "rb") as f:
        whole = f.read()
    for cut, got in ((start + 100, 100), (start - 1, 0)):
        fs.pipe_file(f"{BUCKET}/wds-source/train-000001.tar", whole[:cut])
        with pytest.raises(SourceError, match=f"train-000001.tar: got {got} of .* bytes at byte {start} .*changed"):
            remote.decode(j)
    # the server gone: its fault, not "the shard changed" (which would send the user to rebuild the index)
    s3.stop()
    try:
        with pytest.raises(SourceError, match="cannot read wds shard s3://.*train-000001.tar .*Connect") as gone:
            remote.decode(j)
        assert "changed" not in str(gone.value)
    finally:
        s3.restart()


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


def test_wds_odd_members_are_read_as_webdataset_reads_them_or_refused_in_one_line(tmp_path):
    from PIL import Image

    # upper-case extensions are lower-cased (webdataset's rule): .PNG, .CLS and .JSON are image and label
    _tar(tmp_path / "upper.tar", {"a.PNG": _png(3), "a.CLS": b"1", "b.png": _png(4),
                                  "b.JSON": json.dumps({"label": 0, "class_name": "cat"}).encode()})  # fmt: skip
    upper = open_source(f"wds:{tmp_path}/upper.tar")
    assert upper.labels().tolist() == [1, 0] and upper.classes == ["cat", "1"] and upper.decode(0)[0, 0, 0] == 3
    # a member name that is not UTF-8 is kept as the tar's bytes: indexed, read and fingerprinted
    with tarfile.open(tmp_path / "latin1.tar", "w", encoding="latin-1") as tf:
        for name, data in (("caf\xe9.png", _png(5)), ("caf\xe9.cls", b"0")):
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    latin1 = open_source(f"wds:{tmp_path}/latin1.tar")
    assert latin1.decode(0)[0, 0, 0] == 5 and len(latin1.fingerprint()) == 64
    assert open_source(f"wds:{tmp_path}/latin1.tar")._names() == latin1._names()  # from the index kept on disk
    # a label far beyond any class count: refused by name, before a class list that size is made
    _tar(tmp_path / "huge.tar", {"a.png": _png(), "a.cls": b"999999999999"})
    _error_line(f"wds:{tmp_path}/huge.tar", "train", "huge.tar", "a.cls", "class id 999999999999 is above")
    _tar(tmp_path / "hugejson.tar", {"a.png": _png(), "a.json": b'{"label": 99999999999999999999999}'})
    _error_line(f"wds:{tmp_path}/hugejson.tar", "train", "a.json", "is above")
    # only PNG and JPEG are parsed, whatever the member's name says
    gif = io.BytesIO()
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(gif, format="GIF")
    _tar(tmp_path / "gif.tar", {"a.png": gif.getvalue(), "a.cls": b"0"})
    _error_line(f"wds:{tmp_path}/gif.tar", "train", "gif.tar", "a.png", "not a PNG or JPEG image")
    (tmp_path / "folder" / "cat").mkdir(parents=True)  # an ImageFolder still reads what Pillow reads, as before
    (tmp_path / "folder" / "cat" / "a.png").write_bytes(gif.getvalue())
    assert open_source(str(tmp_path / "folder")).decode(0).shape == (3, 5, 5)


def test_convert_refuses_hf_forms_without_datasets_before_writing(tmp_path, monkeypatch, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_fmnist", REPO / "precompute" / "convert_fashion_mnist.py")
    convert = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convert)
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if the extra were not installed
    assert convert.main(["--out", str(tmp_path / "out"), "--format", "folder,parquet", "--limit", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --format hf and parquet need the datasets package"), err
    assert "pip install 'kdlib[hf]'" in err[0]
    assert not (tmp_path / "out").exists()  # the folder form was not written first


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
    # a cell holding only a path (Dataset.to_parquet writes such cells): refused, never opened from the cwd
    (tmp_path / "a.png").write_bytes(_png())
    monkeypatch.chdir(tmp_path)
    _hf(tmp_path, {"img": [{"bytes": None, "path": "a.png"}], "label": [0]}, img).to_parquet(
        str(tmp_path / "paths" / "train-00000-of-00001.parquet")
    )
    _error_line(f"hf:{tmp_path / 'paths'}?image=img", "train", "row 0", "only a path ('a.png')",
                "cast_column('img', Image(decode=True))", "save_to_disk")  # fmt: skip
    # plain-int labels far beyond any class count: refused before a class list that size is made
    _hf(tmp_path, {"img": [{"bytes": _png(), "path": None}], "label": [999999999999]}, img).save_to_disk(
        str(tmp_path / "huge")
    )
    _error_line(f"hf:{tmp_path / 'huge'}?image=img", "train", "label 999999999999", "above")
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
