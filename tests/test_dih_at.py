"""DIH head labels and attention maps through the real stages: store (v2), verify, inspect, train cached and online."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import FMNIST_RECIPE, LIMIT

from kdlib.errors import ConfigError, StoreError, StoreMismatchError

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "data" / "golden-v1"
STAGES = "stage1,stage2,stage3"


def _steps(path: Path) -> list[dict]:
    return [json.loads(x) for x in (path / "steps.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def dih_store(headed_teacher_dir, tmp_path_factory) -> str:
    """A store from the headed teacher: k = 3 < 10 classes, q8 logits, attention maps at 3 stages (q8, 7x7)."""
    from kdlib.precompute import PrecomputeConfig, precompute

    out = tmp_path_factory.mktemp("dih") / "s"
    precompute(
        PrecomputeConfig(
            teacher=headed_teacher_dir,
            data="fashion-mnist",
            out=str(out),
            recipe=FMNIST_RECIPE,
            epochs=1,
            k=3,
            limit=LIMIT,
            workers=0,
            chunk_views=64,
            logit_codec="q8",
            attention=STAGES,
            attention_grid=7,
            attention_codec="q8",
        )
    )
    return str(out)


def test_precompute_stores_one_label_set_per_head_and_verify_checks_each(dih_store, headed_teacher_dir):
    from kdlib.store import ChunkCache, open_store
    from kdlib.store.codecs import AttentionCodec, HeadsCodec, Tolerance
    from kdlib.teacher import load_teacher
    from kdlib.verify import verify

    store = open_store(dih_store)
    meta = store.meta
    assert meta.format_version == 2 and meta.heads == ["blocks.0", "blocks.1", "blocks.2"]
    assert meta.attention == {"layers": ["blocks.0", "blocks.1", "blocks.2"], "grid": 7, "codec": "q8"}
    raw = store.read_chunk(0, 0)
    for j in (1, 2, 3):
        assert raw[f"h{j}_ids"].shape == (64, 3) and raw[f"h{j}_logits"].dtype == np.uint8
        assert raw[f"h{j}_top"].dtype == np.float16 and raw[f"h{j}_lse"].dtype == np.float32
        assert raw[f"at{j}"].shape == (64, 49) and raw[f"at{j}"].dtype == np.uint8
    # the heads say something else than the main classifier (or they would not be worth storing)
    assert any((raw[f"h{j}_ids"] != raw["ids"]).any() for j in (1, 2, 3))

    result = verify(dih_store, headed_teacher_dir, views=128)
    assert result["ok"] and [h["ok"] for h in result["heads"]] == [True] * 3
    assert [m["ok"] for m in result["attention"]] == [True] * 3
    assert all(h["top1_agreement"] == 1.0 for h in result["heads"])

    # the check can fail: one head's stored logits off by a nat, one map shifted by a cell
    cols = ChunkCache(store).views(0, 0, 64)
    from kdlib.plan import PARAM_FIELDS
    from kdlib.render import render_views
    from kdlib.source import open_source

    src = open_source("fashion-mnist", "train", LIMIT)
    teacher = load_teacher(headed_teacher_dir, src, cpu=True)
    teacher.check_store(meta, dih_store)
    teacher.tap(meta.attention["layers"], meta.attention["grid"], meta.attention["codec"])
    fresh = teacher.forward(render_views({k: cols[k] for k in PARAM_FIELDS}, src.decode, 28, meta.group_size)).cpu()
    bad = dict(cols, h2_logits=cols["h2_logits"] + np.float32(1.0), at3=np.roll(cols["at3"], 1, axis=1))
    tol = Tolerance(1.0, 2e-3, 2.0**-11)  # verify's fp32 bounds
    heads, maps = HeadsCodec().verify(fresh, bad, meta, tol), AttentionCodec().verify(fresh, bad, meta, tol)
    assert [h["ok"] for h in heads["heads"]] == [True, False, True]
    assert [m["ok"] for m in maps["attention"]] == [True, True, False] and not (heads["ok"] and maps["ok"])


def test_inspect_reports_bytes_per_head_and_per_map(dih_store):
    from kdlib.inspect import format_report, inspect_store

    r = inspect_store(dih_store)
    assert [h["layer"] for h in r["heads"]] == ["blocks.0", "blocks.1", "blocks.2"]
    main_label_bytes = r["bytes_per_view"]["labels"]
    for h in r["heads"]:  # about one more label set per head
        assert 0.5 * main_label_bytes < h["bytes_per_view"] < 2.0 * main_label_bytes
        assert 0 <= h["tail_mass_mean"] <= 1 and 0 <= h["top1_agreement_with_main"] <= 1
    for m in r["attention"]:  # 49 uint8 values per view, compressed a little at most
        assert m["grid"] == 7 and m["codec"] == "q8" and 10 < m["bytes_per_view"] < 60
    total = r["bytes_per_view"]["total"]
    parts = r["bytes_per_view"]["params"] + main_label_bytes + r["bytes_per_view"]["sample"]
    assert (
        abs(
            total
            - parts
            - sum(h["bytes_per_view"] for h in r["heads"])
            - sum(m["bytes_per_view"] for m in r["attention"])
        )
        < 1e-6
    )
    text = format_report(r)
    assert "DIH heads (3" in text and "head 2 blocks.1" in text and "map 3 blocks.2" in text and "7x7 q8" in text


def test_maps_of_flipped_and_mixed_views_are_the_maps_of_those_rendered_views(dih_store, headed_teacher_dir):
    """A stored map belongs to the rendered view: recomputing it on the replayed pixels gives it back."""
    from kdlib._layers import LayerTaps
    from kdlib.attention import attention_map
    from kdlib.plan import PARAM_FIELDS
    from kdlib.render import render_views
    from kdlib.resolve import load_model
    from kdlib.source import open_source
    from kdlib.store import ChunkCache, open_store

    store = open_store(dih_store)
    cols = ChunkCache(store).views(0, 0, 128)
    flip, mixed = cols["flip"].astype(bool), cols["mix"] != 0
    assert flip.any() and mixed.any() and (flip & ~mixed).any()
    model = load_model(headed_teacher_dir)
    taps = LayerTaps(model, STAGES.split(","))
    views = render_views(
        {k: cols[k] for k in PARAM_FIELDS},
        open_source("fashion-mnist", "train", LIMIT).decode,
        28,
        store.meta.group_size,
    )
    with torch.inference_mode():
        model(views)
        fresh = [attention_map(a, 7) for a in taps.outputs]
        model(torch.flip(views, dims=[-1]))  # the same views flipped once more: the wrong pixels
        wrong = [attention_map(a, 7) for a in taps.outputs]
    for i in range(3):
        stored = torch.from_numpy(cols[f"at{i + 1}"])
        err = (stored - fresh[i]).abs().amax(1)
        assert float(err.max()) <= 2 / 255  # q8 rounding, for flipped, mixed and plain views alike
        assert float(err[flip].max()) <= 2 / 255 and float(err[mixed].max()) <= 2 / 255
        assert float((stored - wrong[i]).abs().amax(1)[flip].median()) > 4 / 255  # and the alignment matters


def _parity(tmp_path: Path, teacher: str, store_kw: dict, train_kw: dict) -> None:
    from kdlib.precompute import PrecomputeConfig, precompute
    from kdlib.train import TrainConfig, train

    # k = 10 = classes and fp16 maps: the only difference between the two paths is fp16 storage
    precompute(
        PrecomputeConfig(
            teacher=teacher,
            data="fashion-mnist",
            out=str(tmp_path / "s"),
            recipe=FMNIST_RECIPE,
            epochs=1,
            k=10,
            limit=LIMIT,
            workers=0,
            chunk_views=64,
            **store_kw,
        )
    )
    common = dict(student="resnet8", epochs=1, batch_size=32, workers=0, eval=False, seed=5, **train_kw)
    train(TrainConfig(out=str(tmp_path / "cached"), shards=str(tmp_path / "s"), **common))
    train(
        TrainConfig(
            out=str(tmp_path / "online"),
            teacher=teacher,
            data="fashion-mnist",
            recipe=FMNIST_RECIPE,
            limit=LIMIT,
            attention_grid=store_kw.get("attention_grid"),
            **common,
        )
    )
    cached, online = _steps(tmp_path / "cached"), _steps(tmp_path / "online")
    assert [s["views"] for s in cached] == [s["views"] for s in online]
    for a, b in list(zip(cached, online))[:3]:
        assert abs(a["loss"] - b["loss"]) <= 2e-3 * abs(b["loss"]) + 1e-6, (a, b)
    assert cached[0]["loss"] != online[0]["loss"] or cached[1]["loss"] != online[1]["loss"]  # really two paths


def test_dih_online_and_cached_losses_agree_within_fp16(headed_teacher_dir, tmp_path):
    _parity(tmp_path, headed_teacher_dir, {}, {"loss": "dih"})


def test_attention_online_and_cached_losses_agree_within_fp16(teacher_dir, tmp_path):
    _parity(
        tmp_path, teacher_dir, {"attention": STAGES, "attention_grid": 7}, {"loss": "kl", "attention_student": STAGES}
    )
    # the AT term is really there: the same run without it has a smaller loss
    from kdlib.train import TrainConfig, train

    train(
        TrainConfig(
            out=str(tmp_path / "plain"),
            shards=str(tmp_path / "s"),
            student="resnet8",
            epochs=1,
            batch_size=32,
            workers=0,
            eval=False,
            seed=5,
            loss="kl",
        )
    )
    assert _steps(tmp_path / "plain")[0]["loss"] < _steps(tmp_path / "cached")[0]["loss"]


def test_a_v1_store_still_trains(tmp_path):
    from kdlib.store import open_store
    from kdlib.train import TrainConfig, train

    copy = tmp_path / "golden"
    shutil.copytree(GOLDEN / "zarr", copy)
    assert open_store(str(copy)).meta.format_version == 1 and open_store(str(copy)).meta.heads == []
    result = train(
        TrainConfig(
            out=str(tmp_path / "r"), shards=str(copy), student="resnet8", epochs=1, batch_size=64, workers=0, eval=False
        )
    )
    assert result["steps"] == 4 and all(np.isfinite(s["loss"]) for s in _steps(tmp_path / "r"))
    # and it says clearly what a v1 store cannot do
    with pytest.raises(ConfigError, match=r"--loss dih needs a teacher with heads.*kdlib heads"):
        train(TrainConfig(out=str(tmp_path / "d"), shards=str(copy), loss="dih", workers=0, eval=False))
    with pytest.raises(ConfigError, match=r"needs attention maps in the store.*--attention"):
        train(TrainConfig(out=str(tmp_path / "a"), shards=str(copy), attention_student="stage1", workers=0, eval=False))


def test_store_meta_v2_checks():
    from kdlib.store import StoreMeta
    from kdlib.store.format import check_compatible

    d = json.loads((GOLDEN / "zarr" / "meta.json").read_text())
    v1 = StoreMeta.from_dict(d)
    assert v1.fields.keys() == StoreMeta.from_dict({**d, "format_version": 2}).fields.keys()  # nothing new
    v2 = StoreMeta.from_dict(
        {
            **d,
            "format_version": 2,
            "heads": ["blocks.0", "blocks.1"],
            "attention": {"layers": ["blocks.2"], "grid": 4, "codec": "fp16"},
        }
    )
    new = sorted(set(v2.fields) - set(v1.fields))
    assert new == ["at1", "h1_ids", "h1_logits", "h1_lse", "h2_ids", "h2_logits", "h2_lse"]
    assert v2.fields["at1"] == ("float16", (16,)) and v2.fields["h2_ids"] == ("uint8", (3,))
    with pytest.raises(StoreError, match="format_version.*1 cannot hold heads"):
        StoreMeta.from_dict({**d, "heads": ["blocks.0"]})
    with pytest.raises(StoreError, match="attention"):
        StoreMeta.from_dict({**d, "format_version": 2, "attention": {"layers": [], "grid": 4, "codec": "fp16"}})
    with pytest.raises(StoreMismatchError, match="DIH heads"):
        check_compatible(v1, v1.replace(format_version=2, heads=["blocks.0"]), "s")


@pytest.mark.parametrize("name", ["dih", "at"])
def test_recipes_open_with_their_command_and_run_tiny(name, teacher_dir, headed_teacher_dir, tmp_path):
    from kdlib.precompute import PrecomputeConfig, precompute
    from kdlib.train import resolve_config, train

    recipe_file, train_file = REPO / "precompute" / f"{name}.yaml", REPO / "train" / f"{name}.yaml"
    for f in (recipe_file, train_file):
        first = f.read_text().splitlines()[:3]
        assert any("kdlib " in line and f"{name}.yaml" in line for line in first), f"{f} must open with its command"
    command = " ".join(recipe_file.read_text().splitlines()[:4])
    extra = {}
    if name == "at":
        assert f"--attention {STAGES} --attention-grid 7" in command
        extra = {"attention": STAGES, "attention_grid": 7}
    else:
        assert "kdlib heads" in command and "--teacher runs/teacher-heads" in command
    teacher = headed_teacher_dir if name == "dih" else teacher_dir
    precompute(
        PrecomputeConfig(
            teacher=teacher,
            data="fashion-mnist",
            out=str(tmp_path / "s"),
            recipe=str(recipe_file),
            epochs=1,
            limit=64,
            workers=0,
            chunk_views=64,
            **extra,
        )
    )
    given = {"out", "shards", "epochs", "batch_size", "workers", "eval"}
    cfg = resolve_config(
        {
            "out": str(tmp_path / "r"),
            "shards": str(tmp_path / "s"),
            "epochs": 1,
            "batch_size": 64,
            "workers": 0,
            "eval": False,
        },
        given,
        str(train_file),
    )
    values = yaml.safe_load(train_file.read_text())
    assert cfg.loss == values["loss"] and cfg.epochs == 1
    if name == "dih":
        assert (cfg.dih_alpha, cfg.dih_temperature) == (0.1, 5.0)
    else:
        assert cfg.attention_student == STAGES and cfg.attention_weight == 1e3
    assert train(cfg)["steps"] == 1


def test_online_attention_refuses_unpaired_layers(teacher_dir, tmp_path):
    from kdlib.train import TrainConfig, train

    with pytest.raises(ConfigError, match=r"names 2 layer\(s\), the teacher has 3.*one to one"):
        train(
            TrainConfig(
                out=str(tmp_path / "o"),
                teacher=teacher_dir,
                data="fashion-mnist",
                recipe=FMNIST_RECIPE,
                limit=64,
                batch_size=32,
                attention_student="stage1,stage2",
                attention_teacher=STAGES,
                workers=0,
                eval=False,
            )
        )


def test_both_backends_hold_the_same_heads_and_maps(headed_teacher_dir, tmp_path):
    from kdlib.precompute import PrecomputeConfig, precompute
    from kdlib.store import ChunkCache

    stores = {
        b: precompute(
            PrecomputeConfig(
                teacher=headed_teacher_dir,
                data="fashion-mnist",
                out=str(tmp_path / b),
                recipe=FMNIST_RECIPE,
                epochs=1,
                k=3,
                limit=64,
                workers=0,
                chunk_views=64,
                backend=b,
                attention="stage3",
                attention_grid=4,
                test=False,
            )
        )
        for b in ("zarr", "wds")
    }
    assert stores["zarr"].content_digest() == stores["wds"].content_digest()
    cols = ChunkCache(stores["wds"]).views(0, 0, 64)
    assert cols["h3_ids"].shape == (64, 3) and cols["at1"].shape == (64, 16) and cols["at1"].dtype == np.float32
    assert set(stores["wds"].bytes_on_disk()) >= {"h1_ids", "h2_logits", "h3_lse", "at1"}


def test_command_line_precompute_attention_inspect_train(teacher_dir, tmp_path):
    import subprocess
    import sys

    def kdlib(*args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "kdlib", *args], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    kdlib(
        "precompute",
        "--teacher",
        teacher_dir,
        "--data",
        "fashion-mnist",
        "--recipe",
        FMNIST_RECIPE,
        "--epochs",
        "1",
        "--limit",
        "64",
        "--workers",
        "0",
        "--attention",
        "stage2,stage3",
        "--attention-grid",
        "4",
        "--attention-codec",
        "q8",
        "--out",
        str(tmp_path / "s"),
    )
    report = json.loads(kdlib("inspect", str(tmp_path / "s"), "--json"))
    assert [(m["layer"], m["grid"], m["codec"]) for m in report["attention"]] == [
        ("blocks.1", 4, "q8"),
        ("blocks.2", 4, "q8"),
    ]
    kdlib(
        "train",
        "--shards",
        str(tmp_path / "s"),
        "--attention-student",
        "stage2,stage3",
        "--attention-weight",
        "9",
        "--loss",
        "ce",
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--workers",
        "0",
        "--no-eval",
        "--out",
        str(tmp_path / "r"),
    )
    cfg = json.loads((tmp_path / "r" / "train_config.json").read_text())
    assert cfg["attention_student"] == "stage2,stage3" and cfg["attention_weight"] == 9.0 and cfg["loss"] == "ce"
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "kdlib",
            "train",
            "--shards",
            str(tmp_path / "s"),
            "--loss",
            "dih",
            "--out",
            str(tmp_path / "x"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("error: --loss dih needs a teacher with heads")
    assert "Traceback" not in bad.stderr
