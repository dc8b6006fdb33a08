"""Write the golden stores that tests/test_golden.py reads back (the current format version, both backends).

    .venv/bin/python tests/data/make_golden.py

Run it only when the format version changes (then keep the old directory: later versions must
still read it, or refuse it clearly). It trains a tiny teacher, precomputes 2 epochs of 64
Fashion-MNIST images in zarr and in webdataset, and records what the reader must find. From version 2
the teacher has DIH heads (fitted 1 epoch) and the store keeps attention maps of its last stage (4x4, q8).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from kdlib.heads import HeadsConfig, fit_heads
from kdlib.precompute import PrecomputeConfig, precompute
from kdlib.store import FORMAT_VERSION, open_store
from kdlib.train import TrainConfig, train

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def main() -> None:
    out = HERE / f"golden-v{FORMAT_VERSION}"
    shutil.rmtree(out, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        teacher = f"{tmp}/teacher"
        train(
            TrainConfig(
                out=teacher,
                student="resnet8",
                data="fashion-mnist",
                loss="ce",
                epochs=1,
                limit=64,
                batch_size=32,
                workers=0,
                eval=False,
                cpu=True,
            )
        )
        extra = {}
        if FORMAT_VERSION >= 2:  # version 2's columns: one label set per DIH head, attention maps
            fit_heads(
                HeadsConfig(
                    teacher=teacher,
                    data="fashion-mnist",
                    out=f"{tmp}/heads",
                    epochs=1,
                    limit=64,
                    batch_size=32,
                    workers=0,
                    cpu=True,
                    eval=False,
                    recipe=str(REPO / "precompute/fkd.yaml"),
                )
            )
            teacher = f"{tmp}/heads"
            extra = {"attention": "stage3", "attention_grid": 4, "attention_codec": "q8"}
        expected = {}
        for backend in ("zarr", "wds"):
            store = precompute(
                PrecomputeConfig(
                    teacher=teacher,
                    data="fashion-mnist",
                    out=str(out / backend),
                    recipe=str(REPO / "precompute/fkd.yaml"),
                    epochs=2,
                    k=3,
                    limit=64,
                    chunk_views=64,
                    workers=0,
                    backend=backend,
                    full_sample=0.125,
                    **extra,
                )
            )
            shutil.rmtree(out / backend / "logs", ignore_errors=True)
            s = open_store(str(out / backend))
            first = s.read_chunk(1, 1)
            expected[backend] = {
                "digest": s.content_digest(),
                "epochs_done": s.meta.epochs_done,
                "views_per_epoch": s.meta.views_per_epoch,
                "k": s.meta.k,
                "epoch1_chunk1": {
                    "image": first["image"][:8].tolist(),
                    "box": first["box"][:2].tolist(),
                    "lam": first["lam"][:4].tolist(),
                    "ids": first["ids"][:2].tolist(),
                    "logits": first["logits"][:2].astype(float).tolist(),
                    "lse": first["lse"][:2].tolist(),
                    "full": first["full"][:1].astype(float).tolist(),
                },
                "test_ids": s.read_test()["ids"][:4].tolist(),
            }
            if FORMAT_VERSION >= 2:
                expected[backend]["heads"] = s.meta.heads
                expected[backend]["attention"] = s.meta.attention
                expected[backend]["epoch1_chunk1"].update(
                    {
                        "h2_ids": first["h2_ids"][:2].tolist(),
                        "h2_logits": first["h2_logits"][:2].astype(float).tolist(),
                        "at1": first["at1"][:1].tolist(),
                    }
                )
            del store
    (out / "EXPECTED.json").write_text(json.dumps(expected, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
