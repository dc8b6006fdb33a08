"""`kdlib inspect`: every number checked against the store, computed here independently.

Stores: the session's zarr store (k=3 < 10 classes, 2 epochs, 1 full-logit view per chunk), a wds
store of the same teacher/recipe/seed/k with a 25% full-logit sample, a k=10 store (full logits
kept), and stores assembled here through the Store API (no sample; a partly written epoch).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import CHUNK_VIEWS, FMNIST_RECIPE, LIMIT, STORE_EPOCHS, STORE_K

from kdlib.cli import cli
from kdlib.errors import ConfigError
from kdlib.inspect import NO_SAMPLE, format_report, inspect_store
from kdlib.plan import PARAM_FIELDS
from kdlib.store import FORMAT_VERSION, create_store, open_store

KEYS = ("format", "version", "epochs", "views", "bytes_per_view", "digest")


def _precompute(out, teacher_dir, **kw):
    from kdlib.precompute import PrecomputeConfig, precompute

    cfg = dict(
        teacher=teacher_dir,
        data="fashion-mnist",
        out=str(out),
        recipe=FMNIST_RECIPE,
        limit=LIMIT,
        chunk_views=CHUNK_VIEWS,
        workers=0,
        test=False,
    )
    return precompute(PrecomputeConfig(**{**cfg, **kw}))


@pytest.fixture(scope="module")
def wds_store(tmp_path_factory, teacher_dir):
    """Same teacher, recipe, seed, k and epochs as the session store; wds; a quarter of views keep full logits."""
    return _precompute(
        tmp_path_factory.mktemp("insp") / "wds",
        teacher_dir,
        epochs=STORE_EPOCHS,
        k=STORE_K,
        backend="wds",
        full_sample=0.25,
    )


@pytest.fixture(scope="module")
def k10_store(tmp_path_factory, teacher_dir):
    """k = classes: the soft labels hold every logit."""
    return _precompute(tmp_path_factory.mktemp("insp") / "k10", teacher_dir, epochs=1, k=10, full_sample=0.25)


@pytest.fixture(scope="module")
def report(store_dir):
    return inspect_store(store_dir)


@pytest.fixture(scope="module")
def wds_report(wds_store):
    return inspect_store(wds_store.url)


def _chunks(store):
    for epoch in range(store.meta.epochs_done):
        for chunk in range(store.meta.chunks_per_epoch):
            yield store.read_chunk(epoch, chunk)


def _naive_truncation_kl(store) -> float:
    """Mean KL(softmax(full) || softmax(top-k + uniform tail)) in float64, from the raw columns."""
    c, kls = store.meta.num_classes, []
    for cols in _chunks(store):
        full = cols["full"].astype(np.float64)
        s = len(full)
        ids, logits, lse = cols["ids"][:s].astype(int), cols["logits"][:s].astype(np.float64), cols["lse"][:s]
        mass = 1.0 - np.exp(logits - lse[:, None]).sum(1)
        recon = np.repeat((lse + np.log(mass) - np.log(c - ids.shape[1]))[:, None], c, 1)
        np.put_along_axis(recon, ids, logits, 1)
        lp = full - np.logaddexp.reduce(full, 1, keepdims=True)
        lq = recon - np.logaddexp.reduce(recon, 1, keepdims=True)
        kls.append((np.exp(lp) * (lp - lq)).sum(1))
    return float(np.concatenate(kls).mean())


def test_report_describes_the_store(report, store):
    m = store.meta
    for key in KEYS + ("teacher", "source", "recipe", "k", "id_dtype", "chunks", "labels", "truncation", "test"):
        assert key in report, key
    json.dumps(report)  # JSON-able as it is
    assert report["format"] == "zarr" and report["version"] == FORMAT_VERSION and report["epochs"] == STORE_EPOCHS
    assert report["views"]["per_epoch"] == m.views_per_epoch
    assert report["views"]["total"] == STORE_EPOCHS * m.views_per_epoch
    assert report["k"] == STORE_K and report["num_classes"] == 10 and report["id_dtype"] == "uint8"
    assert report["teacher"] == {
        "id": m.teacher["id"],
        "arch": "resnet8",
        "digest": m.teacher["digest"],
        "precision": "fp32",
    }
    assert report["rendered"] == {"device": "cpu", "decoder": "pil", "renderer": "pil-bilinear-1"}
    assert report["source"]["fingerprint"] == m.source["fingerprint"] and report["source"]["images"] == LIMIT
    assert report["source"]["limit"] == LIMIT and report["source"]["data"] == "fashion-mnist"
    assert report["recipe"]["group"] == [4, 1] and report["recipe"]["mix"] == "mixup"
    assert report["recipe"]["scale"] == list(m.recipe["scale"]) and report["recipe"]["seed"] == m.recipe["seed"]
    assert report["chunks"] == {
        "chunk_views": CHUNK_VIEWS,
        "chunks_per_epoch": m.chunks_per_epoch,
        "sample_views_per_chunk": 1,
        "partial_epoch": None,
    }
    assert report["digest"] == store.content_digest()


def test_label_statistics_match_the_columns(report, store):
    lab = report["labels"]
    n = STORE_EPOCHS * store.meta.views_per_epoch
    top1 = np.concatenate([cols["ids"][:, 0] for cols in _chunks(store)]).astype(int)
    tails = np.concatenate(
        [1 - np.exp(cols["logits"].astype(np.float64) - cols["lse"][:, None]).sum(1) for cols in _chunks(store)]
    )
    assert lab["views"] == n and lab["complete"]
    assert sum(lab["top1_histogram"]["counts"]) == n
    assert lab["top1_histogram"]["counts"] == np.bincount(top1, minlength=10).tolist()
    assert lab["top1_histogram"]["classes"] == store.meta.source["classes"]
    assert 0 < lab["tail_mass_mean"] < 1 and lab["tail_mass_mean"] == pytest.approx(tails.mean(), rel=1e-5)
    assert 0 < lab["entropy_mean"] <= math.log(10) + 1e-6
    assert 0.1 <= lab["top1_prob_mean"] <= 1
    test = store.read_test()
    assert report["test"]["views"] == len(test["lse"]) == store.meta.test["views"]
    assert sum(report["test"]["top1_histogram"]["counts"]) == len(test["lse"])


def test_truncation_is_measured_on_the_sample(report, store):
    tr = report["truncation"]
    assert tr["sample_views"] == STORE_EPOCHS * store.meta.chunks_per_epoch * store.meta.sample_views == 8
    assert tr["kl_mean"] > 0 and tr["kl_max"] >= tr["kl_mean"] and tr["max_abs_prob_error"] > 0
    assert tr["kl_mean"] == pytest.approx(_naive_truncation_kl(store), rel=1e-3)
    te = tr["target_error"]
    assert te["loss"] == "kl" and te["params"] == {"temperature": 1.0}
    assert te["kl_mean"] == pytest.approx(tr["kl_mean"])


def test_bytes_per_view_from_bytes_on_disk(report, store, wds_report, wds_store, store_dir):
    for st, rep in ((store, report), (wds_store, wds_report)):
        disk = st.bytes_on_disk()
        views = st.meta.epochs_done * st.meta.views_per_epoch
        labels = disk["ids"] + disk["logits"] + disk["lse"]
        params = sum(disk.get(c, 0) for c in PARAM_FIELDS)  # zarr writes no shard for an all-zero column (cutbox)
        bpv = rep["bytes_per_view"]
        assert bpv["params"] == pytest.approx(params / views)
        assert bpv["labels"] == pytest.approx(labels / views)
        assert bpv["sample"] == pytest.approx(disk["full"] / views) and disk["full"] > 0
        assert bpv["total"] == pytest.approx((params + labels + disk["full"]) / views)
    # and the zarr total is what the filesystem says the epochs' shard files take
    files = 0
    for d, _, names in os.walk(store_dir):
        rel = os.path.relpath(d, store_dir).split(os.sep)
        if rel[0].startswith("e") and len(rel) >= 3 and rel[2] == "c":
            files += sum(os.path.getsize(os.path.join(d, f)) for f in names)
    assert report["bytes_per_view"]["total"] * report["views"]["total"] == pytest.approx(files)
    # wds: every epoch tar counts
    tars = sum(
        os.path.getsize(os.path.join(wds_store.root, "wds", f))
        for f in os.listdir(os.path.join(wds_store.root, "wds"))
        if f.startswith("e") and f.endswith(".tar")
    )
    assert sum(wds_store.bytes_on_disk().values()) == tars


def test_digest_is_the_same_for_the_same_content_in_any_format(report, wds_report):
    w = wds_report
    assert w["format"] == "wds" and report["format"] == "zarr"
    assert w["digest"] == report["digest"]
    # same views, same labels: the label statistics agree too
    assert w["labels"]["top1_histogram"] == report["labels"]["top1_histogram"]
    assert w["labels"]["tail_mass_mean"] == pytest.approx(report["labels"]["tail_mass_mean"])


def test_digest_changes_when_one_chunk_is_rewritten(report, store_copy):
    st = open_store(store_copy)
    cols = st.read_chunk(1, 2)
    cols["logits"] = cols["logits"].copy()
    cols["logits"][5, 0] += np.float16(0.5)
    st.write_chunk(1, 2, cols)
    changed = inspect_store(store_copy)
    assert changed["digest"] != report["digest"]
    assert changed["digest"] == open_store(store_copy).content_digest()


def test_full_logits_leave_no_tail_and_no_truncation(k10_store):
    r = inspect_store(k10_store.url, temperature=4.0)
    assert r["k"] == r["num_classes"] == 10
    assert 0 <= r["labels"]["tail_mass_mean"] < 1e-3
    # every logit is in the labels: precompute keeps no (duplicate) full-logit sample, nothing is truncated
    assert r["truncation"] is None and r["chunks"]["sample_views_per_chunk"] == 0
    assert any("k = 10 = classes" in n for n in r["notes"])


def test_target_error_grows_with_temperature_for_top3(wds_store, wds_report):
    t1 = wds_report["truncation"]
    t4 = inspect_store(wds_store.url, temperature=4.0)["truncation"]
    assert t1["sample_views"] == t4["sample_views"] == STORE_EPOCHS * 4 * 16
    assert t1["kl_mean"] == t4["kl_mean"] > 0  # the T=1 truncation does not depend on the asked setting
    assert t4["target_error"]["params"] == {"temperature": 4.0}
    assert t4["target_error"]["kl_mean_scaled"] > t1["target_error"]["kl_mean_scaled"] > 0
    # TTM with gamma = 1 targets softmax(teacher), the same as KL at T = 1
    ttm = inspect_store(wds_store.url, loss="ttm", gamma=1.0)["truncation"]["target_error"]
    assert ttm["loss"] == "ttm" and ttm["kl_mean"] == pytest.approx(t1["target_error"]["kl_mean"])


def _assemble(src, out, epochs_done, partial_chunks=0, sample_views=0):
    """A store written through the Store API from `src`'s chunks: no full-logit sample, a partly written epoch."""
    meta = src.meta.replace(sample_views=sample_views, epochs_done=0, test=None)
    st = create_store(str(out), meta)
    for epoch in range(epochs_done + (1 if partial_chunks else 0)):
        st.prepare_epoch(epoch)
        for chunk in range(meta.chunks_per_epoch if epoch < epochs_done else partial_chunks):
            cols = src.read_chunk(epoch, chunk)
            cols.pop("full", None)
            st.write_chunk(epoch, chunk, cols)
    st.write_meta(st.meta.replace(epochs_done=epochs_done))
    return open_store(str(out))


def test_store_without_sample_says_so(report, store, tmp_path):
    st = _assemble(store, tmp_path / "nosample", epochs_done=STORE_EPOCHS)
    r = inspect_store(st.url)
    assert r["truncation"] is None and NO_SAMPLE in r["notes"]
    assert r["bytes_per_view"]["sample"] == 0 and r["test"] is None
    assert r["digest"] == report["digest"]  # the sample is not content: same params and labels, same digest
    assert r["labels"]["top1_histogram"] == report["labels"]["top1_histogram"]
    assert NO_SAMPLE in format_report(r)


def test_partial_epoch_and_max_chunks(report, store, tmp_path):
    st = _assemble(store, tmp_path / "partial", epochs_done=1, partial_chunks=2)
    r = inspect_store(st.url, max_chunks=1)
    assert r["epochs"] == 1 and r["views"]["total"] == store.meta.views_per_epoch
    assert r["chunks"]["partial_epoch"] == {"epoch": 1, "committed_chunks": 2, "of": store.meta.chunks_per_epoch}
    assert r["labels"]["views"] == CHUNK_VIEWS and not r["labels"]["complete"]
    assert r["digest"] == st.content_digest() != report["digest"]
    top1 = store.read_chunk(0, 0)["ids"][:, 0].astype(int)
    assert r["labels"]["top1_histogram"]["counts"] == np.bincount(top1, minlength=10).tolist()
    assert "partly written" in format_report(r)


def test_bad_settings_are_refused_before_reading(store_dir):
    with pytest.raises(ConfigError, match="unknown loss"):
        inspect_store(store_dir, loss="mse")
    with pytest.raises(ConfigError, match="temperature"):
        inspect_store(store_dir, temperature=0.0)
    with pytest.raises(ConfigError, match="max_chunks"):
        inspect_store(store_dir, max_chunks=0)


def test_cli_json_and_text(store_dir, report, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "kdlib", "inspect", store_dir, "--json", "-T", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    for key in KEYS:
        assert out[key] == report[key], key
    assert out["truncation"]["target_error"]["params"] == {"temperature": 2.0}

    res = CliRunner().invoke(cli, ["inspect", store_dir, "--max-chunks", "2"])
    assert res.exit_code == 0, res.output
    assert (
        "backend  zarr" in res.output and f"version  {FORMAT_VERSION}" in res.output and report["digest"] in res.output
    )
    assert "first 2 chunks per epoch" in res.output and "teacher top-1 histogram" in res.output
    assert all(f"{i} {name} " in res.output for i, name in enumerate(report["labels"]["top1_histogram"]["classes"]))

    res = CliRunner().invoke(cli, ["inspect", str(tmp_path / "nothing"), "--json"])
    assert res.exit_code != 0 and "no store" in str(res.exception)


@pytest.mark.parametrize("max_chunks", [None, 1])
def test_inspect_reads_each_chunk_once_and_digests_the_whole_store(store_dir, monkeypatch, max_chunks):
    from kdlib.store.base import Store

    reads = []
    real = Store.read_chunk
    monkeypatch.setattr(Store, "read_chunk", lambda self, e, c: reads.append((e, c)) or real(self, e, c))
    r = inspect_store(store_dir, max_chunks=max_chunks)
    m = open_store(store_dir).meta
    assert sorted(reads) == [(e, c) for e in range(m.epochs_done) for c in range(m.chunks_per_epoch)]
    monkeypatch.setattr(Store, "read_chunk", real)
    assert r["digest"] == open_store(store_dir).content_digest()
