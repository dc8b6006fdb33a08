"""A model's input contract: the preprocessing its weights expect.

Mean and std are applied inside the model (``Classifier``); size and crop fraction say how the
weights were evaluated (``kdlib eval`` of a pretrained teacher uses them; a recipe that renders at
another size is noted). The interpolation is recorded but not applied: kdlib renders every view
bilinearly (``pil-bilinear-1``), so another one (timm's ``bicubic``) is said in ``describe()``.
Where the contract comes from, in this order:

1. a kdlib run directory's config.json (or kdlib's own model.safetensors, whose buffers hold it);
2. timm's ``pretrained_cfg``;
3. torchvision's weights enum (``get_model_weights(name)[TAG].transforms()``);
4. a factory's returned config, its model's ``pretrained_cfg`` / ``default_cfg``, or ``mean`` /
   ``std`` attributes of the factory;
5. explicit ``--mean`` / ``--std`` flags;
6. the dataset's measured statistics -- only for a model trained here from scratch.

Flags that contradict a contract the weights define are refused: silently feeding a pretrained
network pixels scaled for another one is the failure this module exists to prevent.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import ModelError, StoreMismatchError

__all__ = [
    "InputContract",
    "parse_floats",
    "check_flags",
    "check_store_contract",
    "size_note",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "RENDERED_INTERPOLATION",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_NAMED = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD)}
_TOL = 1e-6  # float32 buffers round-trip constants like 0.485 to ~1e-8
RENDERED_INTERPOLATION = "bilinear"  # what kdlib's renderers apply, whatever the contract says


@dataclasses.dataclass(frozen=True)
class InputContract:
    """mean/std per channel in [0, 1] units; size / crop_fraction / interpolation where known;
    ``origin`` says which source above defined it (printed and stored, not part of equality)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    origin: str
    size: int | None = None
    crop_fraction: float | None = None
    interpolation: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if not self.mean or len(self.mean) != len(self.std):
            raise ModelError(
                f"input contract from {self.origin}: mean {self.mean} and std {self.std} need the same number of values"
            )
        if any(not math.isfinite(v) for v in self.mean + self.std) or any(s <= 0 for s in self.std):
            raise ModelError(
                f"input contract from {self.origin}: std must be positive and every value finite, "
                f"got mean {self.mean}, std {self.std}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean": list(self.mean),
            "std": list(self.std),
            "origin": self.origin,
            "size": self.size,
            "crop_fraction": self.crop_fraction,
            "interpolation": self.interpolation,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], origin: str | None = None) -> InputContract:
        return cls(
            mean=d["mean"],
            std=d["std"],
            origin=origin or d.get("origin", "unknown"),
            size=d.get("size"),
            crop_fraction=d.get("crop_fraction"),
            interpolation=d.get("interpolation"),
        )

    def replace(self, **changes: Any) -> InputContract:
        return dataclasses.replace(self, **changes)

    def same_normalisation(self, other: InputContract) -> bool:
        return _close(self.mean, other.mean) and _close(self.std, other.std)

    def describe(self) -> str:
        """One line for the console: what the model is fed and who said so."""
        extra = [
            f"size {self.size}" if self.size else "",
            f"crop {self.crop_fraction:g}" if self.crop_fraction else "",
            self.interpolation_note() or self.interpolation or "",
        ]
        extra_s = ", ".join(e for e in extra if e)
        return (
            f"mean {_fmt(self.mean)}, std {_fmt(self.std)}"
            + (f", {extra_s}" if extra_s else "")
            + f" (from {self.origin})"
        )

    def interpolation_note(self) -> str | None:
        """Said when the weights expect another interpolation than the bilinear one views are rendered with."""
        wanted = (self.interpolation or "").strip().lower()
        if not wanted or wanted == RENDERED_INTERPOLATION:
            return None
        return f"interpolation {wanted} expected, views are rendered {RENDERED_INTERPOLATION}"


def _fmt(values: Sequence[float]) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


def _close(a: Sequence[float], b: Sequence[float]) -> bool:
    if len(a) == 1 or len(b) == 1:  # one value stands for every channel
        a, b = (list(a) * len(b), list(b)) if len(a) == 1 else (list(a), list(b) * len(a))
    return len(a) == len(b) and all(abs(x - y) <= _TOL * max(1.0, abs(x)) for x, y in zip(a, b))


def parse_floats(text: str | Sequence[float] | None, name: str) -> tuple[float, ...] | None:
    """``"0.485,0.456,0.406"`` (or one number, or ``imagenet``) -> floats; None stays None."""
    if text is None:
        return None
    if isinstance(text, str):
        key = text.strip().lower()
        if key in _NAMED:
            return _NAMED[key][0 if name.endswith("mean") else 1]
        parts = [p for p in text.replace(" ", ",").split(",") if p]
    else:
        parts = list(text)
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise ModelError(
            f"{name} {text!r}: want comma-separated numbers in [0, 1] units "
            f"(e.g. 0.485,0.456,0.406) or one of {sorted(_NAMED)}"
        ) from None
    if not values or any(not math.isfinite(v) for v in values):
        raise ModelError(f"{name} {text!r}: want finite numbers, e.g. 0.485,0.456,0.406")
    if name.endswith("std") and any(v <= 0 for v in values):
        raise ModelError(f"{name} {text!r}: every std must be positive")
    if any(abs(v) > 2 for v in values):  # 0..255 units would scale every pixel by 255
        raise ModelError(
            f"{name} {text!r}: values are in [0, 1] pixel units (ImageNet's mean is 0.485,...), not 0..255"
        )
    return values


def check_flags(contract: InputContract, mean: Sequence[float] | None, std: Sequence[float] | None, spec: str) -> None:
    """Refuse --mean/--std that contradict a contract the weights define."""
    for name, given, own in (("--mean", mean, contract.mean), ("--std", std, contract.std)):
        if given is not None and not _close(tuple(given), own):
            raise ModelError(
                f"{spec}: {name} {_fmt(given)} contradicts the weights' own {name[2:]} {_fmt(own)} "
                f"(from {contract.origin}); drop {name}, the weights' preprocessing is used"
            )


def check_store_contract(stored_teacher: Mapping[str, Any], contract: InputContract, where: str) -> None:
    """Refuse to replay/verify a store with a teacher normalised differently from the one that wrote it."""
    cfg = stored_teacher.get("config") or {}
    stored = stored_teacher.get("contract") or (
        {"mean": cfg["mean"], "std": cfg["std"], "origin": "store meta"} if "mean" in cfg and "std" in cfg else None
    )
    if stored is None:
        return
    found = InputContract.from_dict(stored)
    if not found.same_normalisation(contract):
        raise StoreMismatchError(
            f"store {where} was written with the teacher fed mean {_fmt(found.mean)}, std {_fmt(found.std)} "
            f"(from {found.origin}); this command feeds mean {_fmt(contract.mean)}, std {_fmt(contract.std)} "
            f"(from {contract.origin}): give the same --mean/--std (or weights) the store was made with"
        )


def size_note(contract: InputContract, size: int, who: str) -> str | None:
    """A line to print when views are rendered at another size than the weights were evaluated at."""
    if contract.size and int(contract.size) != int(size):
        return (
            f"note: {who} was evaluated at {contract.size} px ({contract.origin}); the recipe renders {size} px views"
        )
    return None
