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

Fitting (`kdlib.heads.fit_heads`, `kdlib heads`): the recipe's planned views (crops, flips, mixing) with mixed
labels, AdamW on the heads only, warmup + cosine; the backbone runs in eval mode under no_grad,
so neither its weights nor its BatchNorm statistics move (checked by digest before saving).
The reference fine-tunes with SGD (lr 0.1, Nesterov); a linear layer on 10^4..10^5 unnormalised
features is easier to keep stable with Adam, and only the heads' quality depends on it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._layers import LayerTaps, resolve_layers, stage_layers
from .errors import ModelError
from .models import Classifier, build_model
from .rundir import WEIGHTS_NAME, load_run_weights
from .weights import digest_state

__all__ = ["HEADS_KEY", "HeadedClassifier", "attach_heads", "backbone_digest", "load_headed_run", "head_names"]

HEADS_KEY = "heads"


class HeadedClassifier(Classifier):
    """A Classifier plus one linear head per named layer of its net (see the module docstring)."""

    def __init__(self, base: Classifier, layers: Sequence[str], input_size: int) -> None:
        cfg = base.config
        if base.class_index is not None:  # heads answer over the net's classes: a mapped teacher would mix two sets
            raise ModelError(
                f"{cfg['arch']}: DIH heads cannot be mounted on a teacher mapped onto other classes "
                "(--class-map); fit them on a teacher whose classes are the data's"
            )
        super().__init__(
            base.net,
            arch=cfg["arch"],
            num_classes=cfg["num_classes"],
            in_channels=cfg["in_channels"],
            mean=cfg["mean"],
            std=cfg["std"],
            net_channels=cfg["net_channels"],
            contract=base.contract,
        )
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
            probe = torch.zeros(
                1, self.in_channels, self.input_size, self.input_size, dtype=torch.uint8, device=self.mean.device
            )
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
            raise ModelError(
                f"{self.arch} with heads: the heads were fitted on {self.input_size}x{self.input_size} "
                f"views (a flattened feature map fixes the size), got {x.shape[-2]}x{x.shape[-1]}"
            )
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
    """The layers `model`'s heads sit on, shallow to deep."""
    return list(model.head_layers)


def attach_heads(base: Classifier, layers: Sequence[str] | None, input_size: int) -> HeadedClassifier:
    """A HeadedClassifier sharing `base`'s net, with fresh heads on `layers` (None: every stage)."""
    if isinstance(base, HeadedClassifier):
        raise ModelError(f"{base.arch} already has heads on {base.head_layers}; start from the plain teacher")
    layers = list(layers) if layers else stage_layers(base)
    if not layers:
        raise ModelError(
            f"{base.arch}: kdlib does not know its stages; name the head layers with --head-layers "
            "(submodule paths of the net)"
        )
    return HeadedClassifier(base, layers, input_size)


def backbone_digest(model: Classifier) -> str:
    """weights_digest of the model without its heads: equal to the plain teacher's digest."""
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("heads.")}
    return digest_state(state)


def load_headed_run(path: str | Path, cfg: Mapping[str, Any]) -> HeadedClassifier:
    """The HeadedClassifier of a run dir whose config.json has a `heads` entry (`kdlib.resolve` calls it)."""
    path = Path(path)
    spec = cfg.get(HEADS_KEY)
    if (
        not isinstance(spec, Mapping)
        or not isinstance(spec.get("layers"), list)
        or not all(isinstance(s, str) for s in spec["layers"])
        or not isinstance(spec.get("input_size"), int)
    ):
        raise ModelError(
            f"{path / 'config.json'}: 'heads' must be {{'layers': [str, ...], 'input_size': int, ...}}; got {spec!r}"
        )
    base = build_model(cfg["arch"], cfg["num_classes"], cfg["in_channels"], cfg["mean"], cfg["std"])
    model = HeadedClassifier(base, spec["layers"], spec["input_size"])
    w_path = path / WEIGHTS_NAME
    load_run_weights(model, w_path, cfg, f"{cfg['arch']} with heads on {spec['layers']}")
    if spec.get("backbone_digest") and backbone_digest(model) != spec["backbone_digest"]:
        raise ModelError(f"{w_path}: backbone weights differ from the backbone_digest in config.json")
    classes = cfg.get("classes")  # so that a folder in another order is mapped by name, not by position
    model.classes = (
        [str(c) for c in classes] if isinstance(classes, list) and len(classes) == model.num_classes else None
    )
    return model
