"""Attention transfer (AT; Zagoruyko & Komodakis, ICLR 2017): spatial knowledge, cached per view.

An attention map of an activation ``[B, C, H, W]`` is the channel mean of its square, pooled to a
``G x G`` grid, flattened and L2-normalised (the reference, `szagoruyko/attention-transfer`, is
``normalize(x.pow(2).mean(1).view(B, -1))``: the same without the pooling; where a layer is already
``G x G`` the pooling is the identity). The loss is

    at_loss = beta * sum over paired layers l of mean_b sum_i (Q_s[l][b, i] - Q_t[l][b, i])^2 / (H_l * W_l)

with beta = 1e3 as in the reference's commands (its `cifar.py`: ``opt.beta * sum(loss_groups)``,
each group ``(at(x) - at(y)).pow(2).mean()``, a mean over the H*W unpooled cells): dividing the pooled
maps' summed squared differences by the layer's own H*W (not by G*G) keeps that strength, so beta means
what it means in the reference (a 28x28 stage pooled to 7x7 would otherwise weigh 16x more). It is
added to whatever loss the student trains with.

fasterai's KD callback with its `Attention` loss trains on ``(1 - w) * CE + w * AT_mse`` where
``AT_mse`` is the same sum of mean squared differences without beta (tutorial: w = 0.9 on
layer1..layer4). kdlib's ``--loss ce --attention-weight beta`` trains on ``CE + beta * AT_mse``,
which is fasterai's loss times ``1 / (1 - w)`` when ``beta = w / (1 - w)`` (w = 0.9: beta = 9):
the same minimiser, gradients scaled by a constant (which Adam's update all but ignores).

Only sound from a cache because the replayed view is identical: a map belongs to the rendered view
(crop, flip, mix and all), so the student's map of that view is compared with the teacher's map of
that very view. Stored maps are fp16 or 8-bit (each value / the row's max, in 1/255 steps; the
decoder renormalises, so no scale needs storing).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ._layers import LayerTaps, resolve_layers, stage_layers
from .errors import ConfigError

__all__ = [
    "BETA",
    "MAP_CODECS",
    "attention_map",
    "at_loss",
    "encode_maps",
    "decode_maps",
    "LayerTaps",
    "resolve_layers",
    "stage_layers",
    "parse_layers",
]

BETA = 1e3  # the reference's weight of the AT term
MAP_CODECS = ("fp16", "q8")


def parse_layers(spec: str | Sequence[str] | None) -> list[str]:
    """`'stage1,stage2'` or a list -> ['stage1', 'stage2']; None or '' -> []."""
    if not spec:
        return []
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = [str(s).strip() for s in items if str(s).strip()]
    return out


def attention_map(activation: Tensor, grid: int | None = None) -> Tensor:
    """float32 ``[B, G*G]`` L2-normalised map of ``activation [B, C, H, W]`` (``grid=None``: ``[B, H*W]``)."""
    if activation.ndim != 4:
        raise ConfigError(f"an attention map needs a [B, C, H, W] activation, got {list(activation.shape)}")
    a = activation.float().pow(2).mean(1, keepdim=True)  # [B, 1, H, W]
    if grid is not None:
        if isinstance(grid, bool) or int(grid) < 1:
            raise ConfigError(f"attention grid must be a positive int, got {grid!r}")
        if a.shape[-2:] != (grid, grid):  # average of the squared activation over each cell
            a = F.adaptive_avg_pool2d(a, int(grid))
    return F.normalize(a.flatten(1), dim=1)


def at_loss(
    student_maps: Sequence[Tensor],
    teacher_maps: Sequence[Tensor],
    beta: float = BETA,
    native: Sequence[int] | None = None,
) -> Tensor:
    """``beta * sum_l mean((Q_s[l] - Q_t[l])^2)`` over paired, already normalised maps ``[B, M]``.

    `native` (the H*W of each layer's activation before pooling) keeps the reference's strength when
    the maps were pooled to G x G: the squared differences of a layer are summed over its M = G*G cells
    and divided by H*W instead of M, as the reference's mean over its H*W unpooled cells would (a unit
    vector's squared distances add up to the same order whatever its length). With M == H*W it is the
    plain mean. Without `native`, the mean over the M cells (H*W / M times the reference's strength)."""
    if len(student_maps) != len(teacher_maps) or not student_maps:
        raise ConfigError(
            f"attention transfer pairs layers one to one: {len(student_maps)} student map(s), "
            f"{len(teacher_maps)} teacher map(s)"
        )
    total = student_maps[0].new_zeros((), dtype=torch.float32)
    for i, (s, t) in enumerate(zip(student_maps, teacher_maps)):
        if s.shape != t.shape:
            raise ConfigError(
                f"attention pair {i}: student map {list(s.shape)} vs teacher map {list(t.shape)}; "
                "pool both to the same grid"
            )
        sq = (s.float() - t.float().to(s.device)).pow(2)
        total = total + (sq.mean() if native is None else sq.sum(1).mean() / float(native[i]))
    return float(beta) * total


def encode_maps(maps: Tensor, codec: str) -> Tensor:
    """Stored form of normalised maps ``[B, M]``: float16, or q8 = round(255 * v / max_row v) as uint8."""
    if codec == "fp16":
        return maps.to(torch.float16)
    if codec == "q8":
        top = maps.float().amax(1, keepdim=True).clamp_min(1e-12)  # maps are >= 0
        return (maps.float() / top * 255).round().clamp(0, 255).to(torch.uint8)
    raise ConfigError(f"attention map codec {codec!r} is unknown; choose one of {MAP_CODECS}")


def decode_maps(stored: Tensor, codec: str) -> Tensor:
    """float32 L2-normalised maps from their stored form (q8's scale is restored by the normalisation)."""
    if codec not in MAP_CODECS:
        raise ConfigError(f"attention map codec {codec!r} is unknown; choose one of {MAP_CODECS}")
    return F.normalize(stored.float(), dim=1)
