"""Fashion-MNIST as an ImageFolder, webdataset tars and a Hugging Face dataset, all with the same PNG bytes.

    python precompute/convert_fashion_mnist.py --out DIR [--format folder,wds,hf,parquet] [--limit N] [--shard-size 10000]

Reads the IDX files kdlib reads (`--data fashion-mnist`: $KDLIB_DATA, the Debian package, or a download)
and writes, for the train and test splits (the first N images of each with --limit):

    DIR/folder/{train,test}/<class>/<index>.png     --data DIR/folder
    DIR/wds/{train,test}-NNNNNN.tar                  --data 'wds:DIR/wds/train-{000000..00000K}.tar?test=test-{...}.tar'
    DIR/hf/                                           --data hf:DIR/hf      (save_to_disk: a DatasetDict)
    DIR/parquet/{train,test}-00000-of-00001.parquet   --data hf:DIR/parquet

and prints the --data value of each. Every form holds the same images in the same order (the
ImageFolder's: by class, then by file name), each encoded once as an 8-bit grayscale PNG, so one teacher
gives one store content digest from any of them (tests/test_source_wds_hf.py checks it). Classes are
named "<id>_<name>" ("0_T-shirt-top", ..., "9_Ankle-boot") so that folder names sort in class-id order.
A tar sample is `<index>.png`, `<index>.cls` (the class id) and `<index>.json` ({"label", "class_name"}).
The hf and parquet forms need `pip install 'kdlib[hf]'`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile

from PIL import Image

FORMATS = ("folder", "wds", "hf", "parquet")


def class_names() -> list[str]:
    from kdlib.source import FASHION_MNIST_CLASSES

    return [f"{i}_{name.replace('/', '-').replace(' ', '-')}" for i, name in enumerate(FASHION_MNIST_CLASSES)]


def encoded_split(split: str, limit: int | None) -> list[tuple[int, int, bytes]]:
    """(index, label, PNG bytes) of the first `limit` images of `split`, in the ImageFolder's order."""
    from kdlib.source import open_source

    source = open_source("fashion-mnist", split, limit)
    labels = source.labels()
    out = []
    for i in range(len(source)):
        buf = io.BytesIO()
        Image.fromarray(source.decode(i)[0], mode="L").save(buf, format="PNG")
        out.append((i, int(labels[i]), buf.getvalue()))
    return sorted(out, key=lambda r: (r[1], f"{r[0]:05d}.png"))  # class folder, then file name


def write_folder(root: str, splits: dict, classes: list[str]) -> str:
    for split, rows in splits.items():
        for i, label, png in rows:
            d = os.path.join(root, split, classes[label])
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, f"{i:05d}.png"), "wb") as f:
                f.write(png)
    return root


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # reproducible shards
    tar.addfile(info, io.BytesIO(data))


def write_wds(root: str, splits: dict, classes: list[str], shard_size: int) -> str:
    os.makedirs(root, exist_ok=True)
    patterns = {}
    for split, rows in splits.items():
        shards = [rows[a : a + shard_size] for a in range(0, len(rows), shard_size)]
        for s, shard in enumerate(shards):
            with tarfile.open(os.path.join(root, f"{split}-{s:06d}.tar"), "w", format=tarfile.USTAR_FORMAT) as tar:
                for i, label, png in shard:
                    key = f"{i:05d}"
                    _add(tar, f"{key}.png", png)
                    _add(tar, f"{key}.cls", str(label).encode())
                    _add(tar, f"{key}.json", json.dumps({"label": label, "class_name": classes[label]}).encode())
        patterns[split] = f"{split}-{{000000..{len(shards) - 1:06d}}}.tar"
    test = f"?test={patterns['test']}" if "test" in patterns else ""
    return f"wds:{root}/{patterns['train']}{test}"


def _datasets(splits: dict, classes: list[str]):
    import datasets

    datasets.disable_progress_bars()
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes)})
    return {
        split: datasets.Dataset.from_dict(
            {"image": [{"bytes": png, "path": None} for _, _, png in rows], "label": [r[1] for r in rows]},
            features=features,
        )
        for split, rows in splits.items()
    }


def write_hf(root: str, splits: dict, classes: list[str]) -> str:
    import datasets

    datasets.DatasetDict(_datasets(splits, classes)).save_to_disk(root)
    return f"hf:{root}"


def write_parquet(root: str, splits: dict, classes: list[str]) -> str:
    os.makedirs(root, exist_ok=True)
    for split, ds in _datasets(splits, classes).items():
        ds.to_parquet(os.path.join(root, f"{split}-00000-of-00001.parquet"))
    return f"hf:{root}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder that receives folder/, wds/, hf/, parquet/")
    ap.add_argument("--format", default="folder,wds,hf", help=f"comma-separated, of {', '.join(FORMATS)}")
    ap.add_argument("--limit", type=int, default=None, help="the first N images of each split")
    ap.add_argument("--shard-size", type=int, default=10000, help="images per tar shard")
    args = ap.parse_args(argv)
    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    if bad := [f for f in formats if f not in FORMATS] or ([] if formats else ["(none)"]):
        print(f"error: --format {bad[0]} is unknown; choose among {', '.join(FORMATS)}", file=sys.stderr)
        return 2
    if args.limit is not None and args.limit < 1 or args.shard_size < 1:
        print("error: --limit and --shard-size must be positive", file=sys.stderr)
        return 2
    if {"hf", "parquet"} & set(formats):  # checked before anything is written, not after the folder form
        try:
            import datasets  # noqa: F401
        except ImportError as e:
            print(f"error: --format hf and parquet need the datasets package ({e}): pip install 'kdlib[hf]'",
                  file=sys.stderr)  # fmt: skip
            return 2
    taken = [os.path.join(args.out, f) for f in formats if os.path.exists(os.path.join(args.out, f))]
    if taken:
        print(f"error: {taken[0]} exists: remove it or give another --out", file=sys.stderr)
        return 2
    try:
        splits = {split: encoded_split(split, args.limit) for split in ("train", "test")}
    except Exception as e:  # kdlib's SourceError: the IDX files are missing or unreadable
        print(f"error: {e}", file=sys.stderr)
        return 2
    classes = class_names()
    for fmt in formats:
        root = os.path.abspath(os.path.join(args.out, fmt))
        if fmt == "folder":
            data = write_folder(root, splits, classes)
        elif fmt == "wds":
            data = write_wds(root, splits, classes, args.shard_size)
        elif fmt == "hf":
            data = write_hf(root, splits, classes)
        else:
            data = write_parquet(root, splits, classes)
        print(f"{fmt}: --data '{data}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
