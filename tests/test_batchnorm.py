"""GlobalBatchNorm2d on 2 real gloo processes equals BatchNorm2d over the whole batch."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from kdlib.batchnorm import GlobalBatchNorm2d, convert_batchnorm, revert_batchnorm


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, x: torch.Tensor, w: torch.Tensor, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    bn = GlobalBatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
    xs = x.chunk(2)[rank].clone().requires_grad_(True)
    y = bn(xs)
    (y * w.chunk(2)[rank]).sum().backward()
    out[rank] = (y.detach(), xs.grad, bn.weight.grad, bn.running_mean.clone(), bn.running_var.clone())
    dist.destroy_process_group()


def test_global_batchnorm_matches_full_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 5, 5, generator=g) * 3 + 1
    w = torch.randn(8, 3, 5, 5, generator=g)
    ref = nn.BatchNorm2d(3)
    with torch.no_grad():
        ref.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
    xr = x.clone().requires_grad_(True)
    y = ref(xr)
    (y * w).sum().backward()

    out = mp.Manager().dict()
    mp.start_processes(_rank, args=(_free_port(), x, w, out), nprocs=2, start_method="spawn", join=True)
    y2 = torch.cat([out[0][0], out[1][0]])
    gx2 = torch.cat([out[0][1], out[1][1]])
    assert torch.allclose(y2, y, atol=1e-5)
    assert torch.allclose(gx2, xr.grad, atol=1e-5)
    # each rank holds the gradient of its half; DDP's average over 2 ranks gives the full-batch gradient / 2
    assert torch.allclose(out[0][2] + out[1][2], ref.weight.grad, atol=1e-4)
    for r in (0, 1):
        assert torch.allclose(out[r][3], ref.running_mean, atol=1e-6)
        assert torch.allclose(out[r][4], ref.running_var, atol=1e-5)


def test_convert_and_revert_keep_state():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    net[1].running_mean.fill_(0.5)
    conv = convert_batchnorm(net, torch.device("cpu"))
    assert type(conv[1]) is GlobalBatchNorm2d and torch.equal(conv[1].running_mean, net[1].running_mean)
    back = revert_batchnorm(conv)
    assert type(back[1]) is nn.BatchNorm2d
    assert set(back.state_dict()) == set(net.state_dict())
    x = torch.randn(2, 1, 6, 6)
    assert torch.equal(back.eval()(x), net.eval()(x))  # one process, eval: identical layer
