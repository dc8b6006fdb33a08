"""kdlib.store.codecs: every column family is one codec; a new column kind is one registered codec.

The new kind here (`margin`: the teacher's top-1 minus top-2 logit, fp16) is added without touching
precompute, train, verify or inspect: it is stored and committed with the chunk, replayed in every
item, checked by verify against a fresh teacher run, counted by inspect, and refused when no codec
for it is registered.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CHUNK_VIEWS, FMNIST_RECIPE, LIMIT

from kdlib.errors import CorruptStoreError, StoreVersionError
from kdlib.store.codecs import Codec, TeacherOutput, Tolerance, register_codec, unregister_codec


class Margin(Codec):
    """The teacher's top-1 minus top-2 logit, one fp16 per view."""

    name = "margin"

    def fields(self, meta):
        return {"margin": ("float16", ())}

    def encode(self, out: TeacherOutput, meta):
        top2 = out.logits.topk(2, dim=1).values
        return {"margin": (top2[:, 0] - top2[:, 1]).half()}

    def verify(self, fresh: TeacherOutput, cols, meta, tol: Tolerance):
        top2 = fresh.logits.topk(2, dim=1).values
        err = float((torch.from_numpy(cols["margin"]).float() - (top2[:, 0] - top2[:, 1])).abs().max())
        ok = err <= tol.abs + 2.0**-10 * float(top2.abs().max())  # fp16 rounding of the stored margin
        return {"margin": {"max_error": err, "ok": ok}, "ok": ok}


@pytest.fixture(scope="module")
def margin_store(teacher_dir, tmp_path_factory):
    from kdlib.precompute import PrecomputeConfig, precompute

    out = tmp_path_factory.mktemp("codec") / "s"
    register_codec(Margin())
    try:
        precompute(
            PrecomputeConfig(
                teacher=teacher_dir,
                data="fashion-mnist",
                out=str(out),
                recipe=FMNIST_RECIPE,
                epochs=1,
                k=3,
                limit=LIMIT,
                workers=0,
                chunk_views=CHUNK_VIEWS,
                columns=("margin",),
            )
        )
        yield str(out)
    finally:
        unregister_codec("margin")


@pytest.fixture
def margin(margin_store):
    register_codec(Margin())
    yield margin_store
    unregister_codec("margin")


def test_a_new_column_kind_is_stored_replayed_verified_and_inspected(margin, teacher_dir):
    from kdlib.inspect import inspect_store
    from kdlib.replay import Replay
    from kdlib.store import open_store
    from kdlib.verify import verify

    store = open_store(margin)
    assert store.meta.codecs == ["margin"]
    assert json.loads((Path(margin) / "meta.json").read_text())["codecs"] == ["margin"]
    raw = store.read_chunk(0, 0)
    assert raw["margin"].dtype == np.float16 and raw["margin"].shape == (CHUNK_VIEWS,)
    assert (raw["margin"] >= 0).all() and (raw["margin"] > 0).any()
    full = raw["full"].astype(np.float32)  # the sample's full logits: the margin of those views
    top2 = np.sort(full, axis=1)[:, -2:]
    assert np.allclose(raw["margin"][: len(full)], top2[:, 1] - top2[:, 0], atol=1e-2)

    batch = next(iter(Replay.from_store(margin, batch_size=CHUNK_VIEWS, workers=0, device="cpu", rank=0, world=1)))
    assert torch.equal(batch.item["margin"], torch.from_numpy(raw["margin"]))  # every item carries the new column

    result = verify(margin, teacher_dir, views=64)
    assert result["ok"] and result["margin"]["ok"] and result["margin"]["max_error"] < 1e-2

    report = inspect_store(margin)
    assert 1.0 < report["bytes_per_view_by_kind"]["margin"] < 4.0  # 2 bytes a view, compressed a little at most
    assert abs(sum(report["bytes_per_view_by_kind"].values()) - report["bytes_per_view"]["total"]) < 1e-6


def test_the_new_column_is_committed_and_digested_like_every_other(margin, tmp_path):
    import hashlib
    import shutil

    from kdlib.store import open_store

    store = open_store(margin)
    assert "margin" in store.meta.fields  # part of the content digest, in column order
    cols = store.read_chunk(0, 0)
    changed = dict(cols, margin=cols["margin"] + np.float16(1))
    a, b = hashlib.sha256(), hashlib.sha256()
    store.digest_update(a, cols)
    store.digest_update(b, changed)
    assert a.hexdigest() != b.hexdigest()

    copy = tmp_path / "s"
    shutil.copytree(margin, copy)
    broken = open_store(str(copy))
    arr = broken._array("e00000", "margin")
    arr[0:1] = arr[0:1] + np.float16(1)  # one view's margin changed behind the commit record's back
    with pytest.raises(CorruptStoreError, match="margin"):
        open_store(str(copy)).read_chunk(0, 0)


def test_a_store_of_an_unknown_kind_is_refused_with_one_line(margin_store):
    from kdlib.store import open_store

    with pytest.raises(StoreVersionError, match="margin.*register"):
        open_store(margin_store)


def test_a_store_without_extra_kinds_keeps_its_v2_meta(store_dir):
    meta = json.loads((Path(store_dir) / "meta.json").read_text())
    assert "codecs" not in meta and meta["format_version"] == 2


def test_codec_names_are_checked():
    from kdlib.errors import ConfigError
    from kdlib.store.codecs import LabelsCodec

    with pytest.raises(ConfigError):
        register_codec(LabelsCodec())  # kdlib's own family

    class Params(Codec):
        name = "params"

    with pytest.raises(ConfigError, match="kdlib's own"):
        register_codec(Params())
