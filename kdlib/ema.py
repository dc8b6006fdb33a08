"""An exponential moving average of the student's weights (`--ema DECAY`), evaluated and saved beside it.

After every optimizer step each floating entry of the state (parameters and BatchNorm running
statistics alike) moves to ``decay * ema + (1 - decay) * weight``; integer entries (BatchNorm's
batch counter) are copied. This is what DeiT trains with (timm's ``ModelEma``, decay 0.99996 in
its main.py); the averaged copy is never trained, only evaluated and saved.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["WeightsEma"]


class WeightsEma:
    """The averaged copy of a model (`module`, in eval mode, without gradients) and its decay."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average one step towards `model`'s current weights."""
        own = self.module.state_dict()
        floats, ema = [], []
        for key, value in model.state_dict().items():
            target = own[key]
            if target.is_floating_point():
                ema.append(target)
                floats.append(value.detach().to(target.dtype))
            else:
                target.copy_(value)
        if ema:
            torch._foreach_lerp_(ema, floats, 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)
