"""The student's optimizer: SGD, AdamW or LAMB over parameter groups with and without weight decay.

`param_groups` puts norm weights, biases (every parameter of one dimension or less, or named
``*.bias``) and the names a net lists in its own ``no_weight_decay()`` (timm's ViTs: ``pos_embed``,
``cls_token``) into a group without weight decay, as timm's ``param_groups_weight_decay`` does
(and DeiT, FKD's AdamW runs and ResNet-strikes-back train with). `build_optimizer` makes the one
the run names.

torch has no LAMB; `Lamb` is You et al. 2020 ("Large Batch Optimization for Deep Learning:
Training BERT in 76 minutes", Algorithm 2) as timm's ``timm.optim.Lamb`` computes it (bias-corrected
Adam moments, L2 decay added to the update, the trust ratio ||w|| / ||update|| applied only to
groups with weight decay, as NVIDIA's apex FusedLAMB does), less timm's built-in global gradient
clipping: kdlib clips with ``--clip`` before the step. tests/test_train_options.py checks it step
for step against timm's when timm is installed; kdlib never needs timm for it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["OPTIMIZERS", "SGD_MOMENTUM", "Lamb", "param_groups", "build_optimizer", "optimizer_settings"]

OPTIMIZERS = ("sgd", "adamw", "lamb")
SGD_MOMENTUM = 0.9  # --optimizer sgd without --momentum: what timm, FKD and torchvision's recipes use


def optimizer_settings(config: Any) -> dict[str, Any]:
    """The optimizer a train config names, its defaults filled in: optimizer, momentum, nesterov, and
    decay_norm_bias (not given: True for adamw, kdlib's default before the choice existed, so that its
    runs stay bitwise the same; False for sgd and lamb, as timm, DeiT and FKD's AdamW runs train)."""
    name = config.optimizer
    momentum = (SGD_MOMENTUM if config.momentum is None else float(config.momentum)) if name == "sgd" else None
    decay_all = (name == "adamw") if config.decay_norm_bias is None else bool(config.decay_norm_bias)
    return {"optimizer": name, "momentum": momentum, "nesterov": bool(config.nesterov), "decay_norm_bias": decay_all}


class Lamb(torch.optim.Optimizer):
    """LAMB (layer-wise adaptive moments); `weight_decay` is L2 added to the Adam update, scaled by the trust ratio."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            group["step"] = group.get("step", 0) + 1  # one count per group: a plain int, JSON in the checkpoint
            beta1, beta2 = group["betas"]
            c1, c2 = 1 - beta1 ** group["step"], 1 - beta2 ** group["step"]
            wd, lr, eps = group["weight_decay"], group["lr"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(grad, 1 - beta1)
                v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                update = (m / c1).div_((v.sqrt() / c2**0.5).add_(eps))
                if wd != 0:
                    update.add_(p, alpha=wd)
                    w_norm, u_norm = p.norm(2.0), update.norm(2.0)
                    one = torch.ones((), device=p.device, dtype=w_norm.dtype)
                    ratio = torch.where(w_norm > 0, torch.where(u_norm > 0, w_norm / u_norm, one), one)
                    update.mul_(ratio)
                p.add_(update, alpha=-lr)
        return loss


def param_groups(model: nn.Module, weight_decay: float, decay_norm_bias: bool) -> list[dict[str, Any]]:
    """One group of every trainable parameter (`decay_norm_bias`), or two: with and without weight decay."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if decay_norm_bias or not weight_decay:
        return [{"params": [p for _, p in params], "weight_decay": weight_decay}]
    skip = _no_decay_names(model)
    decay = [p for n, p in params if not (p.ndim <= 1 or n.endswith(".bias") or n in skip)]
    plain = [p for n, p in params if p.ndim <= 1 or n.endswith(".bias") or n in skip]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def _no_decay_names(model: nn.Module) -> set[str]:
    """Full names of the parameters any submodule lists in its `no_weight_decay()` (timm's convention)."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        listed = getattr(module, "no_weight_decay", None)
        if callable(listed):
            names |= {f"{prefix}.{n}" if prefix else n for n in listed()}
    return names


def build_optimizer(
    name: str,
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    decay_norm_bias: bool,
    momentum: float = 0.0,
    nesterov: bool = False,
) -> torch.optim.Optimizer:
    """The optimizer `name` over `model`'s parameter groups (see `param_groups`)."""
    groups = param_groups(model, weight_decay, decay_norm_bias)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    if name == "lamb":
        return Lamb(groups, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS}")
