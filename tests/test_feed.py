"""kdlib.feed (issue 10): render where the model runs, same pixels wherever that is; one feed per run;
what rendered a store is recorded, checked by verify, and replayed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FMNIST_RECIPE, LIMIT, smooth_jpegs

from kdlib.feed import Feed, render_device, render_place
from kdlib.plan import make_plan
from kdlib.recipe import Recipe
from kdlib.render import decode_batch, draft_scales, param_tensors, render_decoded
from kdlib.source import open_source
from kdlib.store import ChunkCache, open_store
from kdlib.views import Batch, FixedParams, PlanParams, ViewBatches, split_range

CPU = torch.device("cpu")
GOLDEN = Path(__file__).resolve().parent / "data" / "golden-v1"


def _views(ds: ViewBatches, workers: int, render: str) -> list[tuple[Batch, torch.Tensor]]:
    feed = Feed(ds, CPU, workers, render)
    return [(Batch(it["epoch"], it["start"], it["stop"]), it["views"].clone()) for it in feed]


@pytest.mark.parametrize("mix", ["none", "mixup", "cutmix", "both"])
@pytest.mark.parametrize("m,c", [(2, 1), (4, 2), (2, 3)])
def test_device_render_equals_worker_render(train_source, mix, m, c):
    r = Recipe(mix=mix, images_per_group=m, crops_per_image=c, mix_prob=0.7, size=24)
    g = r.group_size
    batches = [Batch(e, a, b) for e in (0, 1) for a, b in split_range(0, 6 * g, 3 * g)]
    ds = ViewBatches(train_source, batches, r.size, g, PlanParams(r, train_source.sizes()))
    on_device = _views(ds, 0, "device")
    in_workers = _views(ds, 2, "workers")
    assert [b for b, _ in on_device] == [b for b, _ in in_workers] == batches
    for (b, x), (_, y) in zip(on_device, in_workers):
        assert x.dtype == torch.uint8 and x.shape == (b.stop - b.start, 1, 24, 24)
        assert torch.equal(x, y), b


def test_device_render_equals_worker_render_on_mixed_size_rgb(rgb_folder):
    src = open_source(rgb_folder)
    r = Recipe(mix="both", images_per_group=4, crops_per_image=2, size=12, mix_prob=1.0)
    ds = ViewBatches(
        src, [Batch(0, 0, 8), Batch(0, 8, 16), Batch(3, 0, 16)], r.size, r.group_size, PlanParams(r, src.sizes())
    )
    for (_, x), (_, y) in zip(_views(ds, 0, "device"), _views(ds, 2, "workers")):
        assert x.shape[1] == 3 and torch.equal(x, y)


def test_render_place():
    assert render_place("auto", CPU, 2) == "workers" and render_place("auto", CPU, 0) == "device"
    assert render_place("auto", torch.device("cuda"), 8) == "device"
    assert render_place("workers", CPU, 0) == "device"  # no workers: the main process renders
    # what a store records: the kind of device that really rendered (workers render on the CPU)
    assert render_device("workers", torch.device("cuda"), 8) == "cpu"
    assert render_device("auto", torch.device("cuda"), 8) == "cuda" and render_device("auto", CPU, 2) == "cpu"


def test_one_feed_over_many_epochs_gives_each_epochs_views(train_source):
    """The workers live for the whole run: the views of every epoch are those of a fresh loader."""
    r = Recipe(mix="mixup", images_per_group=4, crops_per_image=1, size=28)
    plan = PlanParams(r, train_source.sizes())
    batches = [Batch(e, a, b) for e in range(3) for a, b in split_range(0, 64, 16)]
    run = _views(ViewBatches(train_source, batches, r.size, r.group_size, plan), 2, "workers")
    for e in range(3):
        fresh = _views(
            ViewBatches(
                train_source,
                [b for b in batches if b.epoch == e],
                r.size,
                r.group_size,
                FixedParams(make_plan(r, train_source.sizes(), e)),
            ),
            0,
            "device",
        )
        mine = [v for b, v in run if b.epoch == e]
        assert len(mine) == len(fresh) == 4
        assert all(torch.equal(x, y) for x, (_, y) in zip(mine, fresh))
    assert not torch.equal(run[0][1], run[4][1])  # epochs differ


def test_steps_log_is_the_same_with_fewer_host_reads(store_dir, tmp_path):
    from kdlib.train import TrainConfig, train

    logs = {}
    for every in (1, 5):
        out = tmp_path / f"every{every}"
        train(
            TrainConfig(
                out=str(out),
                shards=store_dir,
                epochs=2,
                batch_size=64,
                workers=2,
                eval=False,
                cpu=True,
                log_every=every,
                checkpoint_every=3,
            )
        )
        logs[every] = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert len(logs[1]) == 2 * 256 // 64
    assert logs[1] == logs[5]  # every step, same loss, lr and view digest
    assert len({s["views"] for s in logs[1]}) == len(logs[1])


# -- what rendered a store: recorded, checked, replayed --------------------------------------------
def test_store_records_its_renderer_and_keeps_a_pixel_sample(store):
    meta = store.meta
    assert meta.format_version == 2
    assert meta.rendered["device"] == "cpu" and meta.rendered["decoder"] == "pil"
    assert meta.render["renderer"] == "pil-bilinear-1" and meta.precision == "fp32"
    info, pixels = store.read_pixels()
    assert info["epoch"] == 0 and info["start"] == 0 and pixels.shape == (8, 1, 28, 28)
    r = Recipe.from_dict(meta.recipe)
    ds = ViewBatches(
        open_source("fashion-mnist", "train", LIMIT), [Batch(0, 0, 8)], r.size, r.group_size, ChunkCache(store)
    )
    assert np.array_equal(_views(ds, 0, "device")[0][1].numpy(), pixels)


def test_verify_reports_pixel_parity(store_dir, teacher_dir):
    from kdlib.verify import verify

    r = verify(store_dir, teacher_dir, views=64)
    assert r["ok"] and r["pixels"] == {"views": 8, "max_pixel_diff": 0, "pixels_differing": 0.0, "ok": True}
    assert r["rendered_on"] == r["replayed_on"] == "cpu" and r["precision"] == "fp32"


def _set_pixels(store_dir: str, change) -> None:
    s = open_store(store_dir)
    info, pixels = s.read_pixels()
    s.write_pixels(change(pixels.copy()), info["epoch"], info["start"])


def test_verify_fails_on_a_real_replay_error(store_copy, teacher_dir):
    """Params that no longer give the stored pixels: the pixel check says so, whatever the logits do."""
    from kdlib.verify import verify

    s = open_store(store_copy)
    cols = s.read_chunk(0, 0)
    cols["box"][:8, 0] = np.maximum(cols["box"][:8, 0] - 1, 0)
    cols["box"][:8, 2] = np.maximum(cols["box"][:8, 2] - 3, 1)
    s.write_chunk(0, 0, cols)  # consistent checksums: only verify can tell
    r = verify(store_copy, teacher_dir, views=8)
    assert r["pixels"]["max_pixel_diff"] > 1 and r["pixels"]["ok"] is False and r["ok"] is False


def _one_lsb(p):  # the roi_align CPU/CUDA gap: a few pixels 1 apart
    p.reshape(-1)[:3] = np.where(p.reshape(-1)[:3] < 255, p.reshape(-1)[:3] + 1, 254)
    return p


def _mark(store_dir: str, **render) -> None:
    meta = json.loads(Path(store_dir, "meta.json").read_text())
    meta["render"].update(render)
    Path(store_dir, "meta.json").write_text(json.dumps(meta))


def test_pil_bilinear_store_must_match_exactly_on_another_device_kind(store_copy, teacher_dir):
    from kdlib.verify import verify

    _mark(store_copy, device="cuda")  # as if a GPU had written it: replayed here on the CPU
    r = verify(store_copy, teacher_dir, views=64)
    assert r["rendered_on"] == "cuda" and r["replayed_on"] == "cpu" and r["pixels"]["max_pixel_diff"] == 0 and r["ok"]
    _set_pixels(store_copy, _one_lsb)  # integer resample: even 1 LSB is a replay error
    r = verify(store_copy, teacher_dir, views=64)
    assert r["pixels"]["max_pixel_diff"] == 1 and r["pixels"]["ok"] is False and r["ok"] is False


def test_roi_align_store_may_differ_by_one_lsb_on_another_device_kind(store_copy, teacher_dir):
    """A roi_align-1 store written on a GPU: its sample may be 1 LSB off a CPU replay, never more."""
    from kdlib.store import open_store
    from kdlib.verify import verify

    _mark(store_copy, device="cuda", renderer="roi_align-1")
    store = open_store(store_copy)
    info, _ = store.read_pixels()
    meta = store.meta
    r = Recipe.from_dict(meta.recipe)
    ds = ViewBatches(
        open_source("fashion-mnist", "train", meta.source["limit"]),
        [Batch(info["epoch"], info["start"], info["start"] + 8)],
        r.size,
        r.group_size,
        ChunkCache(store),
        renderer="roi_align-1",
    )
    _set_pixels(store_copy, lambda p: _one_lsb(_views(ds, 0, "device")[0][1].numpy()))
    found = verify(store_copy, teacher_dir, views=64)["pixels"]  # the logits were made from other pixels
    assert found["max_pixel_diff"] == 1 and found["ok"], found
    _set_pixels(store_copy, lambda p: np.where(p < 250, p + 5, p))  # more than the gap: a replay error
    assert verify(store_copy, teacher_dir, views=64)["pixels"]["ok"] is False


def test_same_device_kind_must_match_exactly(store_copy, teacher_dir):
    from kdlib.verify import verify

    _set_pixels(store_copy, lambda p: np.where(np.arange(p.size).reshape(p.shape) == 0, p ^ 1, p))
    r = verify(store_copy, teacher_dir, views=64)
    assert r["pixels"]["max_pixel_diff"] == 1 and r["ok"] is False


def test_bf16_store_records_its_precision_and_verifies_in_it(teacher_dir, tmp_path):
    from kdlib.precompute import PrecomputeConfig, precompute
    from kdlib.verify import verify

    out = str(tmp_path / "bf16")
    store = precompute(
        PrecomputeConfig(
            teacher=teacher_dir,
            data="fashion-mnist",
            out=out,
            recipe=FMNIST_RECIPE,
            k=3,
            limit=64,
            chunk_views=32,
            workers=0,
            precision="bf16",
            test=False,
        )
    )
    assert store.meta.precision == "bf16"
    r = verify(out, teacher_dir, views=64)
    assert r["precision"] == "bf16" and r["ok"], r
    # an fp32 run of the same teacher is not what the store holds: refused when extending
    from kdlib.errors import StoreMismatchError

    with pytest.raises(StoreMismatchError, match="precision"):
        precompute(
            PrecomputeConfig(
                teacher=teacher_dir,
                data="fashion-mnist",
                out=out,
                recipe=FMNIST_RECIPE,
                k=3,
                limit=64,
                chunk_views=32,
                workers=0,
                precision="fp32",
                epochs=2,
                test=False,
            )
        )


# sha256 of every view of the golden format-1 store (2 epochs x 256 views, fkd recipe, 28 px), rendered by
# commit 7be3a72's `render_views` (CPU, in the workers) on this project's 2-core machine
GOLDEN_PIXELS = "3333a13fc586eaf0c70019a76765cde691c17b63857ca9bbbe355d357a4f25af"


@pytest.mark.parametrize("workers,render", [(0, "device"), (2, "workers")])
def test_golden_v1_store_replays_the_pixels_it_was_made_from(workers, render):
    """A format-1 store (no render record) replays exactly as before the render moved to the feed."""
    import hashlib

    golden = open_store(str(GOLDEN / "zarr"))
    meta = golden.meta
    assert meta.format_version == 1 and meta.render is None and meta.rendered["device"] == "cpu"
    r = Recipe.from_dict(meta.recipe)
    batches = [Batch(e, a, b) for e in range(meta.epochs_done) for a, b in split_range(0, meta.views_per_epoch, 48)]
    source = open_source("fashion-mnist", "train", meta.source["limit"])
    h = hashlib.sha256()
    data = ViewBatches(source, batches, r.size, r.group_size, ChunkCache(golden), renderer=meta.rendered["renderer"])
    for _, views in _views(data, workers, render):
        h.update(views.numpy().tobytes())
    assert h.hexdigest() == GOLDEN_PIXELS


# -- the pil-draft decoder -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory) -> str:
    """16 smooth RGB JPEGs of 96x80 and 80x120, 2 classes."""
    return smooth_jpegs(tmp_path_factory.mktemp("jpegs"), [(120, 80), (80, 96), (80, 96)], 16, seed=5)


def test_draft_scales_need_every_box_shrunk():
    p = {
        "image": np.array([0, 0, 1, 2], np.uint32),
        "box": np.array([[0, 0, 64, 70], [0, 0, 33, 40], [0, 0, 130, 140], [0, 0, 20, 20]], np.int32),
    }
    assert draft_scales(p, 16) == {0: 2, 1: 8}


def test_draft_decoding_is_smaller_and_changes_pixels(jpeg_folder):
    src = open_source(jpeg_folder)
    r = Recipe(mix="none", images_per_group=2, crops_per_image=2, size=16, scale=(0.5, 1.0), flip=False)
    p = make_plan(r, src.sizes(), 0)
    p = {k: a[:8] for k, a in p.items()}
    full = decode_batch(p, src.decode, r.size)
    draft = decode_batch(p, src.decode, r.size, src.decode_draft)
    assert all(d.shape[-1] < f.shape[-1] for d, f in zip(draft.stacks, full.stacks))
    assert set(draft.scale.tolist()) <= {0.5, 0.25} and 0.5 in draft.scale.tolist()
    a = render_decoded(param_tensors(p, full, r.size, r.group_size), full, r.size)
    b = render_decoded(param_tensors(p, draft, r.size, r.group_size), draft, r.size)
    diff = (a.int() - b.int()).abs()
    assert diff.max() > 0 and diff.float().mean() < 8  # the same crops, decoded another way


def test_pil_draft_store_is_replayed_with_its_decoder(jpeg_folder, tmp_path):
    from kdlib.errors import StoreMismatchError
    from kdlib.precompute import PrecomputeConfig, precompute
    from kdlib.train import TrainConfig, train
    from kdlib.verify import verify

    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "size: 16\ncrop: inception\nscale: [0.5, 1.0]\nmix: mixup\nimages_per_group: 2\ncrops_per_image: 2\n"
    )
    teacher = str(tmp_path / "teacher")
    train(
        TrainConfig(
            out=teacher,
            student="resnet8",
            data=jpeg_folder,
            recipe=str(recipe),
            loss="ce",
            epochs=1,
            batch_size=8,
            workers=0,
            eval=False,
            cpu=True,
        )
    )
    out = str(tmp_path / "draft")
    store = precompute(
        PrecomputeConfig(
            teacher=teacher,
            data=jpeg_folder,
            out=out,
            recipe=str(recipe),
            k=2,
            chunk_views=8,
            batch_size=8,
            workers=2,
            decode="pil-draft",
            test=False,
        )
    )
    assert store.meta.rendered["decoder"] == "pil-draft"
    r = verify(out, teacher, views=32)
    assert r["decoder"] == "pil-draft" and r["pixels"]["max_pixel_diff"] == 0 and r["ok"], r
    res = train(
        TrainConfig(out=str(tmp_path / "student"), shards=out, epochs=1, batch_size=8, workers=2, eval=False, cpu=True)
    )
    assert res["steps"] == store.meta.views_per_epoch // 8
    with pytest.raises(StoreMismatchError, match="render"):
        precompute(
            PrecomputeConfig(
                teacher=teacher,
                data=jpeg_folder,
                out=out,
                recipe=str(recipe),
                k=2,
                epochs=2,
                chunk_views=8,
                batch_size=8,
                workers=0,
                decode="pil",
                test=False,
            )
        )
    shutil.rmtree(out)


def test_a_resumed_store_keeps_the_renderer_it_was_written_with(store_copy, teacher_dir):
    """A store written before pil-bilinear-1 (roi_align-1) is extended with roi_align-1, not refused or mixed."""
    from conftest import CHUNK_VIEWS, LIMIT, STORE_K

    from kdlib.precompute import PrecomputeConfig, precompute

    _mark(store_copy, renderer="roi_align-1")
    before = open_store(store_copy)
    grown = precompute(
        PrecomputeConfig(
            teacher=teacher_dir,
            data="fashion-mnist",
            out=store_copy,
            recipe=FMNIST_RECIPE,
            epochs=before.meta.epochs_done + 1,
            k=STORE_K,
            limit=LIMIT,
            chunk_views=CHUNK_VIEWS,
            workers=0,
            test=False,
        )
    )
    assert grown.meta.epochs_done == before.meta.epochs_done + 1
    assert grown.meta.rendered["renderer"] == "roi_align-1"
    # the new epoch's views were rendered with roi_align-1: replaying it gives the teacher's stored answers
    r = Recipe.from_dict(grown.meta.recipe)
    epoch = before.meta.epochs_done
    src = open_source("fashion-mnist", "train", LIMIT)
    cols = grown.read_chunk(epoch, 0)
    views = _views(
        ViewBatches(src, [Batch(epoch, 0, 64)], r.size, r.group_size, ChunkCache(grown), renderer="roi_align-1"),
        0,
        "device",
    )[0][1]
    from kdlib.resolve import load_model

    with torch.no_grad():
        top = load_model(teacher_dir).eval()(views).argmax(1).numpy()
    assert (top == np.asarray(cols["ids"])[:, 0].astype(np.int64)).all()


def test_accelerator_path_keeps_host_params_on_the_host(train_source):
    """On a non-CPU device the feed renders with the batched taps and never moves the host-side numpy params
    (a 'meta' device stands in for CUDA here: every op runs, no data)."""
    r = Recipe(mix="both", images_per_group=2, crops_per_image=2, size=20, mix_prob=0.7)
    ds = ViewBatches(
        train_source, [Batch(0, 0, 16), Batch(1, 16, 32)], r.size, r.group_size, PlanParams(r, train_source.sizes())
    )
    items = list(Feed(ds, torch.device("meta"), 0, "device"))
    assert [it["views"].shape for it in items] == [(16, 1, 20, 20)] * 2
    assert all(it["views"].device.type == "meta" and it["views"].dtype == torch.uint8 for it in items)
    assert all("params" not in it and "decoded" not in it for it in items)


def test_only_roi_align_stores_are_tied_to_a_device_kind(store):
    """Extending a store on another device kind: refused for roi_align-1 (its pixels would differ by 1 LSB),
    allowed for pil-bilinear-1 (integer arithmetic, the same bytes)."""
    from kdlib.errors import StoreMismatchError
    from kdlib.store.format import check_compatible

    meta = store.meta
    on_gpu = meta.replace(render={**meta.render, "device": "cuda"})
    check_compatible(meta, on_gpu, "here")  # pil-bilinear-1: fine
    old = meta.replace(render={**meta.render, "renderer": "roi_align-1"})
    with pytest.raises(StoreMismatchError, match="render"):
        check_compatible(old, old.replace(render={**old.render, "device": "cuda"}), "here")
