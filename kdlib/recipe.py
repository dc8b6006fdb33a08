"""The recipe: the distribution of views, as plain typed data.

A recipe is what the plan draws from: output size, crop kind and ranges, flip, mix mode and
its lambda law, group shape, seed. It is JSON-serializable and stored in the store's meta,
so a store says exactly how its views were made. Unknown keys are errors, never ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import RecipeError

__all__ = ["Recipe", "load_recipe", "CROPS", "MIXES", "LAMBDA_LAWS", "MIX_SHARES", "PARTNERS"]

# inception: torchvision's RandomResizedCrop law (area uniform in `scale`, log-uniform aspect, 10 tries,
# center fallback). inception_tf: TF's `sample_distorted_bounding_box` law, which FunMatch's TF2 port and
# big_vision draw (aspect uniform in `ratio`, then an integer-uniform height, 100 attempts, a
# `min_object_covered` floor, the whole image as fallback). center: a square center crop.
CROPS = ("inception", "center", "inception_tf")
MIXES = ("none", "mixup", "cutmix", "both")
# Who shares one mixing draw (mixed or not, kind, lambda, CutMix box). view: every view draws its own.
# group: one draw per planned group, the "batch" of FunMatch / big_vision (one lambda per batch). The group
# is the batch here because it is the plan's unit: fixed at precompute time whatever --batch-size or world
# size train uses later, and never split over ranks or steps (a batch is whole groups).
MIX_SHARES = ("view", "group")
# Which slot a view mixes with. next: slot s + c, the same crop of the next image ("roll by one image":
# big_vision's jnp.roll). reverse: slot g - 1 - s, the group reversed (the FunMatch TF2 port's tf.reverse);
# it needs an even number of images per group, or the middle image would mix with itself.
PARTNERS = ("next", "reverse")
# maxbeta: big_vision distill, lambda = max(a, 1 - a), a ~ Beta(alpha, alpha) (alpha=1: uniform on [0.5, 1]).
# uniform: the FunMatch TF2 port, lambda ~ U(0, 1).  beta: classic mixup, lambda ~ Beta(alpha, alpha).
LAMBDA_LAWS = ("maxbeta", "uniform", "beta")


@dataclass(frozen=True)
class Recipe:
    """How views are drawn. Plain data; `to_dict`/`from_dict` round-trip exactly."""

    name: str = "default"
    size: int = 28  # output height = width, pixels
    crop: str = "inception"  # one of CROPS (above)
    scale: tuple[float, float] = (0.25, 1.0)  # crop area fraction (ImageNet recipes use 0.08; small images need more)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect ratio w/h
    # crop=inception_tf only: a crop must cover at least this fraction of the image (TF's op default 0.1, the
    # FunMatch TF2 port's value; big_vision passes 0). None (unset) means 0.1 there; other crops refuse it.
    min_object_covered: float | None = None
    center_fraction: float = 1.0  # side of the center crop (crop=center, and eval views) / short side
    flip: bool = True
    mix: str = "none"
    mix_prob: float = 1.0  # probability that a view is mixed at all
    lam: str = "maxbeta"
    alpha: float = 1.0
    mix_share: str = "view"  # one of MIX_SHARES: one mixing draw per view, or per group (the batch-shared form)
    partner: str = "next"  # one of PARTNERS: the slot a view mixes with
    images_per_group: int = 2  # m: images decoded once per group
    crops_per_image: int = 1  # c: views cut from each decoded image
    seed: int = 0
    notes: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> RecipeError:
            return RecipeError(f"recipe {self.name!r}: {key}={getattr(self, key)!r} {why}")

        # types first (a YAML "0.3" or "false" is a string, never coerced): then ranges
        if not isinstance(self.name, str):
            raise bad("name", "must be a string")
        for key in ("size", "images_per_group", "crops_per_image", "seed"):
            if not _is_int(getattr(self, key)):
                raise bad(key, f"must be an integer, not {type(getattr(self, key)).__name__}")
        for key in ("center_fraction", "mix_prob", "alpha"):
            if not _is_number(getattr(self, key)):
                raise bad(key, f"must be a finite number, not {_kind(getattr(self, key))}")
        for key in ("scale", "ratio"):
            v = getattr(self, key)
            if not (isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_number(x) for x in v)):
                raise bad(key, "must be a pair [min, max] of finite numbers")
        if not isinstance(self.flip, bool):
            raise bad("flip", f"must be a boolean (true or false, unquoted), not {_kind(self.flip)}")
        for key, choices in (
            ("crop", CROPS),
            ("mix", MIXES),
            ("lam", LAMBDA_LAWS),
            ("mix_share", MIX_SHARES),
            ("partner", PARTNERS),
        ):
            if not (isinstance(getattr(self, key), str) and getattr(self, key) in choices):
                raise bad(key, f"must be one of {choices}")
        if self.size < 1:
            raise bad("size", "must be a positive integer")
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise bad("scale", "must satisfy 0 < min <= max <= 1")
        lo, hi = self.ratio
        if not 0 < lo <= hi:
            raise bad("ratio", "must satisfy 0 < min <= max")
        if not 0 < self.center_fraction <= 1:
            raise bad("center_fraction", "must be in (0, 1]")
        if not 0 <= self.mix_prob <= 1:
            raise bad("mix_prob", "must be in [0, 1]")
        if not self.alpha > 0:
            raise bad("alpha", "must be a positive number")
        if self.images_per_group < 1:
            raise bad("images_per_group", "must be a positive integer")
        if self.crops_per_image < 1:
            raise bad("crops_per_image", "must be a positive integer")
        if self.mix != "none" and self.images_per_group < 2:
            raise bad("images_per_group", "must be >= 2 when mixing: a view mixes with a different image")
        if self.mix != "none" and self.partner == "reverse" and self.images_per_group % 2:
            raise bad("images_per_group", "must be even with partner: reverse (the middle image would mix with itself)")
        if self.min_object_covered is not None:
            if self.crop != "inception_tf":
                raise bad("min_object_covered", "applies only to crop: inception_tf; remove it")
            if not _is_number(self.min_object_covered):
                raise bad("min_object_covered", f"must be a finite number, not {_kind(self.min_object_covered)}")
            if not 0 <= self.min_object_covered <= 1:
                raise bad("min_object_covered", "must be in [0, 1]")
            object.__setattr__(self, "min_object_covered", float(self.min_object_covered))  # YAML's 0 is an int
        elif self.crop == "inception_tf":
            object.__setattr__(self, "min_object_covered", 0.1)  # TF's default (frozen: set once, here)
        if self.seed < 0:
            raise bad("seed", "must be a non-negative integer")

    @property
    def group_size(self) -> int:
        """Views per group: m images x c crops."""
        return self.images_per_group * self.crops_per_image

    def to_dict(self) -> dict[str, Any]:
        """All fields, less the later ones at the value that describes recipes written before them, so
        a store's or a run's recorded recipe (and the check against it) is unchanged by their addition."""
        d = dataclasses.asdict(self)
        d["scale"], d["ratio"] = list(self.scale), list(self.ratio)
        for key, before in _ADDED.items():
            if d[key] == before:
                del d[key]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], origin: str = "recipe") -> Recipe:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise RecipeError(f"{origin}: unknown key(s) {unknown}; known keys: {sorted(known)}")
        d = dict(d)
        for key in ("scale", "ratio"):
            if key in d:
                v = d[key]
                if not (isinstance(v, (list, tuple)) and len(v) == 2 and all(_is_number(x) for x in v)):
                    raise RecipeError(f"{origin}: {key}={v!r} must be a pair [min, max] of finite numbers")
                d[key] = (float(v[0]), float(v[1]))
        try:
            return cls(**d)
        except RecipeError as exc:
            raise RecipeError(f"{origin}: {exc}") from None

    def replace(self, **changes: Any) -> Recipe:
        return dataclasses.replace(self, **changes)

    def digest_dict(self) -> dict[str, Any]:
        """The fields that decide the views (what a store must match); `notes` excluded."""
        d = self.to_dict()
        d.pop("notes")
        return d


# Fields added after stores were written, with the value every earlier recipe had.
_ADDED: dict[str, Any] = {"min_object_covered": None, "mix_share": "view", "partner": "next"}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _kind(v: Any) -> str:
    return f"a string ({v!r} is quoted)" if isinstance(v, str) else type(v).__name__


def load_recipe(path: str | Path | None, **overrides: Any) -> Recipe:
    """Read a recipe from YAML/JSON (or defaults when `path` is None); flags override the file."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise RecipeError(f"recipe file not found: {p}")
        try:
            text = p.read_text()
            data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
        except (yaml.YAMLError, json.JSONDecodeError) as exc:
            raise RecipeError(f"recipe file {p} is not valid YAML/JSON: {exc}") from exc
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise RecipeError(f"recipe file {p} must hold a mapping, got {type(data).__name__}")
        data.setdefault("name", p.stem)
    data.update({k: v for k, v in overrides.items() if v is not None})
    return Recipe.from_dict(data, origin=str(path or "recipe"))
