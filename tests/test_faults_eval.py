"""Issue 20 rows 9-12: eval and verify use what the store and the contract say.

- 9: a named model is evaluated at its contract's size, else the store's recipe's, else `--size`
  (required: one `error:` line), and the size and crop are said;
- 10: agreement with the teacher is measured on the views its test predictions were made on
  (recorded in `meta.test`; older stores: the recipe's), and the JSON says which crop each number used;
- 11: an interpolation other than the bilinear one kdlib renders is said in the contract line;
- 12: `verify` and `eval --shards` take the --mean/--std/--class-map the store's teacher was given;
  a different one given explicitly is still refused.

Every case runs the real CLI (`python -m kdlib`) on real image folders and real stores.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import torchvision
from conftest import REPO
from PIL import Image

from kdlib.contract import InputContract

# Nets whose answer is the brightest channel: a view that keeps an image's blue border answers blue,
# one that crops it away answers the interior's red, so agreement depends on which views are compared.
FACTORIES = textwrap.dedent("""
    import torch
    from torch import nn

    def _brightest():
        net = nn.Sequential(nn.Conv2d(3, 3, 1, bias=False), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        with torch.no_grad():
            net[0].weight.copy_(torch.eye(3).view(3, 3, 1, 1))
        return net

    def attrs():                # its contract has mean/std but no size (pretrained weights, no more said)
        return _brightest()
    attrs.mean = (0.0, 0.0, 0.0)
    attrs.std = (1.0, 1.0, 1.0)

    def timmlike():             # as timm's pretrained_cfg says: size 20, crop 0.875, bicubic
        return _brightest(), {"mean": [0, 0, 0], "std": [1, 1, 1], "input_size": [3, 20, 20],
                              "crop_pct": 0.875, "interpolation": "bicubic"}

    def fixed():                # takes 20 x 20 views only
        torch.manual_seed(0)
        net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 20 * 20, 3))
        return net, {"mean": [0.5] * 3, "std": [0.5] * 3, "input_size": [3, 20, 20]}

    def wide():                 # 5 outputs, no class names, no contract: needs --mean/--std and --class-map
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
""")

RECIPE = (
    "name: t\nsize: 32\ncrop: inception\nscale: [0.5, 1.0]\nflip: true\nmix: none\nimages_per_group: 1\n"
    "crops_per_image: 1\nseed: 0\ncenter_fraction: 1.0\n"
)
CLASSES = ["a", "b", "c"]


def _image(rng: np.random.Generator, ringed: bool) -> np.ndarray:
    """40 x 40 RGB: a red interior inside a 4 px pure-blue ring (the full view answers blue, a 0.875
    center crop red), or a plain random colour."""
    if not ringed:
        return np.broadcast_to(rng.integers(0, 256, 3, dtype=np.uint8), (40, 40, 3)).copy()
    img = np.zeros((40, 40, 3), np.uint8)
    img[..., 2] = 255
    img[4:36, 4:36] = (130, 0, 0)
    return img


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    mods = tmp_path_factory.mktemp("mods")
    (mods / "kd_faults_eval.py").write_text(FACTORIES)
    path = os.pathsep.join(p for p in (str(mods), str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {
        **{k: v for k, v in os.environ.items() if k not in ("KDLIB_DEBUG",)},
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONPATH": path,
    }


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A folder of 3 classes x 4 images per split (class c's ringed: blue on the full view), and the recipe."""
    root = tmp_path_factory.mktemp("eval20")
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in CLASSES:
            (root / "data" / split / c).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(_image(rng, ringed=c == "c")).save(root / "data" / split / c / f"{i}.png")
    (root / "r.yaml").write_text(RECIPE)
    return root


def kdlib(env: dict, cwd: Path, *args: str, code: int = 0) -> subprocess.CompletedProcess:
    p = subprocess.run(
        [sys.executable, "-m", "kdlib", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert p.returncode == code, f"kdlib {' '.join(args)}: exit {p.returncode}, wanted {code}\n{p.stderr[-3000:]}"
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    return p


def one_error(p: subprocess.CompletedProcess, *words: str) -> str:
    """The single `error:` line, the last of stderr, holding every one of `words`."""
    errors = [line for line in p.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), last
    for w in words:
        assert w in last, (w, last)
    return last


def precompute(env: dict, work: Path, out: str, *teacher: str) -> dict:
    kdlib(env, work, "precompute", *teacher, "--data", "data", "--recipe", "r.yaml", "--out", out, "--workers", "0")
    return json.loads((work / out / "meta.json").read_text())


def evaluate(env: dict, work: Path, *args: str) -> tuple[dict, str]:
    p = kdlib(env, work, "eval", "--data", "data", "--workers", "0", *args)
    return json.loads(p.stdout), p.stderr


# -- row 9: the view size of a named model ---------------------------------------------------------
def test_named_model_without_a_size_needs_one(env, work):
    model = ["--model", "kd_faults_eval:attrs"]
    p = kdlib(env, work, "eval", *model, "--data", "data", "--workers", "0", code=2)
    one_error(p, "kd_faults_eval:attrs", "gives no view size", "--size N", "--shards")
    res, err = evaluate(env, work, *model, "--size", "24")
    assert res["size"] == 24 and res["crop"] == 1.0 and res["images"] == 12
    assert "eval kd_faults_eval:attrs views: 24 px (--size), center crop 1" in err
    assert "teacher kd_faults_eval:attrs input: mean [0, 0, 0], std [1, 1, 1]" in err  # as precompute says it
    # the contract's size when it has one, and its crop
    res, err = evaluate(env, work, "--model", "kd_faults_eval:timmlike")
    assert (res["size"], res["crop"]) == (20, 0.875)
    assert "views: 20 px (its input contract, from the config returned by kd_faults_eval:timmlike)" in err


def test_named_model_takes_the_store_recipe_size(env, work):
    precompute(env, work, "s_attrs", "--teacher", "kd_faults_eval:attrs")
    res, err = evaluate(env, work, "--model", "kd_faults_eval:attrs", "--shards", "s_attrs")
    assert (res["size"], res["crop"]) == (32, 1.0)
    assert "views: 32 px (the recipe of store" in err
    # the model is the store's teacher, on the very views of its test predictions
    assert res["agreement"] == 1.0 and (res["agreement_size"], res["agreement_crop"]) == (32, 1.0)
    assert res["teacher_top1"] == res["top1"]


# -- row 10: agreement on the store's views ----------------------------------------------------------
def test_agreement_is_measured_on_the_store_views(env, work):
    meta = precompute(env, work, "s_timm", "--teacher", "kd_faults_eval:timmlike")
    assert meta["test"]["size"] == 32 and meta["test"]["center_fraction"] == 1.0 and meta["test"]["decoder"] == "pil"
    plain, _ = evaluate(env, work, "--model", "kd_faults_eval:timmlike")
    res, _ = evaluate(env, work, "--model", "kd_faults_eval:timmlike", "--shards", "s_timm")
    # top-1 on the contract's views (20 px, crop 0.875); agreement on the store's (32 px, crop 1.0)
    assert (res["size"], res["crop"], res["top1"]) == (20, 0.875, plain["top1"])
    assert (res["agreement_size"], res["agreement_crop"]) == (32, 1.0)
    assert res["agreement"] == 1.0  # the teacher agrees with itself; on its own 20 px crops it would not
    # the ringed images (class c, blue) answer otherwise on the two views: right on the store's, red on 0.875 crops
    assert res["teacher_top1"] == round(res["top1"] + 4 / 12, 6)

    # a store from before meta.test recorded its views: the recipe's, as precompute used
    old = work / "s_timm_old"
    shutil.copytree(work / "s_timm", old)
    m = json.loads((old / "meta.json").read_text())
    m["test"] = {k: v for k, v in m["test"].items() if k in ("source", "views")}
    (old / "meta.json").write_text(json.dumps(m))
    again, _ = evaluate(env, work, "--model", "kd_faults_eval:timmlike", "--shards", str(old))
    assert again == res and (again["agreement_size"], again["agreement_crop"]) == (32, 1.0)


def test_no_agreement_when_the_store_views_cannot_be_used(env, work):
    if not (work / "s_timm" / "meta.json").is_file():
        precompute(env, work, "s_timm", "--teacher", "kd_faults_eval:timmlike")
    # a model that takes 20 px views only: the store's 32 px views are not for it, and it says so
    res, _ = evaluate(env, work, "--model", "kd_faults_eval:fixed", "--shards", "s_timm")
    assert res["size"] == 20 and "agreement" not in res and "teacher_top1" not in res
    assert "32 px views" in res["agreement_note"] and "cannot take" in res["agreement_note"]
    # another split than the one the predictions were made on
    res, _ = evaluate(env, work, "--model", "kd_faults_eval:timmlike", "--shards", "s_timm", "--split", "train")
    assert "agreement" not in res and "another source" in res["agreement_note"]


# -- row 11: the interpolation the weights expect ----------------------------------------------------
def test_contract_line_says_the_interpolation_is_not_applied(env, work):
    c = InputContract((0.5,), (0.5,), origin="x", interpolation="bicubic")
    assert "interpolation bicubic expected, views are rendered bilinear" in c.describe()
    assert "expected" not in c.replace(interpolation="bilinear").describe()
    assert "bilinear" in c.replace(interpolation="bilinear").describe()
    _, err = evaluate(env, work, "--model", "kd_faults_eval:timmlike")
    line = next(x for x in err.splitlines() if x.startswith("teacher kd_faults_eval:timmlike input:"))
    assert "size 20, crop 0.875, interpolation bicubic expected, views are rendered bilinear" in line


# -- row 12: the store's --mean/--std/--class-map by default ------------------------------------------
def _resnet18_weights(path: Path, seed: int) -> str:
    """A torchvision resnet18 of 3 classes saved as a bare state dict: no contract, so --mean/--std are needed."""
    torch.manual_seed(seed)
    safetensors.torch.save_file(torchvision.models.resnet18(num_classes=3).state_dict(), str(path))
    return str(path)


def test_verify_and_eval_take_the_store_mean_std(env, work):
    w = _resnet18_weights(work / "r18.safetensors", 0)
    teacher = ["--teacher", "resnet18", "--weights", w]
    p = kdlib(env, work, "precompute", *teacher, "--data", "data", "--recipe", "r.yaml", "--out", "s_r18", code=2)
    one_error(p, "--mean and --std")
    meta = precompute(env, work, "s_r18", *teacher, "--mean", "imagenet", "--std", "imagenet")
    assert meta["teacher"]["contract"]["origin"] == "--mean/--std"

    p = kdlib(env, work, "verify", "--shards", "s_r18", *teacher, "--views", "8")
    assert json.loads(p.stdout)["ok"] is True
    assert "--mean/--std (mean [0.485, 0.456, 0.406], std [0.229, 0.224, 0.225]) not given" in p.stderr
    assert "taken from store s_r18" in p.stderr
    # one of the two given, the other from the store
    assert json.loads(kdlib(env, work, "verify", "--shards", "s_r18", *teacher, "--mean", "imagenet").stdout)["ok"]
    # an explicitly different one is still refused
    p = kdlib(env, work, "verify", "--shards", "s_r18", *teacher, "--mean", "0.5", "--std", "0.5", code=2)
    one_error(p, "store s_r18 was written with the teacher fed mean [0.485", "mean [0.5]")

    # eval --shards: the store's teacher, with the store's normalisation, at the store's views
    res, err = evaluate(env, work, "--model", "resnet18", "--weights", w, "--shards", "s_r18")
    assert res["agreement"] == 1.0 and res["teacher_top1"] == res["top1"] and res["size"] == 32
    assert "not given, taken from store s_r18" in err
    # another resnet18 is not that teacher: the store's mean/std are not its, so it must be told
    other = _resnet18_weights(work / "r18-other.safetensors", 1)
    p = kdlib(
        env, work, "eval", "--model", "resnet18", "--weights", other, "--data", "data", "--shards", "s_r18", code=2
    )
    one_error(p, "--mean, --std taken from the store are that teacher's: give them for resnet18")
    res, _ = evaluate(
        env, work, "--model", "resnet18", "--weights", other, "--shards", "s_r18", "--mean", "0.5", "--std", "0.5"
    )
    assert 0 <= res["agreement"] <= 1


def test_verify_and_eval_take_the_store_class_map(env, work):
    (work / "map.json").write_text(json.dumps({"a": 4, "b": 0, "c": 2}))
    teacher = ["--teacher", "kd_faults_eval:wide"]
    p = kdlib(env, work, "precompute", *teacher, "--data", "data", "--recipe", "r.yaml", "--out", "s_wide", code=2)
    one_error(p, "--mean and --std")
    flags = ["--mean", "0.5", "--std", "0.25"]
    p = kdlib(env, work, "precompute", *teacher, *flags, "--data", "data", "--out", "s_wide", code=2)
    one_error(p, "has 5 classes, the data has 3", "--class-map")
    meta = precompute(env, work, "s_wide", *teacher, *flags, "--class-map", "map.json")
    assert meta["teacher"]["config"]["class_index"] == [4, 0, 2] and meta["teacher"]["config"]["net_classes"] == 5

    p = kdlib(env, work, "verify", "--shards", "s_wide", *teacher, "--views", "8")
    assert json.loads(p.stdout)["ok"] is True
    assert "--class-map (its 3 data classes to the teacher's 5 outputs) not given" in p.stderr
    assert "--mean/--std (mean [0.5], std [0.25])" in p.stderr
    # the same map given again is fine; another is refused, naming both
    assert json.loads(kdlib(env, work, "verify", "--shards", "s_wide", *teacher, "--class-map", "map.json").stdout)[
        "ok"
    ]
    (work / "other.json").write_text(json.dumps({"a": 0, "b": 1, "c": 2}))
    p = kdlib(env, work, "verify", "--shards", "s_wide", *teacher, "--class-map", "other.json", code=2)
    one_error(p, "store s_wide was written with the teacher's outputs mapped", "[4, 0, 2]", "[0, 1, 2]")

    res, err = evaluate(env, work, "--model", "kd_faults_eval:wide", "--shards", "s_wide", "--size", "32")
    assert res["agreement"] == 1.0 and res["teacher_top1"] == res["top1"]
    assert "--class-map" in err and "taken from store s_wide" in err
