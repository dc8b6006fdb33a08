"""Shared helpers of the benchmarks: machine info, result files, tables, quiet library calls.

Every benchmark is one script (`python benchmarks/<name>.py`); this module is imported as
`_common` because the script's own folder is first on `sys.path`. Nothing here measures
anything: it only records where and how a measurement ran.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
FMNIST_RECIPE = str(REPO / "precompute" / "fmnist.yaml")


# -- machine -------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:  # no git: the result file just says so
        return ""


def machine_info() -> dict[str, Any]:
    import torch

    import kdlib

    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "kdlib": kdlib.__version__,
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--", "kdlib")),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "cpu_pressure_at_start": cpu_pressure(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def cpu_pressure() -> str | None:
    """Linux PSI line 'some avg10=.. avg60=..': share of time runnable tasks waited for a CPU
    (other jobs on a shared machine show up here)."""
    try:
        return Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None


def device_label(info: dict[str, Any]) -> str:
    return info.get("gpu") or f"{info['cpu_model']} ({info['cpus_usable']} CPUs, {info['torch_threads']} torch threads)"


# -- results -------------------------------------------------------------------------------
def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def write_result(
    name: str,
    machine: dict[str, Any],
    config: dict[str, Any],
    results: dict[str, Any],
    table: str,
    out: str | None = None,
) -> Path:
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    machine = {
        **machine,
        "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "cpu_pressure_at_end": cpu_pressure(),
    }
    exe = Path(sys.executable)
    exe_s = os.path.relpath(exe, REPO) if str(exe).startswith(str(REPO)) else exe.name
    doc = {
        "benchmark": name,
        "date": now_utc(),
        "command": " ".join([exe_s, *sys.argv]),
        "machine": machine,
        "config": config,
        "results": results,
        "table_markdown": table,
    }
    path.write_text(json.dumps(doc, indent=1, default=_json_default) + "\n")
    return path


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON-serializable: {type(o).__name__}")


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return "\n".join(lines)


def _fmt(c: Any) -> str:
    if isinstance(c, float):
        if c != 0 and (abs(c) < 1e-3 or abs(c) >= 1e6):
            return f"{c:.3g}"
        return f"{c:.3f}" if abs(c) < 10 else f"{c:.1f}" if abs(c) < 1000 else f"{c:,.0f}"
    return str(c)


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def spread(xs: Sequence[float]) -> str:
    """min-max of a sample, for the table (so the noise is visible)."""
    return f"{min(xs):.3g}-{max(xs):.3g}"


# -- running library code quietly ----------------------------------------------------------
@contextlib.contextmanager
def quiet() -> Iterator[io.StringIO]:
    """Capture stdout and stderr (tqdm bars, accelerate notes); on an error, show their tail."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            yield buf
    except BaseException:
        sys.stderr.write(buf.getvalue()[-4000:])
        raise


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def dir_bytes(root: str | Path) -> int:
    """Bytes of every file under `root` (what `du --apparent-size` counts)."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)


def tmpdir(keep: str | None, prefix: str) -> Path:
    if keep:
        p = Path(keep)
        p.mkdir(parents=True, exist_ok=True)
        return p
    return Path(tempfile.mkdtemp(prefix=f"kdlib-bench-{prefix}-"))


def order(round_index: int, names: Sequence[str]) -> list[str]:
    """Interleaving: A,B in even rounds and B,A in odd ones, so drift hits both sides alike."""
    return list(names) if round_index % 2 == 0 else list(reversed(names))


def epoch_rate(run_dir: Path, batch_size: int) -> dict[str, Any]:
    """Views/s of a `kdlib.train` run from its metrics.jsonl (the loop's own timing: start-up,
    evaluation and the epoch-end checkpoint are outside it)."""
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    epochs = [r for r in recs if "epoch" in r and "views_per_s" in r]
    views = sum(r["steps"] * batch_size for r in epochs)
    seconds = sum(r["seconds"] for r in epochs)
    return {
        "views": views,
        "seconds": seconds,
        "views_per_s": views / seconds,
        "per_epoch_views_per_s": [r["views_per_s"] for r in epochs],
    }


@contextlib.contextmanager
def step_clock() -> Iterator[list[list[float]]]:
    """Timestamps of every step of `kdlib.train`'s loop, without changing the loop.

    The progress bar class kdlib.train uses (whatever `tqdm` it imported) is replaced by a
    subclass of itself that records `perf_counter()` when the bar is made (just before the
    epoch's first batch is asked for) and at each `update` (once per step, after the optimizer
    step): one list per epoch, n + 1 stamps for n steps. It behaves exactly like the class it wraps.
    """
    import kdlib.train as train_mod

    base = train_mod.tqdm
    stamps: list[list[float]] = []

    class Clocked(base):  # type: ignore[misc, valid-type]
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self._stamps: list[float] = [time.perf_counter()]
            stamps.append(self._stamps)

        def update(self, n=1):
            self._stamps.append(time.perf_counter())
            return super().update(n)

    train_mod.tqdm = Clocked
    try:
        yield stamps
    finally:
        train_mod.tqdm = base


@contextlib.contextmanager
def update_clock() -> Iterator[list[list[float]]]:
    """Timestamps of `kdlib.precompute`'s progress-bar updates (one per teacher batch done), one
    list per bar: the same trick as `step_clock`, for precompute's loop, which updates its bar by
    hand after each batch's teacher forward and top-k."""
    import kdlib.precompute as pre_mod

    base = pre_mod.tqdm
    stamps: list[list[float]] = []

    class Clocked(base):  # type: ignore[misc, valid-type]
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self._stamps: list[float] = []
            stamps.append(self._stamps)

        def update(self, n=1):
            self._stamps.append(time.perf_counter())
            return super().update(n)

    pre_mod.tqdm = Clocked
    try:
        yield stamps
    finally:
        pre_mod.tqdm = base


def steady_rate(stamps: list[list[float]], batch_size: int, skip: int = 2) -> float:
    """Views/s over every epoch's steps after the first `skip` (worker start-up, first batch, warm-up);
    an epoch of `skip` steps or fewer keeps its last step only."""
    views, seconds = 0, 0.0
    for run in stamps:
        steps = len(run) - 1
        if steps < 1:
            continue
        s = min(skip, steps - 1)
        views += (steps - s) * batch_size
        seconds += run[-1] - run[s]
    return views / seconds


def write_recipe(path: Path, base: str | None = None, **overrides: Any) -> str:
    """A recipe file: `base` (a YAML recipe) with `overrides`, written as JSON."""
    from kdlib.recipe import load_recipe

    recipe = load_recipe(base, **overrides)
    path.write_text(json.dumps(recipe.to_dict(), indent=1))
    return str(path)


# -- synthetic data ------------------------------------------------------------------------
def fmnist_rgb(n: int, size: int, seed: int = 0) -> np.ndarray:
    """uint8 [n, size, size, 3]: Fashion-MNIST garments, padded to `size` and tinted per image,
    so images have structure (unlike noise) and colour. Deterministic."""
    from kdlib.source import open_source

    src = open_source("fashion-mnist", "train", n)
    rng = np.random.default_rng(seed)
    out = np.empty((len(src), size, size, 3), np.uint8)
    for i in range(len(src)):
        g = src.decode(i)[0].astype(np.float32) / 255.0  # [28, 28]
        if size != 28:
            import torch

            g = torch.nn.functional.interpolate(
                torch.from_numpy(g)[None, None], size=(size, size), mode="bilinear", align_corners=False
            )[0, 0].numpy()
        fg, bg = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        out[i] = np.clip(g[..., None] * fg + (1 - g[..., None]) * bg, 0, 255).astype(np.uint8)
    return out


def write_npz(path: Path, images: np.ndarray, num_classes: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, len(images)).astype(np.int64)
    classes = np.array([f"c{i}" for i in range(num_classes)])
    np.savez(path, images=images, labels=labels, classes=classes)
    return str(path)


def synthetic_jpeg_folder(root: Path, n: int, size: int, num_classes: int = 10, quality: int = 90) -> str:
    """An ImageFolder of `n` JPEGs of `size`x`size` (tinted, upscaled Fashion-MNIST), `num_classes` folders."""
    from PIL import Image

    images = fmnist_rgb(n, size)
    for i, img in enumerate(images):
        d = root / f"class{i % num_classes:03d}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:06d}.jpg", quality=quality)
    return str(root)


def add_data_flags(ap) -> None:
    """--data/--recipe plus the synthetic-JPEG mode used for GPU runs (ImageNet-like input)."""
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--recipe", default=FMNIST_RECIPE)
    ap.add_argument(
        "--jpeg-size",
        type=int,
        default=0,
        help="if > 0: make an ImageFolder of --limit synthetic JPEGs of this size and use it as --data",
    )
    ap.add_argument(
        "--size",
        type=int,
        default=0,
        help="views' output size (0: the recipe's; with --jpeg-size: 224, inception scale 0.08-1)",
    )


def prepare_data(args, work: Path) -> tuple[str, str]:
    """(data, recipe) for a run: the given ones, or synthetic JPEGs and an ImageNet-like recipe."""
    if args.jpeg_size:
        data = synthetic_jpeg_folder(work / "jpegs", args.limit, args.jpeg_size)
        recipe = write_recipe(
            work / "recipe.json",
            args.recipe,
            size=args.size or 224,
            scale=(0.08, 1.0),
            name=f"jpeg{args.jpeg_size}-{args.size or 224}",
        )
        return data, recipe
    if args.size:
        return args.data, write_recipe(work / "recipe.json", args.recipe, size=args.size)
    return args.data, args.recipe


def parse_rate(text: str, pattern: str = r"epoch \d+: .*?([\d.]+) views/s") -> float | None:
    found = re.findall(pattern, text)
    return float(found[-1]) if found else None


def timed_train(train: Callable[[Any], Any], config: Any, out: Path, batch_size: int, skip: int) -> dict[str, Any]:
    """One training run, quiet: its whole-epoch rate (metrics.jsonl) and its steady-state rate; `out` removed."""
    import shutil

    with quiet(), step_clock() as stamps:
        train(config)
    rate = epoch_rate(out, batch_size)
    rate["steady_views_per_s"] = steady_rate(stamps, batch_size, skip)
    shutil.rmtree(out, ignore_errors=True)
    return rate
