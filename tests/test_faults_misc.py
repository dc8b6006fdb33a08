"""Issue 20, rows 4 and 13-15: a batch of views too big for the memory where it is made is one line
before anything is allocated; `inspect` shows a mapped teacher's outputs, input contract, class map
and renormalised soft labels; named timm weights are looked for in the standard Hugging Face hub
cache layout, which the message names; two messages read right.

Each case runs the real CLI (`python -m kdlib`) or the library on real files: Fashion-MNIST, image
folders, a store precomputed from a 1000-class teacher, a Hugging Face cache laid out on disk.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import torchvision
from conftest import FMNIST_RECIPE, LIMIT
from PIL import Image

from kdlib.classmap import resolve_class_map
from kdlib.errors import ModelError
from kdlib.feed import MEMORY_SHARE, check_fits, feed_bytes, memory_available
from kdlib.render import RENDERER
from kdlib.resolve import resolve_model

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.pop("KDLIB_DEBUG", None)
    return env


def _kdlib(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kdlib", *map(str, args)],
        cwd=cwd,
        env=env or _env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def _measured(args: list[str], cwd: Path) -> tuple[int, str, float, int]:
    """`python -m kdlib *args`: (exit status, stderr, seconds, peak resident bytes of the process)."""
    err = cwd / "stderr.txt"
    start = time.monotonic()
    with open(err, "w") as e:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kdlib", *args], cwd=cwd, env=_env(), stdout=subprocess.DEVNULL, stderr=e
        )
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, err.read_text(), time.monotonic() - start, usage.ru_maxrss * 1024


def _one_line(code: int, stderr: str, rc: int) -> str:
    assert rc == code, f"exit {rc}, wanted {code}:\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), last
    return last


def _recipe(tmp_path: Path, size: int) -> Path:
    text = Path(FMNIST_RECIPE).read_text()
    path = tmp_path / f"size{size}.yaml"
    path.write_text(re.sub(r"(?m)^size: \d+$", f"size: {size}", text))
    return path


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB"


# -- row 4: a batch of views that cannot fit is refused before anything is allocated -----------------
def _train_args(recipe: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", "fashion-mnist", "--recipe", str(recipe), "--loss", "ce", "--limit", str(LIMIT)] + [
        "--epochs",
        "1",
        "--no-eval",
        "--cpu",
        "--out",
        str(out),
        *extra,
    ]


def _check_refusal(line: str, views: int, size: int, need: int, group: int, fits: int | None) -> None:
    """The line names the batch, the size, the bytes needed and the memory there, and a batch that fits."""
    head = f"error: a batch of {views} views of {size}x{size} px (1 channel) needs {_gib(need)} on the cpu "
    assert line.startswith(head), line
    room = re.search(r"the cpu has ([\d.]+ [GM]iB) available, of which at most 50% may go to views", line)
    assert room, line
    if fits is None:  # what this machine allows: not known in advance
        m = re.search(r"use --batch-size (\d+) or less \(or fewer --workers\), or a smaller size in the recipe$", line)
        assert m or line.endswith(f"even one group of {group} views does not fit: use a smaller size in the recipe"), (
            line
        )
        fits = int(m.group(1)) if m else 0
    if fits:  # the suggestion is whole groups, and it fits the room the line names while one group more does not
        assert fits % group == 0 and fits < views, line
        # (the room as the refusing process measured it, printed to 0.05 GiB: the memory available now differs)
        gib, unit = room.group(1).split()
        measured = float(gib) * (1 << (30 if unit == "GiB" else 20))
        slack = 0.05 * (1 << (30 if unit == "GiB" else 20))
        per_view = need // views
        assert fits * per_view <= MEMORY_SHARE * (measured + slack), line
        assert (fits + group) * per_view > MEMORY_SHARE * (measured - slack), line


@pytest.mark.parametrize("command", ["train", "precompute"])
def test_a_batch_that_cannot_fit_is_one_line_before_anything_is_allocated(tmp_path, teacher_dir, command):
    """16384 px views, the default batch: hundreds of GiB on any machine; refused in seconds, nothing allocated."""
    size, group = 16384, 4
    recipe = _recipe(tmp_path, size)
    if command == "train":
        args, views = _train_args(recipe, tmp_path / "run"), 128
    else:
        args = ["precompute", "--teacher", teacher_dir, "--data", "fashion-mnist", "--recipe", str(recipe)]
        args += ["--limit", str(LIMIT), "--cpu", "--out", str(tmp_path / "store")]
        views = 256
    rc, stderr, seconds, peak = _measured(args, tmp_path)
    line = _one_line(2, stderr, rc)
    # 2 workers x 4 ready + 2 in the feed uint8 views, 4 bytes of float32 model input, per pixel
    need = views * size * size * (2 * 4 + 2 + 4)
    assert need == sum(feed_bytes(views, 1, size, RENDERER, CPU, 2).values())
    _check_refusal(line, views, size, need, group, None)
    assert seconds < 120 and peak < 4 << 30, (seconds, peak)  # one view alone would be 256 MiB, a batch 32 GiB


def test_the_issue_case_size_4096_at_the_default_batch(tmp_path):
    """The row as filed: `size: 4096` at train's default batch (28 GiB where views are made, with 2 workers)."""
    size, views = 4096, 128
    need = sum(feed_bytes(views, 1, size, RENDERER, CPU, 2).values())
    room = memory_available(CPU)
    assert need == 28 << 30 and room is not None and room > 0
    if need <= MEMORY_SHARE * room:
        pytest.skip(f"this machine has room for it ({_gib(room)} available): the 16384 px case covers the refusal")
    rc, stderr, seconds, peak = _measured(_train_args(_recipe(tmp_path, size), tmp_path / "run"), tmp_path)
    line = _one_line(2, stderr, rc)
    _check_refusal(line, views, size, need, 4, None)
    assert seconds < 120 and peak < 4 << 30, (seconds, peak)


def test_a_batch_that_fits_is_unaffected(tmp_path):
    """The demo's recipe at a normal batch trains as before, and its batch is far inside the check."""
    check_fits(128, 4, 1, 28, RENDERER, CPU, 2)
    check_fits(256, 4, 3, 224, RENDERER, CPU, 2)  # an ImageNet teacher's batch: a few hundred MiB
    out = tmp_path / "run"
    p = _kdlib(*_train_args(Path(FMNIST_RECIPE), out, "--batch-size", "32", "--workers", "0"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert (out / "model.safetensors").is_file() and "error" not in p.stderr


def test_feed_bytes_count_where_views_are_made():
    """What each place holds: workers' ready batches on the host, the renderer's working copies."""
    px = 8 * 3 * 64 * 64
    assert feed_bytes(8, 3, 64, "pil-bilinear-1", CPU, 0) == {"cpu": px * 6}  # Pillow in the main process
    assert feed_bytes(8, 3, 64, "roi_align-1", CPU, 0) == {"cpu": px * (6 + 4)}  # float32 crops
    assert feed_bytes(8, 3, 64, "roi_align-1", CPU, 3) == {"cpu": px * (6 + 3 * (4 + 4))}
    assert feed_bytes(8, 3, 64, "pil-bilinear-1", torch.device("meta"), 0, "device") == {"meta": px * (6 + 12)}
    assert memory_available(torch.device("meta")) is None  # not measured: never refused


# -- row 13: inspect shows a mapped teacher's outputs, contract and class map -------------------------
FISH = ["cock", "goldfish", "hammerhead", "hen", "stingray", "tench"]  # ImageNet categories 7, 1, 4, 8, 6, 0


def _folder(root: Path, classes: list[str], per_class: int = 2, size: int = 40) -> str:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return str(root)


def test_inspect_shows_a_mapped_teachers_outputs_contract_and_class_map(tmp_path):
    from kdlib.inspect import inspect_store
    from kdlib.precompute import PrecomputeConfig, precompute
    from kdlib.store import open_store
    from kdlib.store.codecs import decode_chunk

    torch.manual_seed(0)
    weights = tmp_path / "resnet18.safetensors"  # a 1000-class ImageNet net, as a downloaded checkpoint
    safetensors.torch.save_file(torchvision.models.resnet18(num_classes=1000).state_dict(), str(weights))
    data = _folder(tmp_path / "data", FISH)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "name: t\nsize: 32\ncrop: inception\nscale: [0.5, 1.0]\nflip: true\nmix: none\nimages_per_group: 1\n"
        "crops_per_image: 1\nseed: 0\n"
    )
    teacher = "torchvision:resnet18:IMAGENET1K_V1"
    out = tmp_path / "s"
    precompute(
        PrecomputeConfig(
            teacher=teacher,
            weights=str(weights),
            data=data,
            recipe=str(recipe),
            out=str(out),
            k=6,
            workers=0,
            cpu=True,
        )
    )
    r = inspect_store(str(out))
    assert r["teacher_net_classes"] == 1000 and r["num_classes"] == 6
    c = r["teacher_contract"]
    assert (c["mean"], c["std"], c["size"], c["crop_fraction"]) == (IMAGENET_MEAN, IMAGENET_STD, 224, 0.875)
    assert c["origin"] == "torchvision ResNet18_Weights.IMAGENET1K_V1"
    assert c["text"] == (
        "mean [0.485, 0.456, 0.406], std [0.229, 0.224, 0.225], size 224, crop 0.875, bilinear "
        "(from torchvision ResNet18_Weights.IMAGENET1K_V1)"
    )
    cm = r["class_map"]
    assert cm["data_classes"] == 6 and cm["teacher_outputs"] == 1000
    assert [(p["data"], p["name"], p["teacher"]) for p in cm["pairs"]] == [
        (0, "cock", 7),
        (1, "goldfish", 1),
        (2, "hammerhead", 4),
        (3, "hen", 8),
        (4, "stingray", 6),
        (5, "tench", 0),
    ]
    assert cm["soft_labels"] == (
        "renormalised over the 6 mapped outputs (the teacher answers over those only: "
        "its top-k and lse are over them, not over its 1000 outputs)"
    )
    json.dumps(r)
    # what it says is so: every stored soft label's lse is the log-sum-exp of the 6 mapped logits alone
    store = open_store(str(out))
    cols = decode_chunk(store.read_chunk(0, 0), store.meta)
    logits = torch.from_numpy(np.asarray(cols["logits"], np.float32))
    assert torch.allclose(torch.logsumexp(logits, 1), torch.from_numpy(np.asarray(cols["lse"], np.float32)), atol=2e-2)

    text = _kdlib("inspect", str(out)).stdout
    assert "  outputs         1000 (the data has 6 classes)\n" in text
    assert f"  input contract  {c['text']}\n" in text
    assert (
        "  class map       6 data classes -> 6 of its 1000 outputs: 0 'cock' -> 7, 1 'goldfish' -> 1, "
        "2 'hammerhead' -> 4, 3 'hen' -> 8, 4 'stingray' -> 6, ... (6 in all)\n"
    ) in text
    assert f"  soft labels     {cm['soft_labels']}\n" in text


def test_inspect_of_an_unmapped_teacher_shows_no_class_map(store_dir):
    from kdlib.inspect import format_report, inspect_store

    r = inspect_store(store_dir, max_chunks=1)
    assert r["class_map"] is None and r["teacher_net_classes"] == 10
    assert r["teacher_contract"]["origin"].startswith("run dir ")
    text = format_report(r)
    assert "outputs         10 (the data has 10 classes)" in text and "class map" not in text


# -- row 14: named timm weights, the standard Hugging Face hub cache ---------------------------------
TIMM_NAME = "resnet18.a1_in1k"
REPO_DIR = "models--timm--" + TIMM_NAME

LOAD = (
    "import sys\n"
    "from kdlib.resolve import resolve_model\nfrom kdlib.weights import weights_digest\n"
    "m = resolve_model('timm:resnet18.a1_in1k', classes=1000, in_channels=3)\n"
    "print(weights_digest(m.net))\n"
)


def _timm_net():
    timm = pytest.importorskip("timm", reason="timm is an optional extra (kdlib[timm]); make test installs it")
    torch.manual_seed(0)
    return timm.create_model(TIMM_NAME, pretrained=False)


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(**env), timeout=300)


def _hf_snapshot(cache: Path, net, revision: str, refs_main: bool) -> None:
    """The layout huggingface_hub writes: the file in blobs/, a symlink to it in snapshots/<revision>/."""
    repo = cache / REPO_DIR
    (repo / "blobs").mkdir(parents=True)
    blob = repo / "blobs" / ("b" * 64)
    safetensors.torch.save_file(net.state_dict(), str(blob))
    snap = repo / "snapshots" / revision
    snap.mkdir(parents=True)
    (snap / "model.safetensors").symlink_to(Path("..") / ".." / "blobs" / blob.name)
    if refs_main:
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(revision)


@pytest.mark.parametrize("refs_main", [True, False], ids=["refs-main", "snapshot-only"])
def test_timm_weights_from_the_standard_hub_cache_layout(tmp_path, refs_main):
    """Blobs and snapshot symlinks as huggingface_hub writes them; with refs/main, or a snapshot alone
    (downloaded at a revision, or a cache copied without its refs)."""
    from kdlib.weights import weights_digest

    net = _timm_net()
    _hf_snapshot(tmp_path / "hf", net, "1" * 40, refs_main)
    proc = _python(LOAD, HF_HUB_CACHE=str(tmp_path / "hf"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == weights_digest(net)


def test_timm_weights_not_found_names_the_standard_paths(tmp_path):
    _timm_net()
    hf = tmp_path / "hf"
    snapshots = hf / REPO_DIR / "snapshots"
    fill = (
        "kdlib downloads nothing: fill that cache where a network exists "
        "(huggingface_hub.snapshot_download('timm/resnet18.a1_in1k')) and copy it here, or pass --weights FILE"
    )
    args = ("eval", "--model", f"timm:{TIMM_NAME}", "--data", "fashion-mnist", "--limit", "8", "--cpu")
    p = _kdlib(*args, env=_env(HF_HUB_CACHE=str(hf)))
    assert _one_line(2, p.stderr, p.returncode) == (
        f"error: timm:{TIMM_NAME}: no local weights (looked in the Hugging Face hub cache: "
        f"{snapshots}/<revision>/model.safetensors or pytorch_model.bin; there is no {REPO_DIR} folder); {fill}"
    )
    (snapshots / "abc").mkdir(parents=True)  # a snapshot without the file
    p = _kdlib(*args, env=_env(HF_HUB_CACHE=str(hf)))
    line = _one_line(2, p.stderr, p.returncode)
    assert f"{snapshots}/<revision>/model.safetensors or pytorch_model.bin; not in snapshot abc);" in line
    assert "hub/timm/" not in line


def test_without_huggingface_hub_its_default_place_is_looked_in_and_said(tmp_path):
    """timm runs without huggingface_hub (its hub functions are optional there); kdlib then works out the
    hub cache's default place from HF_HOME as huggingface_hub would, and says the package is missing."""
    net = _timm_net()
    hidden = "import sys; sys.modules['huggingface_hub'] = None\n"
    home = tmp_path / "hfhome"
    probe = _python(hidden + "import timm; timm.create_model('resnet18.a1_in1k')")
    if probe.returncode != 0:
        pytest.skip(f"this timm needs huggingface_hub: {probe.stderr.strip().splitlines()[-1]}")
    code = hidden + "from kdlib.errors import ModelError\ntry:\n" + "".join(f"    {x}\n" for x in LOAD.splitlines())
    code += "except ModelError as e:\n    print('error:', e)\n"
    proc = _python(code, HF_HOME=str(home), HF_HUB_CACHE="")
    assert proc.returncode == 0, proc.stderr[-2000:]
    snapshots = home / "hub" / REPO_DIR / "snapshots"
    assert (
        "(looked in the Hugging Face hub cache's default place (huggingface_hub is not installed): "
        f"{snapshots}/<revision>/model.safetensors or pytorch_model.bin; there is no {REPO_DIR} folder)"
    ) in proc.stdout, proc.stdout
    _hf_snapshot(home / "hub", net, "2" * 40, refs_main=True)
    from kdlib.weights import weights_digest

    proc = _python(code, HF_HOME=str(home), HF_HUB_CACHE="")
    assert proc.returncode == 0 and proc.stdout.strip().splitlines()[-1] == weights_digest(net), proc.stdout


# -- row 15: the messages ------------------------------------------------------------------------------
def test_unknown_preprocessing_message_agrees_with_its_subject(tmp_path, monkeypatch):
    mods = tmp_path / "mods"
    mods.mkdir()
    (mods / "kd_heads_t20.py").write_text(
        "from torch import nn\n\ndef thousand():\n"
        "    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 1000))\n"
    )
    monkeypatch.syspath_prepend(str(mods))
    tail = (
        "nothing of mean/std); give --mean and --std (e.g. --mean imagenet --std imagenet), or name the "
        "weights as torchvision:<model>:<TAG> / timm:<model>"
    )
    with pytest.raises(ModelError) as e:
        resolve_model("kd_heads_t20:thousand", classes=1000, in_channels=3, data_stats=lambda: ([0.5] * 3, [0.2] * 3))
    assert str(e.value) == (
        "teacher kd_heads_t20:thousand: the preprocessing its weights expect is unknown "
        f"(its pretrained head says {tail}"
    )
    path = tmp_path / "w.safetensors"
    safetensors.torch.save_file(torchvision.models.resnet18(num_classes=3).state_dict(), str(path))
    with pytest.raises(ModelError) as e:
        resolve_model("resnet18", classes=["a", "b", "c"], in_channels=3, weights=str(path))
    assert str(e.value) == (
        f"teacher resnet18: the preprocessing its weights expect is unknown (weights {path} say {tail}"
    )


def test_class_map_hint_has_balanced_braces(tmp_path):
    with pytest.raises(ModelError) as e:
        resolve_class_map(["cat", "dog"], 1000, None, None, "T")
    msg = str(e.value)
    assert msg == (
        "teacher T has 1000 classes, the data has 2 ('cat', 'dog'); the teacher has no class names. "
        'Give --class-map FILE (JSON {"data class": teacher index or class name}) so each data class maps '
        "to one teacher output"
    )
    # and through the CLI, as the one line a user sees
    data = _folder(tmp_path / "data", ["cat", "dog"], per_class=1)
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "kd_cm_t20.py").write_text(
        "from torch import nn\n\ndef thousand():\n"
        "    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 1000))\n"
        "thousand.mean = (0.5, 0.5, 0.5)\nthousand.std = (0.25, 0.25, 0.25)\n"
    )
    env = _env()
    env["PYTHONPATH"] += os.pathsep + str(tmp_path / "mods")
    p = _kdlib("eval", "--model", "kd_cm_t20:thousand", "--data", data, "--cpu", "--workers", "0", env=env)
    line = _one_line(2, p.stderr, p.returncode)
    assert line.endswith(
        '(JSON {"data class": teacher index or class name}) so each data class maps to one teacher output'
    )
    assert line.count("{") == line.count("}") == 1
