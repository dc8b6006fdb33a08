"""Evaluate a model on a split's center views: top-1, top-5, and agreement with the cached teacher.

Agreement needs no teacher: precompute stores the teacher's predictions on the test split, and
they are used when the store's test source is exactly the source evaluated here (same fingerprint).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import ConfigError
from .feed import Feed
from .plan import center_params
from .precision import precision_context
from .render import RENDERER
from .resolve import load_model
from .runtime import process_state
from .source import open_source
from .store import open_store
from .teacher import load_teacher
from .views import Batch, FixedParams, ViewBatches, split_range

__all__ = ["evaluate", "evaluate_model", "predict"]


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
) -> torch.Tensor:
    """float32 logits [N, C] of the model on every image's center view.

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
        for item in Feed(ViewBatches(source, batches, size, 1, params, renderer=renderer), device, workers):
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
) -> dict[str, Any]:
    """JSON-able metrics of a model (a run directory, or an arch / factory / pretrained name with
    `data`) on `data`'s `split`. A named model is fed at the size and center crop of its contract.
    It runs on the process state's device (a GPU when there is one, unless `cpu`)."""
    device = process_state(cpu).device
    cfg: dict[str, Any] = {}
    cfg_path = Path(model_spec) / "config.json"
    if Path(model_spec).is_dir():
        model = load_model(model_spec, trust_code=trust_code)
        if cfg_path.is_file():
            cfg = json.loads(cfg_path.read_text())
    trained = cfg.get("trained_from") or {}
    data = data or trained.get("data")
    if data is None:
        raise ConfigError(f"--data is needed: {model_spec} does not say what it was trained on")
    source = open_source(data, split, limit)
    recipe = cfg.get("recipe") or {}
    fraction = float(recipe.get("center_fraction", 1.0))
    if not Path(model_spec).is_dir():  # a named model is loaded as every teacher is
        model = load_teacher(
            model_spec,
            source,
            device=device,
            weights=weights,
            mean=mean,
            std=std,
            class_map=class_map,
            trust_code=trust_code,
        ).model
        fraction = float(model.contract.crop_fraction or fraction)
    size = int(cfg.get("input_size") or model.contract.size or source.sizes()[0].min())
    model = model.to(device)
    result = evaluate_model(model, source, size, fraction, shards or trained.get("shards"), workers, batch_size)
    return {"model": str(model_spec), "data": data, "split": split, **result}


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
    """top1/top5 on `source`'s center views; agreement when `shards` cached the teacher on this source.

    With an `accelerator`, every rank must call it: each predicts its share on its device."""
    was_training = model.training
    store = open_store(shards) if shards else None
    # with a store, the center views are rendered as its teacher's test predictions were, so that agreement
    # compares answers on the same pixels
    renderer = store.meta.rendered["renderer"] if store is not None else RENDERER
    logits = predict(
        model, source, size, center_fraction, batch_size, workers, accelerator=accelerator, renderer=renderer
    )
    model.train(was_training)
    labels = torch.from_numpy(source.labels())
    top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
    result: dict[str, Any] = {
        "images": len(source),
        "top1": round(float((top5[:, 0] == labels).float().mean()), 6),
        "top5": round(float((top5 == labels[:, None]).any(1).float().mean()), 6),
    }
    if store is not None:
        test = store.read_test()
        if test is not None and store.meta.test["source"]["fingerprint"] == source.fingerprint():
            teacher_top1 = torch.from_numpy(test["ids"][:, 0].astype(np.int64))
            result["agreement"] = round(float((top5[:, 0] == teacher_top1).float().mean()), 6)
            result["teacher_top1"] = round(float((teacher_top1 == labels).float().mean()), 6)
    return result
