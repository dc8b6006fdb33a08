"""Scale on paper: what a kdlib store and its precompute would cost for ImageNet-1k, from the
bytes per view measured by `storage.py` and a *stated* (not measured) teacher throughput.

Inputs:
- bytes per view: read from benchmarks/results/storage.json (zarr rows; run storage.py first).
  That run used 1000 classes (2-byte class ids, as ImageNet-1k) and the fmnist recipe at 32 px
  (inception crop, flip, MixUp on half the views); the params of ImageNet views (larger boxes)
  may compress a little differently. Nothing else is extrapolated: size = bytes/view x views.
- teacher throughput: --teacher-img-s, default 2600 images/s, an ASSUMPTION for a ResNet-50-class
  teacher in fp16 inference on one A100 at 224 px; not measured here. Decode and render are
  assumed hidden behind the teacher (what precompute_efficiency.py checks on this machine).

Views: 1,281,167 training images x --views-per-image (crops per image c; default 1) per epoch;
a store holds one stored epoch per training epoch (no cycling).

Published figures, each with where it appears (nothing quoted that could not be traced):
- ReLabel (Yun et al., CVPR 2021): top-5 label maps of ImageNet, ~10 GB (vs > 1 TB for full maps)
  and a one-time ~10 h forward of the annotator -- the paper's discussion of space and time
  consumption (arXiv:2101.05022), read here through a summary (developer.aliyun.com/article/1221926):
  to check against the paper. The official repo's README (github.com/naver-ai/relabel_imagenet)
  offers the data as "relabel_imagenet.tar (12GB)".
- FKD (Shen & Xing, ECCV 2022): the authors' full 1000-class soft labels (the released crops) are
  "approximately 2.3T" (maintainer's comment, github.com/szq0214/FKD issue #7, 2023-10-28); their
  recommended release is "Marginal Smoothing Top-5 (500-crop)" (FKD/README.md). The paper's own
  storage table for the compressed labels: to check (not found).

    .venv/bin/python benchmarks/scale_on_paper.py                     # instant
    .venv/bin/python benchmarks/scale_on_paper.py --teacher-img-s 5000 --views-per-image 4
"""

from __future__ import annotations

import argparse
import json

import _common as C

IMAGENET_TRAIN = 1_281_167


def human(nbytes: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes:.0f} B"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--storage", default=str(C.RESULTS / "storage.json"))
    ap.add_argument("--images", type=int, default=IMAGENET_TRAIN)
    ap.add_argument("--epochs", default="100,300,1000")
    ap.add_argument("--views-per-image", type=int, default=1, help="crops per image per epoch (c)")
    ap.add_argument(
        "--teacher-img-s",
        type=float,
        default=2600.0,
        help="ASSUMED teacher throughput, views/s per GPU (default: ResNet-50-class, A100, fp16)",
    )
    ap.add_argument("--backend", default="zarr")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    storage = json.loads(open(args.storage).read())
    classes = storage["results"]["classes"]
    rows_in = [r for r in storage["results"]["rows"] if r["backend"] == args.backend]
    epochs = [int(e) for e in args.epochs.split(",")]
    views_epoch = args.images * args.views_per_image

    rows, out_rows = [], []
    for r in rows_in:
        bpv = r["bytes_per_view"]
        pl = bpv["params"] + bpv["labels"]
        with_sample = r["total_columns_bytes_per_view"]
        codec = r.get("codec", "fp16")
        k = "full" if r["k"] >= classes else f"{r['k']}" + ("" if codec == "fp16" else f", {codec}")
        sizes = {e: pl * views_epoch * e for e in epochs}
        sizes_all = {e: with_sample * views_epoch * e for e in epochs}
        out_rows.append(
            {
                "k": r["k"],
                "codec": codec,
                "bytes_per_view_params_labels": pl,
                "bytes_per_view_all_columns": with_sample,
                "store_bytes": sizes,
                "store_bytes_all_columns": sizes_all,
            }
        )
        rows.append(
            [k, f"{pl:.1f} / {with_sample:.1f}"] + [f"{human(sizes[e])} / {human(sizes_all[e])}" for e in epochs]
        )
    hours = {e: views_epoch * e / args.teacher_img_s / 3600 for e in epochs}
    rows.append(
        ["precompute GPU-hours", f"at {args.teacher_img_s:,.0f} views/s (assumed)"]
        + [f"{hours[e]:,.0f} h" for e in epochs]
    )
    table = C.md_table(["k", "B/view: params+labels / + full-logit sample"] + [f"{e} epochs" for e in epochs], rows)

    refs = [
        [
            "ReLabel (Yun et al., CVPR 2021)",
            "top-5 label maps per image, reused every epoch",
            "~10 GB (full maps > 1 TB)",
            "arXiv:2101.05022, discussion of space/time consumption, via developer.aliyun.com/article/1221926: to check",
        ],
        ["ReLabel, released data", "same", "12 GB download", "github.com/naver-ai/relabel_imagenet README"],
        [
            "ReLabel, one-time forward",
            "EfficientNet-L2 annotator at 475 px",
            "~10 h",
            "same as the first row: to check",
        ],
        [
            "FKD (Shen & Xing, ECCV 2022), full soft labels",
            "1000-class soft labels of the released crops",
            "~2.3 TB",
            "github.com/szq0214/FKD issue #7 (maintainer, 2023-10-28)",
        ],
        [
            "FKD, compressed (top-5, 500 crops/image)",
            "recommended release",
            "to check",
            "FKD/README.md names it; size not found",
        ],
    ]
    ref_table = C.md_table(["published", "what is stored", "size", "where it appears"], refs)
    print(
        f"ImageNet-1k on paper: {args.images:,} images x {args.views_per_image} view(s) per epoch, bytes/view "
        f"measured by storage.py ({storage['date']}, {args.backend}, {classes} classes)\n"
    )
    print(table)
    overhead = (
        max(r["all_files_bytes_per_view"] - r["total_columns_bytes_per_view"] for r in rows_in) * rows_in[0]["views"]
    )
    notes = (
        "store size = bytes/view x views, as 'params+labels / with precompute's default full-logit sample'; "
        f"meta.json, zarr.json, commit records and logs are left out (at most {overhead / 1e3:.0f} kB for the "
        f"whole 1-epoch, {rows_in[0]['views']}-view store of the storage run: a cost per store, epoch and chunk, "
        "not per view). "
        f"GPU-hours = views / {args.teacher_img_s:,.0f} views/s, an assumed teacher throughput on one GPU "
        "(decode and render assumed hidden behind it)."
    )
    print("\n" + notes + "\n")
    print(ref_table)
    table_all = table + "\n\n" + notes + "\n\n" + ref_table
    path = C.write_result(
        "scale_on_paper",
        C.machine_info(),
        vars(args),
        {
            "views_per_epoch": views_epoch,
            "rows": out_rows,
            "precompute_gpu_hours": hours,
            "teacher_img_s_assumed": args.teacher_img_s,
            "storage_result_date": storage["date"],
            "published": refs,
        },
        table_all,
        args.out,
    )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
