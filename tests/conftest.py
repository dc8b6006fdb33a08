"""Session fixtures shared by the suite: a tiny trained teacher (and a second one from another
seed), a small zarr store precomputed from the first, and tiny RGB sources of non-square images.

Everything is made with the library API on real Fashion-MNIST (256 images), so the whole set
costs a few seconds once per session. Tests that change a store copy it first (`store_copy`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from s3_server import s3  # noqa: F401  (one S3 server per session, defined once here for every module)

# The suite pins CPU behaviour (bit-identical pixels, fp32 logits) wherever it runs: CUDA is hidden from
# it, before anything imports torch. tests/test_cuda.py checks the GPU path in subprocesses that see the
# GPUs the caller saw (KDLIB_TEST_CUDA_DEVICES keeps the caller's CUDA_VISIBLE_DEVICES, if any).
os.environ.setdefault("KDLIB_TEST_CUDA_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", "<all>"))
os.environ["CUDA_VISIBLE_DEVICES"] = ""

REPO = Path(__file__).resolve().parents[1]
FMNIST_RECIPE = str(REPO / "precompute" / "fmnist.yaml")
# The Debian package's place, or KDLIB_DATA (a GPU machine without the package: see shared/GPU.md)
FMNIST_DIR = os.environ.get("KDLIB_DATA") or "/usr/share/datasets/fashion-mnist"
LIMIT = 256  # images of the train split used everywhere
STORE_EPOCHS = 2
STORE_K = 3  # < 10 classes: truncation (tail reconstruction) is exercised
CHUNK_VIEWS = 64
# `accelerate launch` of 2 CPU processes (gloo), with ACCELERATE_USE_CPU=1 in the environment: `--cpu
# --num_processes 2` would silently run ONE process, so the tests that use it check that two ranks ran
LAUNCH = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--multi_gpu",
    "--num_processes",
    "2",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
    "--main_process_port",
    "0",
]

# the CLI as the fault tests run it: a subprocess without the session's KDLIB_DATA, on the CPU
CLI_ENV = {
    **{k: v for k, v in os.environ.items() if k not in ("KDLIB_DATA", "KDLIB_DEBUG")},
    "CUDA_VISIBLE_DEVICES": "",
    "PYTHONUNBUFFERED": "1",
}
TRAIN_FLAGS = ["--student", "resnet8", "--batch-size", "32", "--workers", "0", "--no-eval", "--cpu"]


def precompute_args(teacher: str, out: Path | str, *extra: str, batch_size: int | None = 64) -> list[str]:
    """The fixture store's command (`store_dir`'s settings) into `out`, for the CLI; `batch_size` None: the
    command's default (the teacher's batch changes no stored byte)."""
    return [
        "precompute",
        "--teacher",
        str(teacher),
        "--data",
        "fashion-mnist",
        "--recipe",
        FMNIST_RECIPE,
        "--epochs",
        str(STORE_EPOCHS),
        "--k",
        str(STORE_K),
        "--limit",
        str(LIMIT),
        "--chunk-views",
        str(CHUNK_VIEWS),
        "--workers",
        "0",
        *(["--batch-size", str(batch_size)] if batch_size else []),
        "--out",
        str(out),
        *extra,
    ]


def precompute_log(store: Path | str, rank: int = 0) -> list[dict]:
    """The lines of `rank`'s precompute logs of a local store (a log per epoch), in the order written."""
    paths = sorted(Path(store).glob(f"logs/e*/precompute-rank{rank}.jsonl"))
    return [json.loads(line) for p in paths for line in p.read_text().splitlines()]


def kdlib_cli(*args, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m kdlib ARGS` in a subprocess, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "kdlib", *map(str, args)],
        env=env or CLI_ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_line(p: subprocess.CompletedProcess, code: int, *words: str) -> str:
    """Assert exit `code` and a single `error:` line (the last of stderr) holding every one of `words`."""
    assert p.returncode == code, f"exit {p.returncode}, wanted {code}:\n{p.stderr[-3000:]}"
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    errors = [line for line in p.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, p.stderr[-3000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), last
    for w in words:
        assert w in last, (w, last)
    return last


if not os.path.isfile(os.path.join(FMNIST_DIR, "train-images-idx3-ubyte.gz")) and not os.path.isfile(
    os.path.join(FMNIST_DIR, "train-images-idx3-ubyte")
):
    pytest.exit(
        f"Fashion-MNIST not found in {FMNIST_DIR} (apt-get install dataset-fashion-mnist, "
        "or set KDLIB_DATA to a folder with its IDX files)",
        returncode=4,
    )


@pytest.fixture(scope="session", autouse=True)
def _kdlib_data():
    """Every process of the suite (the library, subprocesses) opens Fashion-MNIST from FMNIST_DIR."""
    old = os.environ.get("KDLIB_DATA")
    os.environ["KDLIB_DATA"] = FMNIST_DIR
    yield
    if old is None:
        os.environ.pop("KDLIB_DATA", None)
    else:
        os.environ["KDLIB_DATA"] = old


@pytest.fixture(scope="session")
def kd_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("kd")


def _train_teacher(out: Path, seed: int) -> str:
    from kdlib.train import TrainConfig, train

    train(
        TrainConfig(
            out=str(out),
            student="resnet8",
            data="fashion-mnist",
            loss="ce",
            epochs=1,
            limit=LIMIT,
            workers=0,
            eval=False,
            cpu=True,
            seed=seed,
        )
    )
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    return str(out)


@pytest.fixture(scope="session")
def teacher_dir(kd_root) -> str:
    """Run dir of a resnet8 trained 1 epoch on 256 Fashion-MNIST images (seed 0)."""
    return _train_teacher(kd_root / "teacher", seed=0)


@pytest.fixture(scope="session")
def other_teacher_dir(kd_root) -> str:
    """Same architecture and data, another init seed: other weights, other digest."""
    return _train_teacher(kd_root / "teacher_seed1", seed=1)


@pytest.fixture(scope="session")
def store_dir(kd_root, teacher_dir) -> str:
    """A zarr store: fmnist recipe, 2 epochs x 512 views, k=3, chunks of 64 views (8 per epoch)."""
    from kdlib.precompute import PrecomputeConfig, precompute

    out = kd_root / "store"
    precompute(
        PrecomputeConfig(
            teacher=teacher_dir,
            data="fashion-mnist",
            out=str(out),
            recipe=FMNIST_RECIPE,
            epochs=STORE_EPOCHS,
            k=STORE_K,
            limit=LIMIT,
            chunk_views=CHUNK_VIEWS,
            workers=0,
        )
    )
    return str(out)


@pytest.fixture(scope="session")
def store(store_dir):
    from kdlib.store import open_store

    return open_store(store_dir)


@pytest.fixture(scope="session")
def train_source():
    from kdlib.source import open_source

    return open_source("fashion-mnist", "train", LIMIT)


@pytest.fixture
def store_copy(store_dir, tmp_path) -> str:
    """A private copy of the fixture store, free to be damaged."""
    dst = tmp_path / "store_copy"
    shutil.copytree(store_dir, dst)
    return str(dst)


def snapshot(root: str | Path) -> dict[str, str]:
    """relative path -> sha256 of every file under `root` (what "nothing changed" compares)."""
    root = Path(root)
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# -- tiny RGB sources of non-square images ------------------------------------------------
def smooth_jpegs(root: Path, sizes: list[tuple[int, int]], n: int, seed: int, grid: tuple[int, int] = (6, 5)) -> str:
    """An ImageFolder of `n` smooth RGB JPEGs (a random `grid` enlarged bicubically, quality 90), sizes
    (width, height) taken from `sizes` in turn, 2 classes."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        d = root / f"class{i % 2}"
        d.mkdir(exist_ok=True)
        small = rng.integers(0, 256, size=(*grid, 3), dtype=np.uint8)
        Image.fromarray(small).resize(sizes[i % len(sizes)], Image.BICUBIC).save(d / f"img{i}.jpg", quality=90)
    return str(root)


RGB_SIZES = [(20, 32), (32, 20), (17, 45), (40, 24), (24, 40), (31, 29), (12, 50), (50, 12)]  # (h, w)


@pytest.fixture(scope="session")
def rgb_npz(tmp_path_factory) -> str:
    """8 RGB images of 20x32 (h x w) in an .npz, 4 classes."""
    rng = np.random.default_rng(123)
    path = tmp_path_factory.mktemp("npz") / "rgb8.npz"
    np.savez(path, images=rng.integers(0, 256, size=(8, 20, 32, 3), dtype=np.uint8), labels=np.arange(8) % 4)
    return str(path)


@pytest.fixture(scope="session")
def rgb_folder(tmp_path_factory) -> str:
    """An ImageFolder of 8 lossless RGB PNGs of 8 different non-square sizes, 2 classes."""
    rng = np.random.default_rng(7)
    root = tmp_path_factory.mktemp("folder")
    for i, (h, w) in enumerate(RGB_SIZES):
        d = root / f"class{i % 2}"
        d.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)).save(d / f"img{i}.png")
    return str(root)


# -- DIH heads (issue 13) ---------------------------------------------------------------------
@pytest.fixture(scope="session")
def headed_teacher_dir(kd_root, teacher_dir) -> str:
    """The fixture teacher with a linear head on each of its 3 stages, fitted 1 epoch on the fmnist recipe."""
    from kdlib.heads import HeadsConfig, fit_heads

    out = kd_root / "teacher_heads"
    fit_heads(
        HeadsConfig(
            teacher=teacher_dir,
            data="fashion-mnist",
            out=str(out),
            recipe=FMNIST_RECIPE,
            epochs=1,
            limit=LIMIT,
            workers=0,
            cpu=True,
            batch_size=64,
        )
    )
    return str(out)
