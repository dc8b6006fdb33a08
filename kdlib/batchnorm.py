"""BatchNorm over the global batch, so N processes compute what one process would (invariant 6).

With plain BatchNorm each rank normalises with its own slice's statistics, and a 2-process
run drifts away from the 1-process run with the same global batch. `torch.nn.SyncBatchNorm`
fixes that on GPUs only (DDP refuses it for CPU modules), so on CPU kdlib uses
`GlobalBatchNorm2d`: the same layer, with batch statistics summed over ranks by a
differentiable all-reduce (two passes: mean, then centred variance). On GPUs kdlib uses
SyncBatchNorm. Both are swapped back to BatchNorm2d when the model is saved.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn

# The differentiable all_reduce is marked deprecated in favour of a private module; it works on gloo.
warnings.filterwarnings("ignore", message=r".*torch\.distributed\.nn\.functional\.all_reduce is deprecated.*")

__all__ = ["GlobalBatchNorm2d", "convert_batchnorm", "revert_batchnorm"]


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the batch over all ranks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        c = x.shape[1]
        count = torch.tensor([x.numel() / c], dtype=x.dtype, device=x.device)
        sums = dist_fn.all_reduce(torch.cat([x.sum((0, 2, 3)), count]))
        n = sums[-1]
        mean = sums[:c] / n
        centred = x - mean.view(1, c, 1, 1)
        var = dist_fn.all_reduce((centred * centred).sum((0, 2, 3))) / n
        if self.track_running_stats:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1)), alpha=m)
                self.num_batches_tracked.add_(1)
        y = centred * torch.rsqrt(var + self.eps).view(1, c, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        return y


def _swap(module: nn.Module, make) -> nn.Module:
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.__class__ is not nn.BatchNorm1d:
        out = make(module)
        if out is not module:
            out.load_state_dict(module.state_dict())
    for name, child in module.named_children():
        out.add_module(name, _swap(child, make))
    return out


def convert_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm2d -> global-batch BatchNorm: SyncBatchNorm on CUDA, GlobalBatchNorm2d elsewhere."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)

    def make(bn: nn.Module) -> nn.Module:
        return GlobalBatchNorm2d(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)

    return _swap(module, make)


def revert_batchnorm(module: nn.Module) -> nn.Module:
    """Back to plain BatchNorm2d (same state), so a saved model loads in one process."""

    def make(bn: nn.Module) -> nn.Module:
        if type(bn) in (GlobalBatchNorm2d, nn.SyncBatchNorm):
            return nn.BatchNorm2d(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        return bn

    return _swap(module, make)
