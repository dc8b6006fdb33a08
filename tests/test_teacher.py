"""kdlib.teacher: the one teacher loader and the Teacher it returns (every stage's teacher)."""

from __future__ import annotations

import pytest
import torch
from conftest import LIMIT

from kdlib.errors import ConfigError, StoreMismatchError


@pytest.fixture(scope="module")
def source():
    from kdlib.source import open_source

    return open_source("fashion-mnist", "train", LIMIT)


def test_load_teacher_resolves_identity_device_and_precision(teacher_dir, source):
    from kdlib.resolve import load_model
    from kdlib.teacher import load_teacher
    from kdlib.weights import weights_digest

    t = load_teacher(teacher_dir, source, cpu=True)
    assert t.device.type == "cpu" and t.precision == "fp32" and not t.model.training
    assert t.digest == weights_digest(load_model(teacher_dir)) and t.heads == [] and t.attention is None
    ident = t.identity()
    assert ident["digest"] == t.digest and ident["precision"] == "fp32" and ident["id"].startswith("run:")
    assert ident["contract"] == t.contract.to_dict() and ident["config"]["num_classes"] == source.num_classes
    with pytest.raises(ConfigError, match="precision"):
        load_teacher(teacher_dir, source, cpu=True, precision="fp8")


def test_forward_gives_logits_heads_and_maps_of_one_forward(headed_teacher_dir, source):
    from kdlib.attention import attention_map
    from kdlib.teacher import load_teacher

    t = load_teacher(headed_teacher_dir, source, cpu=True)
    assert t.heads == ["blocks.0", "blocks.1", "blocks.2"]
    spec = t.tap(["stage1", "stage3"], grid=4, codec="q8")
    assert spec == {"layers": ["blocks.0", "blocks.2"], "grid": 4, "codec": "q8"}
    views = torch.randint(0, 256, (6, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = t.forward(views)
    with torch.no_grad():
        cohort = t.model.cohort_logits(views)
        _, feats = t.model.features(views)
    assert torch.equal(out.logits, cohort[:, 0]) and len(out.head_logits) == 3
    assert all(torch.equal(z, cohort[:, j + 1]) for j, z in enumerate(out.head_logits))
    assert len(out.maps) == 2 and out.maps[0].shape == (6, 16)
    assert torch.allclose(out.maps[1], attention_map(feats[2], 4))
    assert torch.equal(t.logits(views), out.logits)
    with pytest.raises(ConfigError, match="grid"):
        t.tap(["stage1"], grid=0)


def test_check_store_refuses_another_teacher(store, other_teacher_dir, teacher_dir, source):
    from kdlib.teacher import load_teacher

    writer = load_teacher(teacher_dir, source, cpu=True)
    writer.check_store(store.meta, "here")  # the teacher that wrote the store passes
    with pytest.raises(StoreMismatchError, match="weights digest"):
        load_teacher(other_teacher_dir, source, cpu=True).check_store(store.meta, "here")
    fed_otherwise = {**store.meta.teacher, "contract": {"mean": [0.5], "std": [0.5], "origin": "x"}}
    with pytest.raises(StoreMismatchError, match="mean"):
        writer.check_store(store.meta.replace(teacher=fed_otherwise), "here")
