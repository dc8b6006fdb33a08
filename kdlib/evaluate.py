"""Evaluate a model on a split's center views: top-1, top-5, and agreement with the cached teacher.

Agreement needs no teacher: precompute stores the teacher's predictions on the test split, and
they are used when the store's test source is exactly the source evaluated here (same fingerprint).
They were made on the store's own center views (its recipe's size and center crop, its renderer
and decoder: `meta.test`); agreement is always measured on those views, rendered again when the
model is evaluated on others (a pretrained model at its contract's size and crop), and the result
says which size and crop each number used.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import read_failed
from .contract import InputContract
from .errors import ConfigError, ModelError
from .feed import Feed
from .plan import center_params
from .precision import precision_context
from .render import RENDERER
from .resolve import load_model
from .runtime import process_state
from .source import open_source
from .store import Store, open_store
from .teacher import load_teacher
from .views import Batch, FixedParams, ViewBatches, split_range

__all__ = ["evaluate", "evaluate_model", "predict", "stored_test_views"]


def predict(
    model: torch.nn.Module,
    source,
    size: int,
    center_fraction: float,
    batch_size: int = 512,
    workers: int = 0,
    device: torch.device | None = None,
    accelerator: Any = None,
    precision: str = "fp32",
    renderer: str = RENDERER,
    draft: bool = False,
) -> torch.Tensor:
    """float32 logits [N, C] of the model on every image's center view (`draft`: JPEGs decoded as
    a `pil-draft` store decoded them).

    With an `accelerator` of N processes, each rank predicts a contiguous share of the images on
    its device and every rank gets all N shares back, in order."""
    device = device or (accelerator.device if accelerator is not None else next(model.parameters()).device)
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    n = len(source)
    share = -(-n // world)
    lo, hi = min(n, rank * share), min(n, (rank + 1) * share)
    params = FixedParams(center_params(source.sizes(), np.arange(n), center_fraction))
    batches = [Batch(0, a, b) for a, b in split_range(lo, hi, batch_size)]
    model.eval()
    out = []
    with torch.inference_mode(), precision_context(precision, device):
        for item in Feed(
            ViewBatches(source, batches, size, 1, params, draft=draft, renderer=renderer), device, workers
        ):
            out.append(model(item["views"]).float())
    classes = out[0].shape[1] if out else int(getattr(model, "num_classes", 0))
    logits = torch.cat(out) if out else torch.zeros((0, classes), device=device)
    if world > 1:  # equal shares for the gather: pad the last one, then cut the padding off
        padded = torch.zeros((share, logits.shape[1]), device=logits.device)
        padded[: len(logits)] = logits
        logits = accelerator.gather(padded)[:n]
    return logits.cpu()


def evaluate(
    model_spec: str,
    data: str | None = None,
    split: str = "test",
    limit: int | None = None,
    shards: str | None = None,
    workers: int = 0,
    batch_size: int = 512,
    weights: str | None = None,
    mean: str | None = None,
    std: str | None = None,
    class_map: str | None = None,
    trust_code: bool = False,
    cpu: bool = False,
    size: int | None = None,
) -> dict[str, Any]:
    """JSON-able metrics of a model (a run directory, or an arch / factory / pretrained name with
    `data`) on `data`'s `split`. A run directory is fed at its input_size and recipe's center crop;
    a named model at the size and center crop of its contract, else of the store's recipe (with
    `shards`), else at `size`, which is then required. With `shards`, a named model's missing
    --mean/--std/--class-map are the store's teacher's when it is that teacher (`load_teacher`).
    It runs on the process state's device (a GPU when there is one, unless `cpu`)."""
    device = process_state(cpu).device
    cfg: dict[str, Any] = {}
    cfg_path = Path(model_spec) / "config.json"
    named = not Path(model_spec).is_dir()
    if not named:
        if (failed := read_failed(Path(model_spec))) is not None:  # a run that stopped on a non-finite loss
            raise ModelError(
                f"{model_spec} holds no trained model: its training stopped at step {failed.get('step')} "
                f"({failed.get('reason')}: loss {failed.get('loss')}; see {model_spec}/failed.json): fix the cause "
                "and train again with --overwrite, or --resume from its last finite checkpoint"
            )
        model = load_model(model_spec, trust_code=trust_code)
        if cfg_path.is_file():
            cfg = json.loads(cfg_path.read_text())
    trained = cfg.get("trained_from") or {}
    data = data or trained.get("data")
    if data is None:
        raise ConfigError(f"--data is needed: {model_spec} does not say what it was trained on")
    source = open_source(data, split, limit)
    shards = shards or trained.get("shards")
    if named:  # a named model is loaded as every teacher is
        store = open_store(shards) if shards else None
        model = load_teacher(
            model_spec,
            source,
            device=device,
            weights=weights,
            mean=mean,
            std=std,
            class_map=class_map,
            trust_code=trust_code,
            recorded=store.meta.teacher if store is not None else None,
            recorded_in=str(shards),
        ).model
        size, fraction = _named_views(model_spec, model.contract, store, size)
    else:
        fraction = float((cfg.get("recipe") or {}).get("center_fraction", 1.0))
        size = int(size or cfg.get("input_size") or model.contract.size or source.sizes()[0].min())
    model = model.to(device)
    result = evaluate_model(model, source, size, fraction, shards, workers, batch_size)
    return {"model": str(model_spec), "data": data, "split": split, **result}


def _named_views(spec: str, contract: InputContract, store: Store | None, size: int | None) -> tuple[int, float]:
    """(size, center crop) a named model is evaluated at, said on stderr as precompute says its input."""
    recipe = store.meta.recipe if store is not None else {}
    if size is not None:
        size_from = "--size"
    elif contract.size:
        size, size_from = int(contract.size), f"its input contract, from {contract.origin}"
    elif store is not None:
        size, size_from = int(recipe["size"]), f"the recipe of store {store.url}"
    else:
        raise ConfigError(
            f"eval of {spec}: its input contract (from {contract.origin}) gives no view size; give --size N "
            "(the size its weights expect), or --shards STORE to evaluate at the store's recipe size"
        )
    if contract.crop_fraction:
        fraction, crop_from = float(contract.crop_fraction), f"its input contract, from {contract.origin}"
    elif store is not None:
        fraction, crop_from = float(recipe.get("center_fraction", 1.0)), f"the recipe of store {store.url}"
    else:
        fraction, crop_from = 1.0, "the whole short side: its contract gives no crop"
    print(f"eval {spec} views: {size} px ({size_from}), center crop {fraction:g} ({crop_from})", file=sys.stderr)
    return size, fraction


def evaluate_model(
    model: torch.nn.Module,
    source,
    size: int,
    center_fraction: float = 1.0,
    shards: str | None = None,
    workers: int = 0,
    batch_size: int = 512,
    accelerator: Any = None,
) -> dict[str, Any]:
    """top1/top5 on `source`'s center views (`size`, `center_fraction`); agreement with the teacher
    when `shards` cached it on this source, always on the views its predictions were made on
    (`agreement_size`, `agreement_crop`), or `agreement_note` saying why there is none.

    With an `accelerator`, every rank must call it: each predicts its share on its device."""
    was_training = model.training
    store = open_store(shards) if shards else None
    # with a store, the center views are rendered as its teacher's test predictions were, so that agreement
    # compares answers on the same pixels
    renderer = store.meta.rendered["renderer"] if store is not None else RENDERER
    logits = predict(
        model, source, size, center_fraction, batch_size, workers, accelerator=accelerator, renderer=renderer
    )
    labels = torch.from_numpy(source.labels())
    top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
    result: dict[str, Any] = {
        "images": len(source),
        "top1": round(float((top5[:, 0] == labels).float().mean()), 6),
        "top5": round(float((top5 == labels[:, None]).any(1).float().mean()), 6),
        "size": int(size),
        "crop": float(center_fraction),
    }
    if store is not None:
        result.update(_agreement(model, source, store, size, center_fraction, logits, batch_size, workers, accelerator))
    model.train(was_training)
    return result


def stored_test_views(store: Store) -> dict[str, Any]:
    """How the store's test predictions were rendered: size, center crop, renderer, decoder. Stores
    older than the `meta.test` record used the recipe's, as precompute always did."""
    meta = store.meta
    test = meta.test or {}
    return {
        "size": int(test.get("size", meta.recipe["size"])),
        "center_fraction": float(test.get("center_fraction", meta.recipe.get("center_fraction", 1.0))),
        "renderer": meta.rendered["renderer"],
        "decoder": test.get("decoder", meta.rendered["decoder"]),
    }


def _agreement(
    model: torch.nn.Module,
    source,
    store: Store,
    size: int,
    center_fraction: float,
    logits: torch.Tensor,
    batch_size: int,
    workers: int,
    accelerator: Any,
) -> dict[str, Any]:
    """agreement / teacher_top1 on the store's test views, with their size and crop; else a note why not."""
    test_meta = store.meta.test
    if test_meta is None:
        return {"agreement_note": f"store {store.url} holds no teacher predictions on a test split"}
    if test_meta["source"]["fingerprint"] != source.fingerprint():
        src = test_meta["source"]
        return {
            "agreement_note": f"store {store.url} holds the teacher's predictions on another source "
            f"({src.get('name', '?')} {src.get('split', '?')}, {src.get('num_images', '?')} images; here "
            f"{source.name} {source.split}, {len(source)}): evaluate the split and --limit it was precomputed with"
        }
    views = stored_test_views(store)
    draft = views["decoder"] == "pil-draft"
    if (views["size"], views["center_fraction"], draft) != (int(size), float(center_fraction), False):
        try:  # the model's answers on the teacher's own views
            logits = predict(
                model,
                source,
                views["size"],
                views["center_fraction"],
                batch_size,
                workers,
                accelerator=accelerator,
                renderer=views["renderer"],
                draft=draft,
            )
        except RuntimeError as exc:  # e.g. a network that takes one input size only
            return {
                "agreement_note": f"the teacher's test predictions in store {store.url} are on "
                f"{views['size']} px views (center crop {views['center_fraction']:g}), which this model "
                f"cannot take ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
            }
    test = store.read_test()
    labels = torch.from_numpy(source.labels())
    mine = logits.topk(min(5, logits.shape[1]), dim=1).indices[:, 0]  # the top-1 that top1 counts
    teacher_top1 = torch.from_numpy(test["ids"][:, 0].astype(np.int64))
    return {
        "agreement": round(float((mine == teacher_top1).float().mean()), 6),
        "teacher_top1": round(float((teacher_top1 == labels).float().mean()), 6),
        "agreement_size": views["size"],
        "agreement_crop": views["center_fraction"],
    }
