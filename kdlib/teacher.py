"""The teacher: a network plus its input contract, class map, precision, device, identity, heads and taps.

`load_teacher` is the one way a command gets a teacher (precompute, online train, verify, heads
fitting, eval of a named model): it resolves the model from what the user named
(`kdlib.resolve`: the contract comes from the weights, never guessed for a pretrained model; a
teacher with other classes is mapped onto the data's), checks it answers the data's classes and
channels, records its weights digest, puts it on the device the process state chose (channels_last
on CUDA) and settles its precision (bf16 on CUDA, fp32 on the CPU, unless asked).

Replaying a store (`verify`, `eval --shards`), `recorded` is the store's `meta.json` teacher entry:
the --mean/--std and --class-map its teacher needed are taken from it when not given, and a value
given that differs from it is refused (`Teacher.check_store`).

`Teacher.forward(views)` runs it once on uint8 views and returns a `TeacherOutput`: the logits and,
from that same forward, each DIH head's logits and the tapped layers' attention maps.
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._layers import LayerTaps
from .attention import MAP_CODECS, attention_map
from .contract import InputContract, check_store_contract, parse_floats, size_note
from .errors import ConfigError, ModelError, StoreMismatchError
from .models import Classifier, model_id
from .precision import check_precision, precision_context, prepare_model
from .resolve import resolve_model
from .rundir import CONFIG_NAME
from .runtime import process_state
from .source import Source
from .store.codecs import TeacherOutput
from .weights import weights_digest

__all__ = ["Teacher", "load_teacher", "DEFAULT_GRID"]

DEFAULT_GRID = 8  # attention maps pooled to G x G unless asked
FLAGS_ORIGIN = "--mean/--std"  # a contract's origin when flags gave it (kdlib.resolve)


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
        """Refuse a store this teacher did not write: another normalisation, class map, weights or heads."""
        _check_recorded(self.spec, self.model, self.digest, meta.teacher, where)
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
    recorded: Mapping[str, Any] | None = None,
    recorded_in: str = "the store",
) -> Teacher:
    """The teacher `spec` names, fitted to `source`'s classes, on the process's device (or `device`).

    `mean`/`std` (text like "imagenet" or numbers) only for weights that do not define their own;
    `flags` names them in messages. `size`: the recipe's view size, noted when the weights were
    evaluated at another. `recorded`: the `meta.json` teacher entry of the store `recorded_in` (its path):
    the --mean/--std and class map its teacher was given stand in for those not given here, when
    with them `spec` is that very teacher (same weights digest); a model that needs them and is
    not that teacher is refused, naming the flags to give."""
    device = device or process_state(cpu).device
    mean = parse_floats(mean, flags[0]) if isinstance(mean, str) or mean is None else mean
    std = parse_floats(std, flags[1]) if isinstance(std, str) or std is None else std

    def build(mean: Sequence[float] | None, std: Sequence[float] | None, class_map: str | None) -> Classifier:
        return resolve_model(
            spec,
            classes=source.classes,
            in_channels=source.channels,
            weights=weights,
            mean=mean,
            std=std,
            class_map=class_map,
            data_stats=source.mean_std,
            trust_code=trust_code,
        ).eval()

    model: Classifier | None = None
    error: ModelError | None = None
    try:
        model = build(mean, std, class_map)
    except ModelError as exc:  # e.g. mean/std or a class map needed: the store may hold them
        if recorded is None:
            raise
        error = exc
    digest = weights_digest(model) if model is not None else None
    if recorded is not None and digest != recorded["digest"]:
        model, digest = _as_recorded(
            spec, model, digest, build, mean, std, class_map, flags, source, recorded, recorded_in, cpu
        )
        if model is None:
            raise error
    cfg = model.config
    if cfg["num_classes"] != source.num_classes or cfg["in_channels"] != source.channels:
        raise ConfigError(
            f"teacher {spec} expects {cfg['in_channels']} channel(s) and {cfg['num_classes']} "
            f"classes; source {source.name} has {source.channels} and {source.num_classes}"
        )
    if size is not None and (note := size_note(model.contract, size, f"teacher {spec}")):
        if process_state(cpu).is_main_process:
            print(note)
    return Teacher(spec, prepare_model(model, device), device, check_precision(precision, device), digest)


def _as_recorded(
    spec: str,
    model: Classifier | None,
    given: str | None,
    build: Callable[[Sequence[float] | None, Sequence[float] | None, str | None], Classifier],
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    class_map: str | None,
    flags: tuple[str, str],
    source: Source,
    recorded: Mapping[str, Any],
    where: str,
    cpu: bool,
) -> tuple[Classifier | None, str | None]:
    """(model, its digest): `model` as given (None: it could not be built so), or built again with
    the flags the store's teacher was given that were not given here, when that makes it the
    store's teacher."""
    stored = recorded.get("contract")
    from_flags = isinstance(stored, Mapping) and stored.get("origin") == FLAGS_ORIGIN
    found = InputContract.from_dict(stored) if from_flags else None
    index = None if class_map is not None else _recorded_class_index(recorded, spec, source)
    defaulted = []
    if found is not None and (mean is None or std is None):
        if model is None or not found.same_normalisation(model.contract):
            defaulted += [f for f, v in zip(flags, (mean, std)) if v is None]
            mean, std = (found.mean if mean is None else mean), (found.std if std is None else std)
    if index is not None and (model is None or model.config.get("class_index") != index):
        defaulted.append("--class-map")
    else:
        index = None
    if not defaulted:
        return model, given
    with tempfile.TemporaryDirectory(prefix="kdlib-") as tmp:
        if index is not None:  # the same path precompute's --class-map took, from what the store kept
            class_map = str(Path(tmp) / "class-map-recorded-in-the-store.json")
            Path(class_map).write_text(json.dumps(dict(zip(source.classes, index))))
        try:
            again = build(mean, std, class_map)
        except ModelError:  # not the store's teacher: as given, it stands or falls on its own
            return model, given
    digest = weights_digest(again)
    if digest != recorded["digest"]:
        if model is None:  # it needs flags, and the store's are another teacher's: say which differs
            _check_recorded(spec, again, digest, recorded, where, defaulted)
        return model, given
    if process_state(cpu).is_main_process:
        said = [f for f in defaulted if f != "--class-map"]
        parts = [f"{'/'.join(said)} (mean {_fmt(mean)}, std {_fmt(std)})"] if said else []
        if index is not None:
            n = recorded["config"]["net_classes"]
            parts.append(f"--class-map (its {len(index)} data classes to the teacher's {n} outputs)")
        print(f"note: teacher {spec}: {' and '.join(parts)} not given, taken from store {where}", file=sys.stderr)
    return again, digest


def _recorded_class_index(recorded: Mapping[str, Any], spec: str, source: Source) -> list[int] | None:
    """The store's mapping of the data's classes to teacher outputs, when its teacher was mapped
    while loading (not a run dir that carries its own map, which is applied as it is)."""
    cfg = recorded.get("config") or {}
    index = cfg.get("class_index")
    if not isinstance(index, list) or "net_classes" not in cfg or len(index) != len(source.classes):
        return None
    run_cfg = Path(spec) / CONFIG_NAME
    if run_cfg.is_file():
        try:
            if "class_index" in json.loads(run_cfg.read_text()):
                return None
        except (OSError, ValueError):  # resolve_model reports a bad run dir, naming it
            return None
    return [int(i) for i in index]


def _fmt(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


def _short(index: Sequence[int] | None) -> str:
    if index is None:
        return "none (its outputs are the data's classes)"
    shown = ", ".join(str(i) for i in list(index)[:8])
    return f"[{shown}{', ...' if len(index) > 8 else ''}]"


def _check_recorded(
    spec: str, model: Classifier, digest: str, recorded: Mapping[str, Any], where: str, defaulted: Sequence[str] = ()
) -> None:
    """Refuse a teacher that is not the one `recorded` (a store's teacher entry) names: its
    normalisation, its class map, then its weights; `defaulted`: the flags taken from the store."""
    check_store_contract(recorded, model.contract, where)
    mine = model.config.get("class_index")
    theirs = (recorded.get("config") or {}).get("class_index")
    if mine != theirs:
        raise StoreMismatchError(
            f"store {where} was written with the teacher's outputs mapped to the data's classes as "
            f"{_short(theirs)}; teacher {spec} here maps them as {_short(mine)}: give the --class-map "
            "the store was made with, or none to use the store's"
        )
    if digest != recorded["digest"]:
        hint = (
            f"; the {', '.join(defaulted)} taken from the store are that teacher's: give them for {spec}"
            if defaulted
            else ""
        )
        raise StoreMismatchError(
            f"teacher {spec} has weights digest {digest[:12]}, the store {where} "
            f"was written by {recorded.get('id')} ({recorded['digest'][:12]}){hint}"
        )
