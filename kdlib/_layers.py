"""Naming a classifier's inner layers and capturing their outputs with forward hooks.

Layer names are paths of submodules of a Classifier's inner net (`model.net`), as
`net.get_submodule` takes them: `layer1` for a torchvision ResNet, `blocks.2` for kdlib's CIFAR
ResNet. `stage1`, `stage2`, ... name the output of each group of residual blocks wherever kdlib
knows the stages (kdlib's CIFAR ResNets, torchvision ResNets), so a teacher and a student of
different depths can be paired by stage. Names are only looked up, never imported.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .errors import ModelError

__all__ = ["stage_layers", "resolve_layers", "LayerTaps"]

_STAGE_RE = re.compile(r"stage(\d+)")


def _net(model: nn.Module) -> nn.Module:
    return getattr(model, "net", model)


def stage_layers(model: nn.Module) -> list[str]:
    """The output layer of each group of residual blocks, shallow to deep; [] when unknown."""
    net = _net(model)
    if callable(getattr(net, "stage_layers", None)):  # kdlib's CIFAR ResNets say where their stages end
        return list(net.stage_layers())
    # torchvision's ResNet family (resnet*, resnext*, wide_resnet*) names its stages layer1..layer4
    return [f"layer{i}" for i in range(1, 5) if isinstance(getattr(net, f"layer{i}", None), nn.Module)]


def _submodule_names(net: nn.Module, limit: int = 12) -> str:
    names = [n for n, _ in net.named_children()]
    return ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")


def resolve_layers(model: nn.Module, names: Sequence[str], what: str = "layer") -> list[str]:
    """Layer paths (relative to the net) for `names`: `stageN` aliases resolved, every path checked."""
    net = _net(model)
    stages = stage_layers(model)
    out = []
    for name in names:
        name = str(name).strip()
        m = _STAGE_RE.fullmatch(name)
        if m:
            i = int(m.group(1))
            if not stages:
                raise ModelError(
                    f"{what} {name!r}: stages of {type(net).__name__} are unknown; name its "
                    f"submodules instead (top level: {_submodule_names(net)})"
                )
            if not 1 <= i <= len(stages):
                raise ModelError(f"{what} {name!r}: {type(net).__name__} has stages stage1..stage{len(stages)}")
            name = stages[i - 1]
        try:
            net.get_submodule(name)
        except AttributeError:
            raise ModelError(
                f"{what} {name!r} is not a submodule of {type(net).__name__}; use stage1.."
                f"stage{len(stages)} or a path such as {stages[0] if stages else 'features.3'} "
                f"(top level: {_submodule_names(net)})"
            ) from None
        out.append(name)
    if len(set(out)) != len(out):
        raise ModelError(f"{what}s {list(names)} name the same layer twice")
    return out


class LayerTaps:
    """Forward hooks that keep the latest output of each named layer (in `names` order).

    `outputs` holds one tensor per layer after each forward (the graph is kept, so a student's
    taps carry gradients); `clear()` drops them, `remove()` takes the hooks off.
    """

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        self.names = resolve_layers(model, names)
        self._got: dict[str, torch.Tensor] = {}
        net = _net(model)
        # a partial of a bound method, not a closure: copy.deepcopy(model) then gives the copy its own taps
        self._handles = [
            net.get_submodule(n).register_forward_hook(functools.partial(self._keep, n)) for n in self.names
        ]

    def _keep(self, name: str, module: nn.Module, args: Any, output: Any) -> None:
        if not isinstance(output, torch.Tensor):
            raise ModelError(f"layer {name!r} returns {type(output).__name__}, not a tensor; tap another layer")
        self._got[name] = output

    @property
    def outputs(self) -> list[torch.Tensor]:
        missing = [n for n in self.names if n not in self._got]
        if missing:
            raise ModelError(f"layers {missing} did not run in the last forward; tap layers the forward passes")
        return [self._got[n] for n in self.names]

    def clear(self) -> None:
        self._got = {}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._got = {}
