"""Train's three sources of targets for the same views, chosen once (`choose_targets`):

- `StoreTargets`: views and soft labels replayed from a store; the teacher is never loaded. Its
  `soft_target` says what the stored labels become: `topk` (the top-k logits and a flat tail carrying the
  mass the lse implies, `kdlib.softlabel.reconstruct`), `marginal` (FKD's marginal smoothing: top-k
  probabilities, the rest spread evenly) or, on a sampled store, `sampled` (the RS-KD estimate,
  `kdlib.losses.SAMPLED_LOSSES`);
- `OnlineTargets`: the same plan rendered on the fly and the teacher run on it (the baseline users
  would otherwise run; per-step losses match the cached run up to fp16 storage);
- `LabelTargets`: no teacher at all: (mixed) ground-truth labels, `--loss ce`.

Each says where the views' params come from (`dataset`) and what the student matches on them:
`logits(item, device)` (the teacher's logits, or DIH's cohort ``[B, 1 + k, C]``, or None) and
`maps(item, device)` (the teacher's attention maps of those views, for attention transfer).
An online teacher's logits are checked as precompute checks them (finite), without a host sync:
`logits_finite` is a device flag that train reads when it reads the loss.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ._layers import LayerTaps
from .attention import at_loss, attention_map, parse_layers
from .errors import ConfigError
from .losses import check_sampled_loss
from .plan import views_per_epoch
from .recipe import Recipe, load_recipe
from .softlabel import marginal_target, reconstruct, sampled_target, target_logits
from .source import Source, open_source
from .store import ChunkCache, Store, open_store, open_store_source
from .store.codecs import TeacherOutput, sampled_temperature
from .teacher import DEFAULT_GRID, Teacher, load_teacher
from .views import Batch, PlanParams, ViewBatches

__all__ = [
    "Targets",
    "StoreTargets",
    "OnlineTargets",
    "LabelTargets",
    "SOFT_TARGETS",
    "choose_targets",
    "attention_term",
]

SOFT_TARGETS = ("topk", "marginal", "sampled")  # what a store's labels become (`StoreTargets.soft_target`)


class Targets:
    """What every source of targets has: the source, the recipe, the class count, views per epoch."""

    store: Store | None = None
    teacher: Teacher | None = None
    dih_heads = 0  # --loss dih: heads in the cohort besides the main classifier
    # after `logits`: a device flag, "every teacher logit of that item was finite" (None: nothing to
    # check, e.g. a store's labels, checked when precompute wrote them); read when train flushes its log
    logits_finite: Tensor | None = None

    def __init__(self, source: Source, recipe: Recipe, num_classes: int, views: int) -> None:
        self.source, self.recipe, self.num_classes, self.views = source, recipe, num_classes, views

    @property
    def stored_epochs(self) -> int | None:
        """Epochs a store cycles through (None without a store)."""
        return None

    def dataset(self, batches: list[Batch]) -> ViewBatches:
        """The views of `batches` (training epochs), with the plan's params drawn where they are read."""
        r = self.recipe
        return ViewBatches(self.source, batches, r.size, r.group_size, PlanParams(r, self.source.sizes()))

    def logits(self, item: dict[str, Any], device: torch.device) -> Tensor | None:
        """The teacher's answer for the item's views (DIH: the cohort), or None (labels only)."""
        return None

    def maps(self, item: dict[str, Any], device: torch.device) -> list[Tensor]:
        """The teacher's attention maps of the item's views (after `logits` for the same item)."""
        raise ConfigError("--attention-student needs teacher maps: give --shards (stored maps) or --teacher")

    def attention_layers(self, student_layers: list[str], grid: int | None, teacher_layers: str | None) -> int:
        """Check an attention-transfer pairing; -> the grid the maps are pooled to."""
        raise ConfigError("--attention-student needs teacher maps: give --shards (stored maps) or --teacher")


class StoreTargets(Targets):
    """Soft labels (and heads, maps) replayed from a store; more epochs than stored cycle the stored ones."""

    def __init__(self, store: Store, data: str | None, limit: int | None, stored_epochs: int | None = None) -> None:
        meta = store.meta
        if meta.epochs_done == 0:
            raise ConfigError(f"store {store.url} has no complete epoch yet; finish `kdlib precompute` first")
        recipe = Recipe.from_dict(meta.recipe, origin=f"{store.url}/meta.json")
        super().__init__(open_store_source(store, data, limit), recipe, meta.num_classes, meta.views_per_epoch)
        self.store, self.max_stored = store, stored_epochs
        self.proposal_temperature = sampled_temperature(meta)  # None: a top-k store
        self.soft_target = "topk" if self.proposal_temperature is None else "sampled"
        self.target_temperature = 1.0  # the loss's: its teacher distribution is softmax(logits / this)

    def use(self, soft_target: str | None, loss: str, temperature: float) -> None:
        """Choose what the stored labels become for `loss` at `temperature` (kl: T, ttm: 1 / gamma); None:
        the store's kind (topk, or sampled on a sampled store). Refuses a pairing the store cannot serve."""
        where = f"store {self.store.url}"
        kind = soft_target or self.soft_target
        if kind not in SOFT_TARGETS:
            raise ConfigError(f"--soft-target {kind!r} is unknown; choose one of {SOFT_TARGETS}")
        if (kind == "sampled") != (self.proposal_temperature is not None):
            have = "sampled labels" if self.proposal_temperature is not None else f"top-{self.store.meta.k} labels"
            raise ConfigError(
                f"--soft-target {kind}: {where} holds {have}; use --soft-target "
                + ("sampled (or drop the flag)" if self.proposal_temperature is not None else "topk or marginal")
            )
        if kind == "sampled":
            check_sampled_loss(loss, where)
        if kind == "marginal" and loss in ("dih", "wttm"):
            raise ConfigError(f"--soft-target marginal feeds one fixed distribution; --loss {loss} needs logits")
        self.soft_target, self.target_temperature = kind, float(temperature)

    @property
    def stored_epochs(self) -> int:
        done = self.store.meta.epochs_done
        return min(done, self.max_stored or done)

    def dataset(self, batches: list[Batch]) -> ViewBatches:
        """`batches` name training epochs; they are read from stored epoch e mod stored_epochs, decoded and
        rendered as the store was (the decoder and renderer change pixels)."""
        r, rendered = self.recipe, self.store.meta.rendered
        batches = [Batch(e % self.stored_epochs, a, b) for e, a, b in batches]
        return ViewBatches(
            self.source,
            batches,
            r.size,
            r.group_size,
            ChunkCache(self.store),
            draft=rendered["decoder"] == "pil-draft",
            renderer=rendered["renderer"],
        )

    def logits(self, item: dict[str, Any], device: torch.device) -> Tensor:
        if self.soft_target == "sampled":  # logits whose softmax at the loss's temperature is the RS-KD estimate
            y = sampled_target(
                item["ids"].to(device),
                item["counts"].to(device),
                item["logits"].to(device),
                self.num_classes,
                self.proposal_temperature,
                self.target_temperature,
            )
            return target_logits(y, self.target_temperature)
        if self.soft_target == "marginal":
            y = marginal_target(
                item["ids"].to(device), item["logits"].to(device), item["lse"].to(device), self.num_classes
            )
            return target_logits(y, self.target_temperature)
        main = reconstruct(item["ids"], item["logits"], item["lse"], self.num_classes)
        if not self.dih_heads:
            return main
        members = [
            reconstruct(
                item[f"h{j}_ids"].to(device),
                item[f"h{j}_logits"].to(device),
                item[f"h{j}_lse"].to(device),
                self.num_classes,
            )
            for j in range(1, self.dih_heads + 1)
        ]
        return torch.stack([main.float(), *[m.to(main.device) for m in members]], dim=1)

    def maps(self, item: dict[str, Any], device: torch.device) -> list[Tensor]:
        n = len(self.store.meta.attention["layers"])
        return [item[f"at{i}"].to(device).float() for i in range(1, n + 1)]

    def attention_layers(self, student_layers: list[str], grid: int | None, teacher_layers: str | None) -> int:
        spec = self.store.meta.attention
        if not spec:
            raise ConfigError(
                f"--attention-student needs attention maps in the store {self.store.url}; precompute "
                "with --attention LAYER[,...] --attention-grid G"
            )
        if grid not in (None, spec["grid"]):
            raise ConfigError(
                f"--attention-grid {grid}: the store's maps are {spec['grid']}x{spec['grid']}; drop the "
                "flag or precompute again"
            )
        _pair(student_layers, len(spec["layers"]))
        return spec["grid"]


class OnlineTargets(Targets):
    """The teacher in memory, run on the views the plan gives (the same views a store would hold)."""

    def __init__(self, teacher: Teacher, source: Source, recipe: Recipe) -> None:
        super().__init__(source, recipe, source.num_classes, views_per_epoch(recipe, len(source)))
        self.teacher = teacher
        self._last: TeacherOutput | None = None

    def logits(self, item: dict[str, Any], device: torch.device) -> Tensor:
        out = self._last = self.teacher.forward(item["views"])
        if not self.dih_heads:
            self.logits_finite = torch.isfinite(out.logits).all()
            return out.logits
        cohort = torch.stack([out.logits.float(), *[z.to(out.logits.device) for z in out.head_logits]], dim=1)
        self.logits_finite = torch.isfinite(cohort).all()
        return cohort

    def maps(self, item: dict[str, Any], device: torch.device) -> list[Tensor]:
        return self._last.maps  # of the forward that gave this item's logits

    def attention_layers(self, student_layers: list[str], grid: int | None, teacher_layers: str | None) -> int:
        grid = grid or DEFAULT_GRID
        spec = self.teacher.tap(parse_layers(teacher_layers) or student_layers, grid)
        _pair(student_layers, len(spec["layers"]))
        return grid


class LabelTargets(Targets):
    """No teacher: the student learns from the views' (mixed) labels."""

    def __init__(self, source: Source, recipe: Recipe) -> None:
        super().__init__(source, recipe, source.num_classes, views_per_epoch(recipe, len(source)))


def _pair(student_layers: list[str], n_teacher: int) -> None:
    if n_teacher != len(student_layers):
        raise ConfigError(
            f"--attention-student names {len(student_layers)} layer(s), the teacher has {n_teacher} "
            "attention layer(s); pair them one to one"
        )


def _target_temperature(cfg: Any) -> float:
    """The temperature at which `cfg.loss` reads its teacher's logits: T for kl / dist, 1 / gamma for
    ttm / wttm (softmax(gamma * t)), DIH's own."""
    if cfg.loss in ("ttm", "wttm"):
        return 1.0 / float(cfg.gamma)
    return float(cfg.dih_temperature if cfg.loss == "dih" else cfg.temperature)


def _check_dih(heads: list[str], where: str) -> int:
    if not heads:
        raise ConfigError(
            f"--loss dih needs a teacher with heads: {where} has none (fit them with `kdlib heads`, "
            "then precompute from that run dir)"
        )
    return len(heads)


def choose_targets(cfg: Any, device: torch.device) -> Targets:
    """The one source of targets a train config names (`shards`, `teacher`, or neither), checked."""
    online_only = [
        f"--{k.replace('_', '-')}"
        for k in ("teacher_weights", "teacher_mean", "teacher_std", "class_map")
        if getattr(cfg, k) is not None
    ]
    if online_only and not cfg.teacher:
        raise ConfigError(
            f"{', '.join(online_only)} describe the online --teacher; without one there is nothing "
            "to apply them to (a store's teacher is fixed when it is written)"
        )
    if getattr(cfg, "soft_target", None) and not cfg.shards:
        raise ConfigError(f"--soft-target {cfg.soft_target} says what a store's labels become: give --shards")
    if cfg.shards:
        if cfg.teacher:
            raise ConfigError("give --shards (cached teacher) or --teacher (online), not both")
        targets: Targets = StoreTargets(open_store(cfg.shards), cfg.data, cfg.limit, cfg.stored_epochs)
        if cfg.loss == "ce" and not cfg.attention_student:  # CE + stored attention maps is fasterai's AT
            raise ConfigError("--loss ce trains on labels; drop --shards, or pick a distillation loss")
        if cfg.loss != "ce":  # sampled stores, --soft-target: what the labels become, refused where they cannot serve
            targets.use(getattr(cfg, "soft_target", None), cfg.loss, _target_temperature(cfg))
        if cfg.loss == "dih":
            targets.dih_heads = _check_dih(targets.store.meta.heads, f"store {cfg.shards}")
        return targets
    if not cfg.data:
        raise ConfigError("give --shards (distill from a store) or --data (labels, or --teacher online)")
    recipe = load_recipe(cfg.recipe)
    source = open_source(cfg.data, "train", cfg.limit)
    if cfg.teacher:
        teacher = load_teacher(
            cfg.teacher,
            source,
            device=device,
            precision=cfg.precision,
            weights=cfg.teacher_weights,
            mean=cfg.teacher_mean,
            std=cfg.teacher_std,
            class_map=cfg.class_map,
            trust_code=cfg.trust_code,
            flags=("--teacher-mean", "--teacher-std"),
        )
        targets = OnlineTargets(teacher, source, recipe)
        if cfg.loss == "dih":
            targets.dih_heads = _check_dih(teacher.heads, f"teacher {cfg.teacher}")
        return targets
    if cfg.loss != "ce":
        raise ConfigError(f"--loss {cfg.loss} needs soft labels: give --shards or --teacher, or use --loss ce")
    return LabelTargets(source, recipe)


def attention_term(cfg: Any, targets: Targets, student: nn.Module) -> Callable[[dict[str, Any], torch.device], Any]:
    """``(item, device) -> beta * AT`` between the student's tapped layers and the teacher's maps; 0.0 when off.

    Cached: the teacher's maps come from the store (its layers and grid); online: from taps on the
    teacher's layers (`cfg.attention_teacher`, default the student's names) at `cfg.attention_grid`."""
    layers = parse_layers(cfg.attention_student)
    if not layers:
        return lambda item, device: 0.0
    beta = float(cfg.attention_weight)
    if not beta >= 0:
        raise ConfigError(f"--attention-weight {cfg.attention_weight!r} must be >= 0")
    grid = targets.attention_layers(layers, cfg.attention_grid, cfg.attention_teacher)
    taps = LayerTaps(student, layers)

    def term(item: dict[str, Any], device: torch.device) -> Tensor:
        acts = taps.outputs
        s_maps = [attention_map(a, grid) for a in acts]
        native = [a.shape[-2] * a.shape[-1] for a in acts]  # the reference's mean is over the unpooled cells
        taps.clear()
        return at_loss(s_maps, targets.maps(item, device), beta, native)

    return term
