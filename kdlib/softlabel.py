"""Soft label: the teacher's answer for a view, stored compactly.

A soft label keeps the top-k class ids (smallest integer type that holds the class count),
their logits in float16, and the log-sum-exp of *all* logits in float32. From these, the
top-k probabilities ``exp(l_k - lse)`` are known up to fp16 rounding and so is the mass of
the tail, ``1 - sum_k exp(l_k - lse)``. :func:`reconstruct` turns a soft label back into a
dense logit vector whose tail is one constant carrying exactly that mass, so every loss in
:mod:`kdlib.losses` works from cached data at any temperature.

When the class count is ``<= k`` the soft label holds the full logits (still sorted by
value, so there is one code path) and reconstruction is exact up to fp16 rounding.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from kdlib.errors import ConfigError

__all__ = [
    "TAIL_FLOOR",
    "id_dtype",
    "torch_id_dtype",
    "encode",
    "check_finite",
    "reconstruct",
    "tail_mass",
    "marginal_target",
    "sampled_target",
    "target_logits",
]

#: Smallest tail mass :func:`reconstruct` uses, as a fraction of the total mass (1).
#: fp16 rounding of the stored logits can make ``1 - sum(top-k probs)`` zero or negative for
#: a nearly one-hot teacher; the floor keeps the tail constant finite (about
#: ``lse - 18.4 - log(C - k)``), i.e. the tail classes get a negligible but non-zero share.
TAIL_FLOOR = 1e-8

_NP_TO_TORCH = {
    np.dtype(np.uint8): torch.uint8,
    np.dtype(np.uint16): torch.uint16,
    np.dtype(np.int32): torch.int32,
}
_ID_DTYPES = (torch.uint8, torch.uint16, torch.int32, torch.int64)


def _check_num_classes(num_classes: int) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    return int(num_classes)


def id_dtype(num_classes: int) -> np.dtype:
    """Class-id dtype of a store with ``num_classes`` classes: uint8 (<= 256), uint16 (<= 65536), else int32."""
    c = _check_num_classes(num_classes)
    if c <= 1 << 8:
        return np.dtype(np.uint8)
    if c <= 1 << 16:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def torch_id_dtype(num_classes: int) -> torch.dtype:
    """The torch dtype matching :func:`id_dtype`."""
    return _NP_TO_TORCH[id_dtype(num_classes)]


def encode(logits: torch.Tensor, k: int, check: bool = True) -> dict[str, torch.Tensor]:
    """Soft labels of a batch of teacher logits ``[N, C]``.

    Returns ``{"ids": [N, k_eff] (id dtype), "logits": [N, k_eff] float16, "lse": [N] float32}``
    with ``k_eff = min(k, C)``, ids sorted by descending logit. Stays on the logits' device.
    Raises :class:`ConfigError` for a bad ``k`` or shape, and for logits that are not finite
    or overflow float16 (|logit| > 65504); `check=False` leaves that to the caller (`check_finite`
    on the host copy), so that a device never waits for the host here.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"k (number of stored classes) must be a positive integer, got {k!r}")
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or not logits.is_floating_point():
        got = f"{tuple(logits.shape)} {logits.dtype}" if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ConfigError(f"teacher logits must be a floating tensor of shape [N, C], got {got}")
    num_classes = _check_num_classes(logits.shape[1])
    k_eff = min(int(k), num_classes)
    with torch.no_grad():
        x = logits.detach().float()
        lse = torch.logsumexp(x, dim=-1)
        values, indices = torch.topk(x, k_eff, dim=-1, largest=True, sorted=True)
        values16 = values.to(torch.float16)
        if check:
            check_finite(values16, lse)
        ids = indices.to(torch_id_dtype(num_classes))
    return {"ids": ids, "logits": values16, "lse": lse}


def check_finite(values16: torch.Tensor | np.ndarray, lse: torch.Tensor | np.ndarray) -> None:
    """ConfigError unless the fp16 top-k logits and the lse are all finite (one host sync on a device)."""
    finite = (
        bool(torch.isfinite(values16).all() & torch.isfinite(lse).all())
        if isinstance(values16, torch.Tensor)
        else bool(np.isfinite(values16).all() & np.isfinite(lse).all())
    )
    if not finite:
        raise ConfigError(
            "teacher logits are not finite or overflow float16 (|logit| > 65504); a soft label cannot store them"
        )


CODECS = ("fp16", "q8")
Q8_STEPS_PER_NAT = 16  # q8: a top-k logit is stored as its distance below the top-1 logit, in 1/16 nat


def to_codec(labels: dict[str, torch.Tensor], codec: str) -> dict[str, torch.Tensor]:
    """Soft label columns in the store's logit codec.

    fp16: as `encode` gives them. q8: the top-1 log-probability `top` (fp16, <= 0) and each
    top-k logit as an 8-bit distance below the top-1 (1/16 nat steps, clamped at 255 = 15.9 nats,
    where a class has < 1.2e-7 of the top class's probability); lse stays fp32. Half the label bytes
    at k = 10, for a log-probability error of at most 1/32 nat, measured by `kdlib inspect`.
    """
    if codec == "fp16":
        return labels
    if codec != "q8":
        raise ConfigError(f"logit codec {codec!r} is unknown; choose one of {CODECS}")
    values = labels["logits"].float()
    lse = labels["lse"].float()
    top = values[:, :1] - lse.unsqueeze(-1)
    dist = ((values[:, :1] - values) * Q8_STEPS_PER_NAT).round().clamp(0, 255).to(torch.uint8)
    return {"ids": labels["ids"], "logits": dist, "top": top.squeeze(-1).to(torch.float16), "lse": labels["lse"]}


def decode_logits(cols: dict, codec: str):
    """float32 top-k logits [N, k] from stored columns (numpy in, numpy out)."""
    if codec == "fp16":
        return np.asarray(cols["logits"], dtype=np.float32)
    top = np.asarray(cols["lse"], np.float64) + np.asarray(cols["top"], np.float64)
    return (top[:, None] - np.asarray(cols["logits"], np.float64) / Q8_STEPS_PER_NAT).astype(np.float32)


def _probs_topk(logits16: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    return torch.exp(logits16.float() - lse.float().unsqueeze(-1))


def tail_mass(logits16: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Probability mass ``[N]`` beyond the stored top-k (clamped at 0), for reporting."""
    return (1.0 - _probs_topk(logits16, lse).sum(-1)).clamp_min(0.0)


def reconstruct(ids: torch.Tensor, logits: torch.Tensor, lse: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Dense float32 teacher logits ``[N, C]`` from a soft label.

    The stored logits go back in place; every other class gets one constant
    ``t = lse + log(tail_mass) - log(C - k)``, so that the tail carries exactly the mass
    ``tail_mass = 1 - sum_k exp(l_k - lse)`` implied by ``lse``. ``tail_mass`` is floored at
    :data:`TAIL_FLOOR` (fp16 rounding can make it <= 0 for a nearly one-hot teacher) and ``t``
    is capped at the smallest stored logit, so the stored classes stay the top-k; both guards
    act only at the level of fp16 rounding. With ``k == C`` there is no tail. Works on the
    device of ``logits``; ``ids`` may be uint8 / uint16 / int32 / int64.
    """
    c = _check_num_classes(num_classes)
    if not isinstance(ids, torch.Tensor) or ids.dtype not in _ID_DTYPES:
        got = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ConfigError(f"soft-label ids must be a uint8/uint16/int32/int64 tensor, got {got}")
    if ids.ndim != 2 or logits.shape != ids.shape or lse.shape != ids.shape[:1]:
        raise ConfigError(
            f"soft-label shapes disagree: ids {tuple(ids.shape)}, logits {tuple(logits.shape)}, "
            f"lse {tuple(lse.shape)} (expected [N, k], [N, k], [N])"
        )
    n, k = ids.shape
    if k > c:
        raise ConfigError(f"soft label holds k={k} classes but num_classes={c}")
    device = logits.device
    index = ids.to(device=device, dtype=torch.int64)
    values = logits.to(torch.float32)
    if k == c:
        return torch.zeros((n, c), dtype=torch.float32, device=device).scatter_(1, index, values)
    lse32 = lse.to(device=device, dtype=torch.float32)
    mass = (1.0 - _probs_topk(values, lse32).sum(-1)).clamp_min(TAIL_FLOOR)
    t = lse32 + torch.log(mass) - math.log(c - k)
    if k > 0:
        t = torch.minimum(t, values.min(-1).values)
    out = t.unsqueeze(-1).expand(n, c).contiguous()
    return out.scatter_(1, index, values)


# -- targets as probabilities: FKD's marginal smoothing and sampled labels ------------------------


def marginal_target(ids: torch.Tensor, logits: torch.Tensor, lse: torch.Tensor, num_classes: int) -> torch.Tensor:
    """FKD's marginal smoothing (Shen & Xing, ECCV 2022, "A Fast Knowledge Distillation Framework"), ``[N, C]``.

    The top-k probabilities ``p_i = exp(l_i - lse)`` in place and the rest of the mass ``1 - sum_k p_i``
    spread evenly over the other ``C - k`` classes: a fixed probability vector, made at T = 1. At T = 1 it
    is :func:`reconstruct`'s distribution (with the same floor on the rest); at another temperature it
    differs, because reconstruct's logits are re-tempered, tail included, where FKD keeps its probabilities.
    """
    c = _check_num_classes(num_classes)
    device = logits.device
    index = ids.to(device=device, dtype=torch.int64)
    top = torch.exp(logits.float() - lse.to(device).float().unsqueeze(-1))
    n, k = index.shape
    if k >= c:
        return torch.zeros((n, c), device=device).scatter_(1, index, top)
    # fp16 rounding can make the top-k mass reach 1 for a nearly one-hot teacher: the rest is floored as in
    # `reconstruct` (never exactly 0, so KL(teacher || target) stays finite) and the vector renormalised
    rest = ((1.0 - top.sum(-1)).clamp_min(TAIL_FLOOR) / (c - k)).unsqueeze(-1)
    y = rest.expand(n, c).contiguous().scatter_(1, index, top)
    return y / y.sum(-1, keepdim=True)


def sampled_target(
    ids: torch.Tensor,
    counts: torch.Tensor,
    logits: torch.Tensor,
    num_classes: int,
    proposal_temperature: float,
    temperature: float,
) -> torch.Tensor:
    """The RS-KD estimate ``y`` ``[N, C]`` of the teacher's softmax(logits / `temperature`) from sampled labels.

    The S draws came from ``q = softmax(logits16 / T_q)`` (`proposal_temperature`). At ``T == T_q`` the
    estimate is the empirical distribution ``y_i = counts_i / S``: ``E[y] = q`` exactly, so the gradient of
    any loss linear in the target (CE, hence KL's) is unbiased. At another T each draw is importance-weighted
    by ``p_T(i) / q(i), proportional to exp(l_i (1/T - 1/T_q))``, and the weights are normalised over the draws (the
    normaliser of p_T is not stored): consistent, with a bias of order 1/S. Anshumann et al., ACL 2025
    (arXiv 2503.16870), "Sparse Logit Sampling"; see `kdlib.losses` for the estimator."""
    c = _check_num_classes(num_classes)
    device = logits.device
    index = ids.to(device=device, dtype=torch.int64)
    w = counts.to(device).double()
    if float(temperature) != float(proposal_temperature):
        z = logits.double() * (1.0 / float(temperature) - 1.0 / float(proposal_temperature))
        z = torch.where(w > 0, z, torch.full_like(z, -torch.inf))
        w = w * torch.exp(z - z.max(-1, keepdim=True).values)
    y = (w / w.sum(-1, keepdim=True)).float()
    return torch.zeros((index.shape[0], c), device=device).scatter_(1, index, y)


#: How far below a target's smallest non-zero log-probability :func:`target_logits` puts its zeros
#: (exp(-200) is 0 in float32, even after a loss divides the logits by its temperature).
_ZERO_GAP = 200.0


def target_logits(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits ``v`` with ``softmax(v / temperature) == probs``: a probability target handed to a loss that
    takes teacher logits and a temperature (``kl``; ``ttm`` with ``temperature = 1 / gamma``). Zero
    probabilities get a finite logit whose probability is exactly 0 in float32."""
    t = float(temperature)
    logp = torch.log(probs.float())
    floor = torch.where(probs > 0, logp, torch.full_like(logp, torch.inf)).min(-1, keepdim=True).values - _ZERO_GAP
    return t * torch.where(probs > 0, logp, floor)
