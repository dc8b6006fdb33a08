"""kdlib train warns when the stored top-k target is far from the full teacher at the chosen temperature."""

from __future__ import annotations

import numpy as np
import torch
from accelerate import Accelerator

from kdlib.plan import make_plan
from kdlib.recipe import Recipe
from kdlib.softlabel import encode
from kdlib.store import StoreMeta, create_store
from kdlib.train import TrainConfig, _warn_target_error


def _store(tmp_path, k: int):
    c, v = 100, 256
    meta = StoreMeta(
        format_version=1,
        backend="zarr",
        recipe=Recipe().digest_dict(),
        source={"fingerprint": "f"},
        teacher={"digest": "d"},
        num_classes=c,
        k=k,
        id_dtype="uint8",
        views_per_epoch=v,
        group_size=2,
        chunk_views=128,
        sample_views=32,
    )
    store = create_store(str(tmp_path / f"s{k}"), meta)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(v, c, generator=g) * 3  # a confident teacher with a real tail
    params = make_plan(Recipe(), np.full((v, 2), 28), 0)
    for chunk in range(meta.chunks_per_epoch):
        a, b = meta.chunk_range(chunk)
        cols = {key: arr[a:b] for key, arr in params.items()}
        cols.update({key: t.numpy() for key, t in encode(logits[a:b], k).items()})
        cols["full"] = logits[a : a + meta.sample_views].half().numpy()
        store.write_chunk(0, chunk, cols)
    return store


def test_warns_for_a_truncated_target_at_high_temperature(tmp_path, capsys):
    acc = Accelerator(cpu=True)
    store = _store(tmp_path, k=5)
    _warn_target_error(store, TrainConfig(out="x", temperature=4.0), acc)
    assert "warning" in capsys.readouterr().out
    _warn_target_error(_store(tmp_path, k=100), TrainConfig(out="x", temperature=4.0), acc)  # full logits
    assert "warning" not in capsys.readouterr().out
