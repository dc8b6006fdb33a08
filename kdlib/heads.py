"""`kdlib heads`: fit DIH classifier heads on a frozen teacher (the model is `kdlib.headed`).

The recipe's planned views (crops, flips, mixing) with mixed labels, AdamW on the heads only,
warmup + cosine; the backbone runs in eval mode under no_grad, so neither its weights nor its
BatchNorm statistics move (checked by digest before saving). The reference fine-tunes with SGD
(lr 0.1, Nesterov); a linear layer on 10^4..10^5 unnormalised features is easier to keep stable
with Adam, and only the heads' quality depends on it.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .attention import parse_layers
from .errors import ConfigError
from .feed import Feed
from .headed import HEADS_KEY, attach_heads, backbone_digest
from .losses import mixed_label_targets, soft_cross_entropy
from .plan import center_params
from .recipe import load_recipe
from .replay import Replay
from .rundir import save_model
from .runtime import process_state
from .schedule import warmup_cosine
from .source import open_source
from .targets import LabelTargets
from .teacher import load_teacher
from .views import Batch, FixedParams, ViewBatches, split_range

__all__ = ["HeadsConfig", "fit_heads"]


@dataclass
class HeadsConfig:
    """Everything `kdlib heads` takes (see `kdlib heads -h`)."""

    teacher: str
    data: str
    out: str
    recipe: str | None = None
    epochs: int = 1
    head_layers: str | None = None  # comma-separated layer paths or stageN; default: every stage
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 5e-4
    warmup: float = 0.05
    weights: str | None = None
    limit: int | None = None
    workers: int = 2
    seed: int = 0  # heads' init
    cpu: bool = False
    eval: bool = True


def fit_heads(cfg: HeadsConfig) -> dict[str, Any]:
    """Fit heads on a frozen teacher over the recipe's views; save the headed run dir to `cfg.out`."""
    if cfg.epochs < 1 or cfg.batch_size < 1 or not cfg.lr > 0:
        raise ConfigError(
            f"heads: epochs, batch size and lr must be positive, got {cfg.epochs}, {cfg.batch_size}, {cfg.lr}"
        )
    state = process_state(cfg.cpu)
    device = state.device
    source = open_source(cfg.data, "train", cfg.limit)
    recipe = load_recipe(cfg.recipe)
    # the teacher as every stage loads it (its weights' contract, never guessed for pretrained ones)
    teacher = load_teacher(cfg.teacher, source, device=device, weights=cfg.weights)
    before = teacher.digest
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = attach_heads(teacher.model, parse_layers(cfg.head_layers), recipe.size)
    model.to(device).eval()  # eval: BatchNorm uses, and keeps, its running statistics
    for p in model.net.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(model.heads.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    g = recipe.group_size
    batch = max(g, cfg.batch_size // g * g)
    # train's loop over the planned views (its batches, feed and labels), keeping each epoch's last smaller batch
    replay = Replay(
        LabelTargets(source, recipe),
        batch_size=batch,
        epochs=cfg.epochs,
        device=device,
        rank=0,
        world=1,
        workers=cfg.workers,
        drop_last=False,
    )
    # and train's schedule (warmup + cosine over every step), stepped as train steps it
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(replay.total_steps, cfg.warmup))
    log = []
    t0 = time.time()
    batches = iter(replay)
    for epoch in range(cfg.epochs):
        # summed on the device and read once per epoch: no host sync per step
        loss_sum, correct, seen = torch.zeros((), device=device), torch.zeros(model.num_heads, device=device), 0
        for item in (next(batches).item for _ in range(replay.steps_per_epoch)):
            with torch.no_grad():
                _, feats = model.features(item["views"])
            logits = model.head_logits([f.float() for f in feats])
            target = mixed_label_targets(
                item["label"].to(device), item["partner_label"].to(device), item["lam"].to(device), model.num_classes
            )
            loss = sum(soft_cross_entropy(z, target) for z in logits)  # the reference: the sum of the heads' CE
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.detach() * len(target)
            own = target.argmax(1)
            correct += torch.stack([(z.argmax(1) == own).sum() for z in logits])
            seen += len(target)
        correct_np = correct.cpu().numpy().astype(np.float64)
        log.append(
            {
                "epoch": epoch,
                "loss": float(loss_sum) / max(seen, 1),
                "train_top1": dict(zip(model.head_layers, (correct_np / max(seen, 1)).round(6).tolist())),
            }
        )
        state.print(f"heads epoch {epoch}: loss {log[-1]['loss']:.4f}, train top-1 per head {log[-1]['train_top1']}")

    after = backbone_digest(model)
    if after != before:  # a bug, never the user's fault: refuse to save a teacher that moved
        raise RuntimeError(f"the backbone changed while fitting heads ({before[:12]} -> {after[:12]})")
    result: dict[str, Any] = {
        "out": str(cfg.out),
        "backbone_digest": before,
        "layers": list(model.head_layers),
        "epochs": log,
        "seconds": round(time.time() - t0, 3),
    }
    if cfg.eval:
        try:
            test = open_source(cfg.data, "test", cfg.limit)
        except Exception as exc:  # a source without a test split still gets its heads
            state.print(f"note: no test split for {cfg.data} ({exc}); heads are not evaluated")
        else:
            params = center_params(test.sizes(), np.arange(len(test)), recipe.center_fraction)
            data = ViewBatches(
                test, [Batch(0, a, b) for a, b in split_range(0, len(test), batch)], recipe.size, 1, FixedParams(params)
            )
            hits, labels = np.zeros(1 + model.num_heads), test.labels()
            with torch.inference_mode():
                for item in Feed(data, device, cfg.workers):
                    cohort = model.cohort_logits(item["views"]).argmax(-1).cpu()
                    y = torch.from_numpy(labels[item["start"] : item["stop"]].astype(np.int64))
                    hits += (cohort == y[:, None]).float().sum(0).numpy()
            result["test_top1"] = dict(zip(["main", *model.head_layers], (hits / len(test)).round(6).tolist()))
            state.print(f"test top-1: {result['test_top1']}")
    extra = {
        HEADS_KEY: {
            "layers": list(model.head_layers),
            "input_size": recipe.size,
            "backbone_digest": before,
            "fit": {k: v for k, v in asdict(cfg).items() if k not in ("out", "workers", "cpu")},
        },
        "input_size": recipe.size,
        "recipe": recipe.to_dict(),
        "classes": list(source.classes),
    }
    model.cpu()
    save_model(model, cfg.out, extra=extra)
    Path(cfg.out, "heads.json").write_text(json.dumps(result, indent=1) + "\n")
    return result
