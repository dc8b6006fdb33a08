"""kdlib.targets: train's three sources of targets, chosen once from a train config."""

from __future__ import annotations

import pytest
import torch
from conftest import FMNIST_RECIPE, LIMIT

from kdlib.errors import ConfigError

CPU = torch.device("cpu")


def _cfg(tmp_path, **kw):
    from kdlib.train import TrainConfig

    return TrainConfig(out=str(tmp_path / "run"), limit=LIMIT, workers=0, cpu=True, **kw)


def test_each_config_chooses_one_source_of_targets(tmp_path, store_dir, teacher_dir):
    from kdlib.targets import LabelTargets, OnlineTargets, StoreTargets, choose_targets

    cached = choose_targets(_cfg(tmp_path, shards=store_dir), CPU)
    assert isinstance(cached, StoreTargets) and cached.teacher is None and cached.stored_epochs == 2
    online = choose_targets(_cfg(tmp_path, data="fashion-mnist", recipe=FMNIST_RECIPE, teacher=teacher_dir), CPU)
    assert isinstance(online, OnlineTargets) and online.store is None and online.teacher.digest
    labels = choose_targets(_cfg(tmp_path, data="fashion-mnist", recipe=FMNIST_RECIPE, loss="ce"), CPU)
    assert isinstance(labels, LabelTargets) and labels.logits({}, CPU) is None
    # the cached and the online teacher answer the same views alike (up to fp16 storage)
    from kdlib.views import Batch

    batch = cached.dataset([Batch(0, 0, 32)])[0]  # rendered here, as a worker renders
    from_store = cached.logits(batch, CPU)
    fresh = online.logits({"views": batch["views"]}, CPU)
    assert from_store.shape == fresh.shape == (32, 10)
    assert (from_store.argmax(1) == fresh.argmax(1)).all()


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"shards": "S", "teacher": "T"}, "not both"),
        ({}, "give --shards"),
        ({"data": "fashion-mnist", "loss": "kl"}, "needs soft labels"),
        ({"data": "fashion-mnist", "loss": "ce", "teacher_weights": "w.safetensors"}, "online --teacher"),
    ],
)
def test_a_config_without_one_clear_source_is_refused(tmp_path, kw, words):
    from kdlib.targets import choose_targets

    with pytest.raises(ConfigError, match=words):
        choose_targets(_cfg(tmp_path, **kw), CPU)
