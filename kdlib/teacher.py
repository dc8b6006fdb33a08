"""The teacher: a network plus its input contract, class map, precision, device, identity, heads and taps.

`load_teacher` is the one way a command gets a teacher (precompute, online train, verify, heads
fitting, eval of a named model): it resolves the model from what the user named
(`kdlib.resolve`: the contract comes from the weights, never guessed for a pretrained model; a
teacher with other classes is mapped onto the data's), checks it answers the data's classes and
channels, records its weights digest, puts it on the device the process state chose (channels_last
on CUDA) and settles its precision (bf16 on CUDA, fp32 on the CPU, unless asked).

`Teacher.forward(views)` runs it once on uint8 views and returns a `TeacherOutput`: the logits and,
from that same forward, each DIH head's logits and the tapped layers' attention maps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ._layers import LayerTaps
from .attention import MAP_CODECS, attention_map
from .contract import check_store_contract, parse_floats, size_note
from .errors import ConfigError, StoreMismatchError
from .models import Classifier, model_id
from .precision import check_precision, precision_context, prepare_model
from .resolve import resolve_model
from .runtime import process_state
from .source import Source
from .store.codecs import TeacherOutput
from .weights import weights_digest

__all__ = ["Teacher", "load_teacher", "DEFAULT_GRID"]

DEFAULT_GRID = 8  # attention maps pooled to G x G unless asked


@dataclass
class Teacher:
    """A teacher ready to run: `model` on `device` in `precision`, with its identity (`digest`)."""

    spec: str
    model: Classifier
    device: torch.device
    precision: str
    digest: str
    attention: dict[str, Any] | None = None  # {"layers", "grid", "codec"} of the tapped layers, or None
    _taps: LayerTaps | None = field(default=None, repr=False)

    @property
    def contract(self):
        """The input contract the weights expect (mean, std, size, crop, interpolation)."""
        return self.model.contract

    @property
    def num_classes(self) -> int:
        """Classes it answers over (the data's, after a class map)."""
        return self.model.num_classes

    @property
    def heads(self) -> list[str]:
        """The layers of its DIH heads (a teacher written by `kdlib heads`), shallow to deep; [] without."""
        return list(getattr(self.model, "head_layers", []) or [])

    def tap(self, layers: Sequence[str], grid: int = DEFAULT_GRID, codec: str = "fp16") -> dict[str, Any]:
        """Keep the attention maps of `layers` (stageN or net paths) from every forward; -> their spec."""
        if isinstance(grid, bool) or not isinstance(grid, int) or not 1 <= grid <= 64:
            raise ConfigError(f"--attention-grid {grid!r}: give an int in [1, 64] (maps of G x G values per view)")
        if codec not in MAP_CODECS:
            raise ConfigError(f"--attention-codec {codec!r}: choose one of {MAP_CODECS}")
        if self._taps is not None:
            self._taps.remove()
        self._taps = LayerTaps(self.model, list(layers))
        self.attention = {"layers": self._taps.names, "grid": int(grid), "codec": codec}
        return self.attention

    def forward(self, views: torch.Tensor) -> TeacherOutput:
        """Logits (float32), head logits and attention maps of one forward on uint8 `views`."""
        views = views.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            views = views.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), precision_context(self.precision, self.device):
            logits = self.model(views).float()
        heads = [z.float() for z in getattr(self.model, "last_head_logits", [])] if self.heads else []
        maps = []
        if self._taps is not None:  # the maps of this very forward, in float32 outside autocast
            try:
                maps = [attention_map(a, self.attention["grid"]) for a in self._taps.outputs]
            finally:
                self._taps.clear()
        return TeacherOutput(logits, heads, maps)

    def logits(self, views: torch.Tensor) -> torch.Tensor:
        """float32 logits [B, C] of uint8 views."""
        return self.forward(views).logits

    def identity(self) -> dict[str, Any]:
        """What a store records of the teacher that wrote it (its `meta.json` `teacher` entry)."""
        return {
            "id": model_id(self.spec),
            "digest": self.digest,
            "arch": self.model.config["arch"],
            "config": self.model.config,
            "contract": self.contract.to_dict(),
            "precision": self.precision,
        }

    def check_store(self, meta: Any, where: str) -> None:
        """Refuse a store this teacher did not write: another normalisation, other weights, other heads."""
        check_store_contract(meta.teacher, self.contract, where)
        if self.digest != meta.teacher["digest"]:
            raise StoreMismatchError(
                f"teacher {self.spec} has weights digest {self.digest[:12]}, the store {where} "
                f"was written by {meta.teacher.get('id')} ({meta.teacher['digest'][:12]})"
            )
        if meta.heads and self.heads != list(meta.heads):
            raise ConfigError(f"the store's heads are on {meta.heads}; this teacher's on {self.heads}")


def load_teacher(
    spec: str,
    source: Source,
    *,
    cpu: bool = False,
    device: torch.device | None = None,
    precision: str | None = None,
    weights: str | None = None,
    mean: str | Sequence[float] | None = None,
    std: str | Sequence[float] | None = None,
    class_map: str | None = None,
    trust_code: bool = False,
    size: int | None = None,
    flags: tuple[str, str] = ("--mean", "--std"),
) -> Teacher:
    """The teacher `spec` names, fitted to `source`'s classes, on the process's device (or `device`).

    `mean`/`std` (text like "imagenet" or numbers) only for weights that do not define their own;
    `flags` names them in messages. `size`: the recipe's view size, noted when the weights were
    evaluated at another."""
    device = device or process_state(cpu).device
    model = resolve_model(
        spec,
        classes=source.classes,
        in_channels=source.channels,
        weights=weights,
        mean=parse_floats(mean, flags[0]) if isinstance(mean, str) or mean is None else mean,
        std=parse_floats(std, flags[1]) if isinstance(std, str) or std is None else std,
        class_map=class_map,
        data_stats=source.mean_std,
        trust_code=trust_code,
    ).eval()
    cfg = model.config
    if cfg["num_classes"] != source.num_classes or cfg["in_channels"] != source.channels:
        raise ConfigError(
            f"teacher {spec} expects {cfg['in_channels']} channel(s) and {cfg['num_classes']} "
            f"classes; source {source.name} has {source.channels} and {source.num_classes}"
        )
    if size is not None and (note := size_note(model.contract, size, f"teacher {spec}")):
        if process_state(cpu).is_main_process:
            print(note)
    digest = weights_digest(model)
    return Teacher(spec, prepare_model(model, device), device, check_precision(precision, device), digest)
