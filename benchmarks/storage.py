"""Storage and fidelity: bytes per view on disk for k = 1, 5, 10, 20 and full logits, zarr and wds,
fp16 and q8 logits, and the mean KL(full teacher || stored target) of each.

The source is an RGB `.npz` of --images 32x32 images (Fashion-MNIST garments, tinted) with
--classes classes (default 1000, so class ids take 2 bytes as on ImageNet-1k). The teacher is a
torchvision resnet18 with that many outputs, random init (seed 0), saved once as a run directory
so every store is written by the same weights. For each backend and k, `kdlib.precompute.precompute`
writes a 1-epoch store (defaults otherwise, including its default full-logit sample); `bytes_on_disk()`
gives bytes per column, split here into view params, soft labels and the full-logit sample.

Fidelity: the stored views are replayed (`ViewBatches` from the store, the path `kdlib train` uses)
and the teacher is run on them to get the full logits; KL(softmax(full/T) || softmax(target/T)) is
averaged over views, where target = `reconstruct` of the stored soft label. A random-init teacher
is nearly uniform over 1000 classes (its top-20 holds a few % of the mass), which says little about
a trained one; so the same full logits are also scaled until the mean top-1 probability is
--peaked (default 0.6: an assumption about a trained teacher, not a measurement) and put through
`encode`/`to_codec`/`reconstruct` (the functions precompute and train call) to give a second KL column.

`--codecs fp16,q8`: q8 keeps each top-k logit as an 8-bit distance below the top-1 (`--logits q8`);
its rows are written for the first backend only (the codec does not depend on the backend).

    .venv/bin/python benchmarks/storage.py          # ~1-3 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import shutil

import _common as C

PARAMS = ("image", "box", "flip", "partner", "mix", "lam", "cutbox")
LABELS = ("ids", "logits", "lse", "top")
SAMPLE = ("full",)


def kl_rows(full, target, t: float):
    import torch.nn.functional as F

    log_p = F.log_softmax(full.double() / t, -1)
    log_q = F.log_softmax(target.double() / t, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def scale_for_top1(full, want: float) -> float:
    """The factor s for which softmax(s * full) has mean top-1 probability `want` (bisection)."""
    lo, hi = 0.0, 1.0
    while full.mul(hi).softmax(-1).max(-1).values.mean().item() < want and hi < 1e6:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        if full.mul(mid).softmax(-1).max(-1).values.mean().item() < want:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=2048, help="images in the synthetic source (= views per store)")
    ap.add_argument("--chunk-views", type=int, default=0, help="views per chunk (0: min(4096, --images), one chunk)")
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--ks", default="1,5,10,20,full", help="comma-separated; 'full' = all classes")
    ap.add_argument("--backends", default="zarr,wds")
    ap.add_argument("--codecs", default="fp16,q8", help="logit codecs; non-fp16 ones on the first backend only")
    ap.add_argument("--teacher", default="resnet18")
    ap.add_argument("--recipe", default=C.FMNIST_RECIPE, help="base recipe (size is set to --size)")
    ap.add_argument("--peaked", type=float, default=0.6, help="mean top-1 probability of the sharpened teacher")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--keep", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import numpy as np
    import torch

    from kdlib.feed import Feed
    from kdlib.models import build_model
    from kdlib.precision import teacher_logits
    from kdlib.precompute import PrecomputeConfig, precompute
    from kdlib.resolve import load_model
    from kdlib.rundir import save_model
    from kdlib.softlabel import decode_logits, encode, reconstruct, to_codec
    from kdlib.source import open_source
    from kdlib.store import ChunkCache, open_store
    from kdlib.views import Batch, ViewBatches, split_range

    machine = C.machine_info()
    work = C.tmpdir(args.keep, "storage")
    data = C.write_npz(work / f"rgb{args.classes}.npz", C.fmnist_rgb(args.images, args.size), args.classes)
    recipe = C.write_recipe(work / "recipe.json", args.recipe, size=args.size, name=f"rgb{args.size}")
    source = open_source(data, "train")
    mean, std = source.mean_std()
    torch.manual_seed(0)
    teacher_dir = work / "teacher"
    save_model(build_model(args.teacher, args.classes, 3, mean, std), teacher_dir)
    ks = sorted({args.classes if k == "full" else min(int(k), args.classes) for k in args.ks.split(",")})

    backends, codecs = args.backends.split(","), args.codecs.split(",")
    stores = {}
    for backend, codec in [(b, "fp16") for b in backends] + [(backends[0], c) for c in codecs if c != "fp16"]:
        for k in ks:
            if codec != "fp16" and k == args.classes:
                continue  # full logits are the fp16 reference
            out = work / f"{backend}-{codec}-k{k}"
            print(f"precompute {backend} {codec} k={k} ...", flush=True)
            with C.quiet():
                precompute(
                    PrecomputeConfig(
                        teacher=str(teacher_dir),
                        data=data,
                        recipe=recipe,
                        out=str(out),
                        epochs=1,
                        k=k,
                        batch_size=args.batch_size,
                        workers=args.workers,
                        backend=backend,
                        logit_codec=codec,
                        chunk_views=args.chunk_views or min(4096, args.images),
                        test=False,
                    )
                )
            stores[(backend, codec, k)] = open_store(str(out))

    # Full teacher logits on the replayed views (the views train renders from a store).
    first = stores[(backends[0], "fp16", ks[0])]
    meta = first.meta
    teacher = load_model(str(teacher_dir)).eval()
    ds = ViewBatches(
        source,
        [Batch(0, a, b) for a, b in split_range(0, meta.views_per_epoch, args.batch_size)],
        meta.recipe["size"],
        meta.group_size,
        ChunkCache(first),
    )
    cpu = torch.device("cpu")
    full = torch.cat([teacher_logits(teacher, item["views"], cpu) for item in Feed(ds, cpu, args.workers)])
    n = len(full)
    s = scale_for_top1(full, args.peaked)
    sharp = full * s

    def stats(logits):
        p = logits.softmax(-1)
        return {
            "mean_top1_prob": p.max(-1).values.mean().item(),
            "mean_entropy_nats": (-(p * p.clamp_min(1e-30).log()).sum(-1)).mean().item(),
            **{f"mean_top{k}_mass": p.topk(min(k, p.shape[1]), -1).values.sum(-1).mean().item() for k in ks},
        }

    results, rows = [], []
    for (backend, codec, k), store in stores.items():
        cols = store.bytes_on_disk()
        v = store.meta.views_per_epoch * store.meta.epochs_done
        part = {
            name: sum(b for c, b in cols.items() if c in group) / v
            for name, group in (("params", PARAMS), ("labels", LABELS), ("full_sample", SAMPLE))
        }
        other = sum(b for c, b in cols.items() if c not in PARAMS + LABELS + SAMPLE) / v
        total_cols = sum(cols.values()) / v
        all_files = C.dir_bytes(store.root) / v
        chunks = [store.read_chunk(0, c) for c in range(store.meta.chunks_per_epoch)]
        stored = {c: np.concatenate([ch[c] for ch in chunks]) for c in LABELS if c in chunks[0]}
        ids, lse = torch.from_numpy(stored["ids"]).long(), torch.from_numpy(stored["lse"])
        target = reconstruct(ids, torch.from_numpy(decode_logits(stored, codec)), lse, args.classes)
        agree = (ids[:, 0] == full.argmax(-1)).float().mean().item()
        enc = {c: v.numpy() for c, v in to_codec(encode(sharp, k), codec).items()}
        target_sharp = reconstruct(
            torch.from_numpy(enc["ids"]).long(),
            torch.from_numpy(decode_logits(enc, codec)),
            torch.from_numpy(enc["lse"]),
            args.classes,
        )
        rec = {
            "backend": backend,
            "codec": codec,
            "k": k,
            "sample_views_per_chunk": store.meta.sample_views,
            "views": v,
            "bytes_per_view": part,
            "other_bytes_per_view": other,
            "column_bytes_per_view": {c: b / v for c, b in cols.items()},
            "total_columns_bytes_per_view": total_cols,
            "all_files_bytes_per_view": all_files,
            "top1_agreement_replay": agree,
            "kl_stored_T1": kl_rows(full, target, 1.0).mean().item(),
            "kl_stored_T4": kl_rows(full, target, 4.0).mean().item(),
            "kl_peaked_T1": kl_rows(sharp, target_sharp, 1.0).mean().item(),
            "kl_peaked_T4": kl_rows(sharp, target_sharp, 4.0).mean().item(),
        }
        results.append(rec)
        rows.append(
            [
                backend,
                codec,
                "full" if k == args.classes else k,
                part["params"],
                part["labels"],
                part["full_sample"],
                part["params"] + part["labels"],
                total_cols,
                all_files,
                rec["kl_stored_T1"],
                rec["kl_peaked_T1"],
                rec["kl_peaked_T4"],
            ]
        )
    table = C.md_table(
        [
            "format",
            "logits",
            "k",
            "params B/view",
            "labels B/view",
            "full-logit sample B/view",
            "params+labels B/view",
            "all columns B/view",
            "all files B/view",
            "KL T=1 (stored, random teacher)",
            f"KL T=1 (top-1 p={args.peaked})",
            f"KL T=4 (top-1 p={args.peaked})",
        ],
        rows,
    )
    st_raw, st_sharp = stats(full), stats(sharp)
    notes = (
        f"teacher as stored: mean top-1 prob {st_raw['mean_top1_prob']:.4f}, entropy "
        f"{st_raw['mean_entropy_nats']:.2f} nats; sharpened (logits x {s:.2f}): top-1 prob "
        f"{st_sharp['mean_top1_prob']:.3f}, entropy {st_sharp['mean_entropy_nats']:.2f} nats, "
        + ", ".join(f"top-{k} mass {st_sharp[f'mean_top{k}_mass']:.3f}" for k in ks if k < args.classes)
        + "\n\nfull-logit sample (precompute's default --full-sample, min(1%, 0.1 k / classes)): "
        + ", ".join(
            f"k={r['k']}: {r['sample_views_per_chunk']} of every {meta.chunk_views} views"
            for r in results
            if r["backend"] == backends[0] and r["codec"] == "fp16"
        )
        + f"\n\nreplay check: stored top-1 id == argmax of the teacher on replayed views for "
        f"{min(r['top1_agreement_replay'] for r in results):.4f} of views (worst store)"
        f"\n\n{n} views of {args.size}px RGB, {args.classes} classes, teacher {args.teacher} (random init), "
        f"logits {', '.join(codecs)}"
    )
    print()
    print(
        f"storage: {n} views of {args.size}px RGB, {args.classes} classes, teacher {args.teacher} (random init), "
        f"logits {', '.join(codecs)}, on {C.device_label(machine)}\n"
    )
    print(table)
    print("\n" + notes)
    table = table + "\n\n" + notes
    path = C.write_result(
        "storage",
        machine,
        vars(args),
        {
            "rows": results,
            "views": n,
            "classes": args.classes,
            "teacher_stats": st_raw,
            "sharpen_scale": s,
            "chunk_views": meta.chunk_views,
            "sharpened_teacher_stats": st_sharp,
        },
        table,
        args.out,
    )
    print(f"\nwrote {path}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
