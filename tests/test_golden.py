"""Stores written by format versions 1 and 2 (committed under tests/data/golden-v1, golden-v2) still read back the same.

Regenerate only with a new format version: `.venv/bin/python tests/data/make_golden.py`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from kdlib.errors import StoreVersionError
from kdlib.store import open_store

GOLDEN = Path(__file__).resolve().parent / "data" / "golden-v1"
EXPECTED = json.loads((GOLDEN / "EXPECTED.json").read_text())


@pytest.mark.parametrize("backend", ["zarr", "wds"])
def test_golden_store_reads_back_pinned_content(backend):
    store = open_store(str(GOLDEN / backend))
    want = EXPECTED[backend]
    assert store.meta.format_version == 1 and store.meta.backend == backend
    assert store.meta.epochs_done == want["epochs_done"] and store.meta.k == want["k"]
    assert store.meta.views_per_epoch == want["views_per_epoch"]
    assert store.content_digest() == want["digest"]
    chunk = store.read_chunk(1, 1)
    for name, values in want["epoch1_chunk1"].items():
        got = chunk[name][: len(values)]
        np.testing.assert_array_equal(got.astype(float) if got.dtype.kind == "f" else got, np.asarray(values))
    np.testing.assert_array_equal(store.read_test()["ids"][:4], np.asarray(want["test_ids"]))


def test_both_formats_hold_the_same_content():
    assert EXPECTED["zarr"]["digest"] == EXPECTED["wds"]["digest"]


def test_newer_version_is_refused_by_name(tmp_path):
    copy = tmp_path / "s"
    shutil.copytree(GOLDEN / "zarr", copy)
    meta = json.loads((copy / "meta.json").read_text())
    meta["format_version"] = 3
    (copy / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(StoreVersionError, match=r"version 3 found.*reads versions \[1, 2\].*newer kdlib"):
        open_store(str(copy))


GOLDEN_V2 = Path(__file__).resolve().parent / "data" / "golden-v2"


@pytest.mark.parametrize("backend", ["zarr", "wds"])
def test_golden_v2_store_reads_back_heads_and_maps(backend):
    """Version 2 (DIH head label sets, attention maps): pinned like version 1, for later versions to read."""
    want = json.loads((GOLDEN_V2 / "EXPECTED.json").read_text())[backend]
    store = open_store(str(GOLDEN_V2 / backend))
    assert store.meta.format_version == 2 and store.meta.heads == want["heads"] == ["blocks.0", "blocks.1", "blocks.2"]
    assert store.meta.attention == want["attention"] == {"layers": ["blocks.2"], "grid": 4, "codec": "q8"}
    assert store.content_digest() == want["digest"]
    chunk = store.read_chunk(1, 1)
    for name, values in want["epoch1_chunk1"].items():
        got = chunk[name][: len(values)]
        np.testing.assert_array_equal(got.astype(float) if got.dtype.kind == "f" else got, np.asarray(values))
    assert want["digest"] == json.loads((GOLDEN_V2 / "EXPECTED.json").read_text())["zarr"]["digest"]
