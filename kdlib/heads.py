"""DIH teachers: classifier heads mounted on a frozen teacher's intermediate stages.

Distillation via intermediate heads (Asadian & Salehi-Abari, arXiv 2103.00497; reference code
`aryanasadianuoit/Distilling-Knowledge-via-Intermediate-Classifiers`): after each group of residual
blocks a head, a single linear layer on the *flattened* feature map (``Linear(C*H*W, classes)``),
is trained with the teacher frozen (the sum of the heads' cross-entropies); then the cohort, the
main classifier and the k heads, co-teaches the student (`kdlib.losses.dih`).

A `HeadedClassifier` is a `Classifier` whose ``forward`` still returns the main logits (so every
stage that runs a teacher runs it unchanged) and keeps the heads' logits of that same forward in
``last_head_logits``; ``cohort_logits(x)`` returns ``[B, 1 + k, C]``, main first. Its run dir is an
ordinary one (model.safetensors + config.json) whose config has a ``heads`` entry: the layer
paths (looked up in the net, never imported), the input size the heads were fitted at (a flattened
feature map fixes it) and the backbone's weights digest, which fitting never changes.

Fitting (`fit_heads`, `kdlib heads`): the recipe's planned views (crops, flips, mixing) with mixed
labels, AdamW on the heads only, warmup + cosine; the backbone runs in eval mode under no_grad,
so neither its weights nor its BatchNorm statistics move (checked by digest before saving).
The reference fine-tunes with SGD (lr 0.1, Nesterov); a linear layer on 10^4..10^5 unnormalised
features is easier to keep stable with Adam, and only the heads' quality depends on it.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ._layers import LayerTaps, resolve_layers, stage_layers
from .errors import ConfigError, ModelError
from .losses import mixed_label_targets, soft_cross_entropy
from .models import (WEIGHTS_NAME, Classifier, _digest_state, build_model, load_run_weights, resolve_model,
                     save_model, weights_digest)

__all__ = ["HeadedClassifier", "HeadsConfig", "attach_heads", "backbone_digest", "fit_heads", "load_headed_run",
           "head_names"]

HEADS_KEY = "heads"


class HeadedClassifier(Classifier):
    """A Classifier plus one linear head per named layer of its net (see the module docstring)."""

    def __init__(self, base: Classifier, layers: Sequence[str], input_size: int) -> None:
        cfg = base.config
        if base.class_index is not None:  # heads answer over the net's classes: a mapped teacher would mix two sets
            raise ModelError(f"{cfg['arch']}: DIH heads cannot be mounted on a teacher mapped onto other classes "
                             "(--class-map); fit them on a teacher whose classes are the data's")
        super().__init__(base.net, arch=cfg["arch"], num_classes=cfg["num_classes"], in_channels=cfg["in_channels"],
                         mean=cfg["mean"], std=cfg["std"], net_channels=cfg["net_channels"], contract=base.contract)
        self.classes = getattr(base, "classes", None)
        self.mean.copy_(base.mean)
        self.std.copy_(base.std)
        if isinstance(input_size, bool) or int(input_size) < 1:
            raise ModelError(f"heads need a positive input size, got {input_size!r}")
        self.input_size = int(input_size)
        self.head_layers = resolve_layers(base, list(layers), what="head layer")
        if not self.head_layers:
            raise ModelError(f"{cfg['arch']}: no head layers given and no known stages; name them (--head-layers)")
        self._taps = LayerTaps(self, self.head_layers)
        was_training = base.training
        self.eval()
        with torch.no_grad():  # one dry forward at the fitted size tells each head its input width
            probe = torch.zeros(1, self.in_channels, self.input_size, self.input_size, dtype=torch.uint8,
                                device=self.mean.device)
            Classifier.forward(self, probe)
            widths = [int(t[0].numel()) for t in self._taps.outputs]
        self._taps.clear()
        self.train(was_training)
        self.heads = nn.ModuleList(nn.Linear(w, self.num_classes) for w in widths).to(self.mean.device)
        self.last_head_logits: list[torch.Tensor] = []

    @property
    def num_heads(self) -> int:
        return len(self.heads)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(main logits, the head layers' feature maps) of one forward of the backbone."""
        if x.dim() == 4 and tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            raise ModelError(f"{self.arch} with heads: the heads were fitted on {self.input_size}x{self.input_size} "
                             f"views (a flattened feature map fixes the size), got {x.shape[-2]}x{x.shape[-1]}")
        self._taps.clear()
        try:
            logits = Classifier.forward(self, x)
            feats = self._taps.outputs
        finally:
            self._taps.clear()
        return logits, feats

    def head_logits(self, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [head(f.flatten(1).to(head.weight.dtype)) for head, f in zip(self.heads, feats)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits, feats = self.features(x)
        self.last_head_logits = self.head_logits(feats)
        return logits

    def cohort_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 1 + k, C]``: the main classifier's logits, then each head's, shallow to deep."""
        logits = self.forward(x)
        return torch.stack([logits, *self.last_head_logits], dim=1)


def head_names(model: HeadedClassifier) -> list[str]:
    return list(model.head_layers)


def attach_heads(base: Classifier, layers: Sequence[str] | None, input_size: int) -> HeadedClassifier:
    """A HeadedClassifier sharing `base`'s net, with fresh heads on `layers` (None: every stage)."""
    if isinstance(base, HeadedClassifier):
        raise ModelError(f"{base.arch} already has heads on {base.head_layers}; start from the plain teacher")
    layers = list(layers) if layers else stage_layers(base)
    if not layers:
        raise ModelError(f"{base.arch}: kdlib does not know its stages; name the head layers with --head-layers "
                         "(submodule paths of the net)")
    return HeadedClassifier(base, layers, input_size)


def backbone_digest(model: Classifier) -> str:
    """weights_digest of the model without its heads: equal to the plain teacher's digest."""
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("heads.")}
    return _digest_state(state)


def load_headed_run(path: str | Path, cfg: Mapping[str, Any]) -> HeadedClassifier:
    """The HeadedClassifier of a run dir whose config.json has a `heads` entry (called by `load_model`)."""
    path = Path(path)
    spec = cfg.get(HEADS_KEY)
    if (not isinstance(spec, Mapping) or not isinstance(spec.get("layers"), list)
            or not all(isinstance(s, str) for s in spec["layers"]) or not isinstance(spec.get("input_size"), int)):
        raise ModelError(f"{path / 'config.json'}: 'heads' must be {{'layers': [str, ...], 'input_size': int, ...}}; "
                         f"got {spec!r}")
    base = build_model(cfg["arch"], cfg["num_classes"], cfg["in_channels"], cfg["mean"], cfg["std"])
    model = HeadedClassifier(base, spec["layers"], spec["input_size"])
    w_path = path / WEIGHTS_NAME
    load_run_weights(model, w_path, cfg, f"{cfg['arch']} with heads on {spec['layers']}")
    if spec.get("backbone_digest") and backbone_digest(model) != spec["backbone_digest"]:
        raise ModelError(f"{w_path}: backbone weights differ from the backbone_digest in config.json")
    classes = cfg.get("classes")  # so that a folder in another order is mapped by name, not by position
    model.classes = [str(c) for c in classes] if isinstance(classes, list) and len(classes) == model.num_classes else None
    return model


# -- fitting the heads ------------------------------------------------------------------------

@dataclass
class HeadsConfig:
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


def _lr_at(step: int, total: int, warmup: float) -> float:
    w = max(1, int(round(total * warmup)))
    if step < w:
        return (step + 1) / w
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - w) / max(1, total - w))))


def fit_heads(cfg: HeadsConfig) -> dict[str, Any]:
    """Fit heads on a frozen teacher over the recipe's views; save the headed run dir to `cfg.out`."""
    from .attention import parse_layers
    from .plan import center_params, views_per_epoch
    from .recipe import load_recipe
    from .source import open_source
    from .feed import Feed
    from .views import Batch, FixedParams, PlanParams, ViewBatches, split_range

    if cfg.epochs < 1 or cfg.batch_size < 1 or not cfg.lr > 0:
        raise ConfigError(f"heads: epochs, batch size and lr must be positive, got {cfg.epochs}, {cfg.batch_size}, "
                          f"{cfg.lr}")
    device = torch.device("cuda" if torch.cuda.is_available() and not cfg.cpu else "cpu")
    source = open_source(cfg.data, "train", cfg.limit)
    recipe = load_recipe(cfg.recipe)
    # the teacher's input contract as every stage settles it (its weights', never guessed for pretrained ones)
    base = resolve_model(cfg.teacher, classes=source.classes, in_channels=source.channels, weights=cfg.weights,
                         data_stats=source.mean_std)
    before = weights_digest(base)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = attach_heads(base, parse_layers(cfg.head_layers), recipe.size)
    model.to(device).eval()  # eval: BatchNorm uses, and keeps, its running statistics
    for p in model.net.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(model.heads.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    g = recipe.group_size
    batch = max(g, cfg.batch_size // g * g)
    n_views = views_per_epoch(recipe, len(source))
    ranges = split_range(0, n_views, batch)
    total = len(ranges) * cfg.epochs
    sizes, step, log = source.sizes(), 0, []
    t0 = time.time()
    batches = [Batch(e, a, b) for e in range(cfg.epochs) for a, b in ranges]
    items = iter(Feed(ViewBatches(source, batches, recipe.size, g, PlanParams(recipe, sizes)), device, cfg.workers))
    for epoch in range(cfg.epochs):
        # summed on the device and read once per epoch: no host sync per step
        loss_sum, correct, seen = torch.zeros((), device=device), torch.zeros(model.num_heads, device=device), 0
        for item in (next(items) for _ in ranges):
            for group in opt.param_groups:
                group["lr"] = cfg.lr * _lr_at(step, total, cfg.warmup)
            with torch.no_grad():
                _, feats = model.features(item["views"])
            logits = model.head_logits([f.float() for f in feats])
            target = mixed_label_targets(item["label"].to(device), item["partner_label"].to(device),
                                         item["lam"].to(device), model.num_classes)
            loss = sum(soft_cross_entropy(z, target) for z in logits)  # the reference: the sum of the heads' CE
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_sum += loss.detach() * len(target)
            own = target.argmax(1)
            correct += torch.stack([(z.argmax(1) == own).sum() for z in logits])
            seen += len(target)
        correct_np = correct.cpu().numpy().astype(np.float64)
        log.append({"epoch": epoch, "loss": float(loss_sum) / max(seen, 1),
                    "train_top1": dict(zip(model.head_layers, (correct_np / max(seen, 1)).round(6).tolist()))})
        print(f"heads epoch {epoch}: loss {log[-1]['loss']:.4f}, train top-1 per head {log[-1]['train_top1']}")

    after = backbone_digest(model)
    if after != before:  # a bug, never the user's fault: refuse to save a teacher that moved
        raise RuntimeError(f"the backbone changed while fitting heads ({before[:12]} -> {after[:12]})")
    result: dict[str, Any] = {"out": str(cfg.out), "backbone_digest": before, "layers": list(model.head_layers),
                              "epochs": log, "seconds": round(time.time() - t0, 3)}
    if cfg.eval:
        try:
            test = open_source(cfg.data, "test", cfg.limit)
        except Exception as exc:  # a source without a test split still gets its heads
            print(f"note: no test split for {cfg.data} ({exc}); heads are not evaluated")
        else:
            params = center_params(test.sizes(), np.arange(len(test)), recipe.center_fraction)
            data = ViewBatches(test, [Batch(0, a, b) for a, b in split_range(0, len(test), batch)], recipe.size, 1,
                               FixedParams(params))
            hits, labels = np.zeros(1 + model.num_heads), test.labels()
            with torch.inference_mode():
                for item in Feed(data, device, cfg.workers):
                    cohort = model.cohort_logits(item["views"]).argmax(-1).cpu()
                    y = torch.from_numpy(labels[item["start"]:item["stop"]].astype(np.int64))
                    hits += (cohort == y[:, None]).float().sum(0).numpy()
            result["test_top1"] = dict(zip(["main", *model.head_layers], (hits / len(test)).round(6).tolist()))
            print(f"test top-1: {result['test_top1']}")
    extra = {HEADS_KEY: {"layers": list(model.head_layers), "input_size": recipe.size, "backbone_digest": before,
                         "fit": {k: v for k, v in asdict(cfg).items() if k not in ("out", "workers", "cpu")}},
             "input_size": recipe.size, "recipe": recipe.to_dict(), "classes": list(source.classes)}
    model.cpu()
    save_model(model, cfg.out, extra=extra)
    Path(cfg.out, "heads.json").write_text(json.dumps(result, indent=1) + "\n")
    return result
