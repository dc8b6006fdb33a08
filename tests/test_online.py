"""The online baseline (teacher in memory) and cached training see the same views and the same loss."""

from __future__ import annotations

import json

from conftest import FMNIST_RECIPE, LIMIT


def _steps(path):
    return [json.loads(x) for x in (path / "steps.jsonl").read_text().splitlines()]


def test_online_and_cached_losses_agree_within_fp16(teacher_dir, tmp_path):
    from kdlib.precompute import PrecomputeConfig, precompute
    from kdlib.train import TrainConfig, train

    # k = 10 = classes: the store holds every logit in fp16, so the only difference is fp16 storage
    precompute(
        PrecomputeConfig(
            teacher=teacher_dir,
            data="fashion-mnist",
            out=str(tmp_path / "s"),
            recipe=FMNIST_RECIPE,
            epochs=1,
            k=10,
            limit=LIMIT,
            workers=0,
            chunk_views=64,
        )
    )
    common = dict(student="resnet8", epochs=1, batch_size=32, workers=0, eval=False, seed=5, loss="kl", temperature=2.0)
    train(TrainConfig(out=str(tmp_path / "cached"), shards=str(tmp_path / "s"), **common))
    train(
        TrainConfig(
            out=str(tmp_path / "online"),
            teacher=teacher_dir,
            data="fashion-mnist",
            recipe=FMNIST_RECIPE,
            limit=LIMIT,
            **common,
        )
    )
    cached, online = _steps(tmp_path / "cached"), _steps(tmp_path / "online")
    assert [s["views"] for s in cached] == [s["views"] for s in online]  # the same plan, the same views
    for a, b in list(zip(cached, online))[:3]:
        assert abs(a["loss"] - b["loss"]) <= 2e-3 * abs(b["loss"]) + 1e-6, (a, b)
    assert cached[0]["loss"] != online[0]["loss"] or cached[1]["loss"] != online[1]["loss"]  # really two paths


def test_online_teacher_takes_the_contract_flags_precompute_takes(teacher_dir, tmp_path):
    """An arch-name teacher with weights and its own normalisation: online KD feeds it exactly what
    precompute fed it (same losses up to fp16 storage); another --teacher-mean changes what it sees."""
    import pytest
    from safetensors.torch import load_file, save_file

    from kdlib.errors import ConfigError
    from kdlib.precompute import PrecomputeConfig, precompute
    from kdlib.train import TrainConfig, train

    weights = str(tmp_path / "plain.safetensors")  # bare tensors: no kdlib metadata, so no contract of their own
    save_file(
        {
            k.removeprefix("net."): v
            for k, v in load_file(f"{teacher_dir}/model.safetensors").items()
            if k not in ("mean", "std")
        },
        weights,
    )
    precompute(
        PrecomputeConfig(
            teacher="resnet8",
            weights=weights,
            mean="0.5",
            std="0.25",
            data="fashion-mnist",
            out=str(tmp_path / "s"),
            recipe=FMNIST_RECIPE,
            epochs=1,
            k=10,
            limit=LIMIT,
            workers=0,
            chunk_views=64,
            test=False,
        )
    )
    common = dict(student="resnet8", epochs=1, batch_size=32, workers=0, eval=False, seed=5, loss="kl")
    train(TrainConfig(out=str(tmp_path / "cached"), shards=str(tmp_path / "s"), **common))
    online = dict(
        teacher="resnet8", teacher_weights=weights, data="fashion-mnist", recipe=FMNIST_RECIPE, limit=LIMIT, **common
    )
    train(TrainConfig(out=str(tmp_path / "online"), teacher_mean="0.5", teacher_std="0.25", **online))
    train(TrainConfig(out=str(tmp_path / "other"), teacher_mean="0.4", teacher_std="0.25", **online))
    cached, same, other = (_steps(tmp_path / d) for d in ("cached", "online", "other"))
    for a, b in list(zip(cached, same))[:3]:
        assert abs(a["loss"] - b["loss"]) <= 2e-3 * abs(b["loss"]) + 1e-6, (a, b)
    assert abs(other[0]["loss"] - same[0]["loss"]) > 1e-3  # the normalisation reached the teacher
    with pytest.raises(ConfigError, match="--teacher-mean"):
        train(TrainConfig(out=str(tmp_path / "x"), shards=str(tmp_path / "s"), teacher_mean="0.5", **common))
