"""Losses: student logits ``[B, C]`` against reconstructed teacher logits ``[B, C]``.

Every loss returns a scalar mean over the batch, computes in float32 through
``log_softmax`` (never the log of a softmax) and is differentiable in the student logits.
The teacher logits are usually :func:`kdlib.softlabel.reconstruct` output: the top-k logits
in place and one constant tail carrying the mass ``lse`` implies. That tail is invented, so
its error grows with the temperature (``kl``/``dist`` with T > 1) or a TTM ``gamma < 1``;
:func:`target_error` measures it at the setting the user trains with.

``get_loss(name, **params)`` binds a loss's parameters and checks them; names and
parameters that do not exist raise :class:`~kdlib.errors.ConfigError`.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlib.errors import ConfigError

__all__ = [
    "kl",
    "ttm",
    "wttm",
    "dist",
    "soft_cross_entropy",
    "mixed_label_targets",
    "LOSSES",
    "get_loss",
    "target_error",
    "dih",
    "LOSS_SETTINGS",
    "loss_settings",
    "target_loss",
    "training_loss",
    "SAMPLED_LOSSES",
    "check_sampled_loss",
]

LossFn = Callable[[Tensor, Tensor], Tensor]


def _kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Per-row KL(p || q) from log-probabilities; classes with p == 0 contribute 0."""
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return terms.sum(-1)


def kl(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """Hinton KD: ``T^2 * KL(softmax(teacher/T) || softmax(student/T))``, batch mean.

    The ``T^2`` factor keeps gradient magnitudes comparable across temperatures
    (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network").
    At ``T = 1`` this is FunMatch's loss (Beyer et al. 2022, "Knowledge distillation: A good
    teacher is patient and consistent").
    """
    t = float(temperature)
    log_pt = F.log_softmax(teacher.float() / t, dim=-1)
    log_ps = F.log_softmax(student.float() / t, dim=-1)
    return (t * t) * _kl_rows(log_pt, log_ps).mean()


def _ttm_rows(student: Tensor, teacher: Tensor, gamma: float) -> tuple[Tensor, Tensor]:
    """Per-row TTM KL and log U_gamma(p_t) = log sum_c p_t,c^gamma."""
    g = float(gamma)
    log_pt = F.log_softmax(teacher.float(), dim=-1)
    log_power = g * log_pt  # log p_t^gamma (unnormalised)
    log_u = torch.logsumexp(log_power, dim=-1)  # log U_gamma(p_t), the normaliser
    log_target = log_power - log_u.unsqueeze(-1)  # == log_softmax(gamma * teacher)
    log_ps = F.log_softmax(student.float(), dim=-1)
    return _kl_rows(log_target, log_ps), log_u


def ttm(student: Tensor, teacher: Tensor, gamma: float = 0.5) -> Tensor:
    """Transformed Teacher Matching: ``KL(p_t^gamma / sum_c p_t,c^gamma || softmax(student))``, batch mean.

    The power-transformed teacher equals ``softmax(gamma * teacher_logits)``; the student is
    at T = 1. Zheng & Yang, "Knowledge Distillation Based on Transformed Teacher Matching",
    ICLR 2024; their ``gamma = 1/T`` (no ``T^2`` factor).
    """
    rows, _ = _ttm_rows(student, teacher, gamma)
    return rows.mean()


def wttm(student: Tensor, teacher: Tensor, gamma: float = 0.5) -> Tensor:
    """Weighted TTM (Zheng & Yang, ICLR 2024): ``mean_b U_gamma(p_t^b) * KL(p̃_t^b || q_s^b)``.

    ``p_t = softmax(teacher)``, ``U_gamma(p) = sum_c p_c^gamma`` (the power sum, i.e. TTM's
    normaliser), ``p̃_t = p_t^gamma / U_gamma(p_t)``, ``q_s = softmax(student)``. The weight
    multiplies each sample's KL and the result is a plain mean over the batch (not divided
    by the sum of weights), as in the authors' reference code (``torch.mean(norm * KL)``).
    For ``0 < gamma < 1`` the weight lies in ``[1, C^(1-gamma)]`` and is larger for smoother
    teacher outputs. The weight is computed from the teacher logits as given (not detached).
    """
    rows, log_u = _ttm_rows(student, teacher, gamma)
    return (log_u.exp() * rows).mean()


def _pearson_rows(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b`` (DIST's eps)."""
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + eps)


def dist(student: Tensor, teacher: Tensor, beta: float = 1.0, gamma: float = 1.0, temperature: float = 1.0) -> Tensor:
    """DIST (Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022).

    With ``Y_s = softmax(student/T)``, ``Y_t = softmax(teacher/T)`` (``[B, C]``) and
    ``rho(u, v) = <u - mean u, v - mean v> / (||u - mean u|| * ||v - mean v|| + 1e-8)``::

        inter = 1 - mean_b rho(Y_s[b, :], Y_t[b, :])     # per sample, across classes
        intra = 1 - mean_c rho(Y_s[:, c], Y_t[:, c])     # per class, across the batch
        loss  = T^2 * (beta * inter + gamma * intra)

    as in the authors' code (hunto/DIST_KD). ``gamma`` here is DIST's intra-class weight, not
    TTM's power. The intra-class term depends on the batch it sees (with B = 1 it is the
    constant 1); on several processes it is computed over each process's local batch unless
    the caller gathers the logits first.
    """
    t = float(temperature)
    ys = F.softmax(student.float() / t, dim=-1)
    yt = F.softmax(teacher.float() / t, dim=-1)
    inter = 1.0 - _pearson_rows(ys, yt).mean()
    intra = 1.0 - _pearson_rows(ys.transpose(0, 1), yt.transpose(0, 1)).mean()
    return (t * t) * (float(beta) * inter + float(gamma) * intra)


def soft_cross_entropy(student: Tensor, target_probs: Tensor) -> Tensor:
    """Cross-entropy ``-sum_c y_c log softmax(student)_c`` against a probability target, batch mean."""
    log_ps = F.log_softmax(student.float(), dim=-1)
    return -(target_probs.float() * log_ps).sum(-1).mean()


def mixed_label_targets(y_a: Tensor, y_b: Tensor, lam: float | Tensor, num_classes: int) -> Tensor:
    """MixUp/CutMix label target ``lam * onehot(y_a) + (1 - lam) * onehot(y_b)``, float32 ``[B, C]``.

    ``lam`` is a float or a per-view tensor ``[B]`` (the recipe stores one lambda per view).
    """
    a = F.one_hot(y_a.long(), num_classes).float()
    b = F.one_hot(y_b.long(), num_classes).float()
    lam_t = torch.as_tensor(lam, dtype=torch.float32, device=a.device)
    if lam_t.ndim == 1:
        lam_t = lam_t.unsqueeze(-1)
    return lam_t * a + (1.0 - lam_t) * b


LOSSES: dict[str, Callable[..., Tensor]] = {"kl": kl, "ttm": ttm, "wttm": wttm, "dist": dist}

# Checks on parameter values, per loss: "positive" (> 0) or "nonnegative" (>= 0); all finite.
_RULES: dict[str, dict[str, str]] = {
    "kl": {"temperature": "positive"},
    "ttm": {"gamma": "positive"},
    "wttm": {"gamma": "positive"},
    "dist": {"beta": "nonnegative", "gamma": "nonnegative", "temperature": "positive"},
}


def _params_of(name: str) -> dict[str, float]:
    """The tunable parameters of a loss and their defaults (everything after the two logits)."""
    sig = inspect.signature(LOSSES[name])
    return {p.name: p.default for p in list(sig.parameters.values())[2:]}


def _resolve(name: str, params: dict) -> dict[str, float]:
    if name not in LOSSES:
        raise ConfigError(f"unknown loss {name!r}; valid losses: {', '.join(sorted(LOSSES))}")
    defaults = _params_of(name)
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ConfigError(
            f"unknown parameter(s) {', '.join(map(repr, unknown))} for loss {name!r}; "
            f"valid parameters: {', '.join(defaults)}"
        )
    resolved = dict(defaults)
    for key, value in params.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ConfigError(f"loss {name!r} parameter {key!r} must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"loss {name!r} parameter {key!r} must be a finite number, got {value!r}")
        rule = _RULES[name].get(key)
        if (rule == "positive" and value <= 0) or (rule == "nonnegative" and value < 0):
            want = {"positive": "> 0", "nonnegative": ">= 0"}[rule]
            raise ConfigError(f"loss {name!r} parameter {key!r} must be {want}, got {value!r}")
        resolved[key] = value
    return resolved


def get_loss(name: str, **params: float) -> LossFn:
    """The loss ``name`` with ``params`` bound: a function ``(student, teacher) -> scalar``."""
    resolved = _resolve(name, params)
    return functools.partial(LOSSES[name], **resolved)


def _teacher_log_target(teacher: Tensor, name: str, params: dict[str, float]) -> Tensor:
    """Log of the distribution a loss matches the student to (its teacher side)."""
    if name in ("ttm", "wttm"):
        return F.log_softmax(params["gamma"] * teacher.float(), dim=-1)
    return F.log_softmax(teacher.float() / params["temperature"], dim=-1)


@torch.no_grad()
def target_error(teacher_full: Tensor, teacher_reconstructed: Tensor, loss_name: str, **params: float) -> dict:
    """How far the stored teacher target is from the full one, at the loss's own setting.

    The target is the loss's teacher distribution: ``softmax(t/T)`` for ``kl`` and ``dist``,
    ``softmax(gamma * t)`` for ``ttm`` and ``wttm``. Returns plain floats:

    - ``kl_mean`` / ``kl_max``: KL(target_full || target_stored), mean and max over rows;
    - ``kl_mean_scaled``: ``kl_mean`` in the loss's units, i.e. times ``T^2`` for ``kl`` and
      ``dist`` (the factor those losses apply), times 1 for ``ttm`` / ``wttm``;
    - ``max_abs_prob_error``: the largest |difference| of any class probability;

    plus ``loss`` and the resolved ``params``. Note that the raw KL is not monotone in T: as
    T grows both targets tend to uniform and it falls again (roughly as 1/T^2), while the
    scaled KL rises and levels off. Read ``kl_mean_scaled`` to compare temperatures.
    """
    resolved = _resolve(loss_name, params)
    if teacher_full.shape != teacher_reconstructed.shape or teacher_full.ndim != 2:
        raise ConfigError(
            f"teacher logits must both be [N, C] of the same shape, got {tuple(teacher_full.shape)} "
            f"and {tuple(teacher_reconstructed.shape)}"
        )
    log_full = _teacher_log_target(teacher_full, loss_name, resolved)
    log_stored = _teacher_log_target(teacher_reconstructed.to(teacher_full.device), loss_name, resolved)
    rows = _kl_rows(log_full, log_stored)
    empty = rows.numel() == 0
    kl_mean = 0.0 if empty else float(rows.mean())
    scale = resolved["temperature"] ** 2 if loss_name in ("kl", "dist") else 1.0
    return {
        "loss": loss_name,
        "params": resolved,
        "kl_mean": kl_mean,
        "kl_max": 0.0 if empty else float(rows.max()),
        "kl_mean_scaled": scale * kl_mean,
        "max_abs_prob_error": 0.0 if empty else float((log_full.exp() - log_stored.exp()).abs().max()),
    }


# -- DIH: a cohort of teachers (the main classifier and intermediate heads) ------------------------

DIH_ALPHA, DIH_TEMPERATURE = 0.1, 5.0  # the reference's defaults


def dih(
    student: Tensor,
    cohort: Tensor | list[Tensor],
    target: Tensor,
    alpha: float = DIH_ALPHA,
    temperature: float = DIH_TEMPERATURE,
) -> Tensor:
    """Distillation via intermediate heads (Asadian & Salehi-Abari, arXiv 2103.00497), as its reference code.

    ``sum_j [alpha * T^2 * KL(softmax(t_j/T) || softmax(s/T)) + (1 - alpha) * CE(s, y)]`` over the cohort
    ``t_j`` (the main classifier and each head; ``[B, 1+k, C]`` or a list of ``[B, C]``): KL and CE are
    batch means, the cohort is *summed*, not averaged, so the CE term counts ``1 + k`` times (the
    reference's `train_dih.py` with `KD_Loss.kd_loss`). ``target`` is class ids ``[B]`` (the reference's
    hard-label CE) or probabilities ``[B, C]`` (mixed views: `mixed_label_targets`). Teacher logits are
    typically reconstructed soft labels, one per head.
    """
    members = list(cohort.unbind(1)) if isinstance(cohort, Tensor) else list(cohort)
    if not members:
        raise ConfigError("dih needs at least one teacher in the cohort")
    a, t = float(alpha), float(temperature)
    if not (0.0 < a <= 1.0) or not t > 0:  # the reference drops a member whose alpha is 0, CE and all
        raise ConfigError(f"dih: alpha must be in (0, 1] and temperature > 0, got alpha={alpha}, temperature={t}")
    s = student.float()
    if target.ndim == 1:
        ce = F.cross_entropy(s, target.long())
    else:
        ce = soft_cross_entropy(s, target)
    total = s.new_zeros(())
    for teacher in members:
        total = total + a * kl(s, teacher.float(), t) + (1.0 - a) * ce
    return total


# -- sampled soft labels: the RS-KD estimator (issue 21) -------------------------------------------
#
# Anshumann et al., "Sparse Logit Sampling: Accelerating Knowledge Distillation in LLMs", ACL 2025
# (arXiv 2503.16870): caching the top-k gives a biased estimate of the teacher (and a worse-calibrated
# student); S draws i_1..i_S from the teacher's softmax q = softmax(t / T) give the sparse target
# y = counts / S with E[y] = q. The loss kdlib trains on a sampled store is the usual one with y as the
# teacher's distribution (`kdlib.softlabel.sampled_target`, handed in as logits T log y):
#
#     kl at T:   T^2 * KL(y || softmax(s / T))    gradient in s:  T * (softmax(s / T) - y)
#     ttm:       KL(y || softmax(s)), y drawn at T = 1 / gamma
#
# Both gradients are linear in y, so their expectation over the draws is the gradient with the full
# teacher: unbiased at any S (the loss *value* is not: it lacks H(q) - H(y), a constant in s). When the
# loss's T differs from the T the store drew at, each draw is weighted by p_T(i) / q(i), normalised over
# the draws (self-normalised importance sampling: consistent, bias O(1/S)). Losses that need the whole
# vector are refused on a sampled store: DIST (Pearson correlations over all classes and the batch), WTTM
# (its weight sum_c p_c^gamma), DIH (a cohort of top-k heads).
SAMPLED_LOSSES = ("kl", "ttm", "ce")


def check_sampled_loss(loss: str, where: str) -> None:
    """ConfigError unless `loss` has an unbiased estimator from sampled labels (see above)."""
    if loss not in SAMPLED_LOSSES:
        raise ConfigError(
            f"--loss {loss} needs the teacher's full distribution, and {where} holds sampled labels "
            f"(S draws per view); use --loss {' or '.join(SAMPLED_LOSSES)}, or a top-k store"
        )


# -- the one table of which settings each loss takes ------------------------------------------------

# loss -> {parameter of the loss: field of a train config that sets it}. Train builds its loss from it,
# the resume check records exactly these settings, and inspect / train's warning measure the stored
# target at them. `ce` (labels only) takes none.
LOSS_SETTINGS: dict[str, dict[str, str]] = {
    "kl": {"temperature": "temperature"},
    "dist": {"temperature": "temperature"},
    "ttm": {"gamma": "gamma"},
    "wttm": {"gamma": "gamma"},
    "dih": {"alpha": "dih_alpha", "temperature": "dih_temperature"},
    "ce": {},
}


def loss_settings(loss: str, config: Any) -> dict[str, float]:
    """The settings `loss` takes, read from `config` (any object with a train config's field names)."""
    if loss not in LOSS_SETTINGS:
        raise ConfigError(f"--loss {loss!r} is unknown; choose one of {tuple(LOSS_SETTINGS)}")
    return {param: getattr(config, name) for param, name in LOSS_SETTINGS[loss].items()}


def target_loss(loss: str, settings: dict[str, float]) -> tuple[str, dict[str, float]]:
    """The loss whose teacher target shapes `loss`'s (DIH matches each member with KL at its temperature)."""
    if loss == "dih":
        return "kl", {"temperature": settings["temperature"]}
    return loss, dict(settings)


def training_loss(
    loss: str, settings: dict[str, float], num_classes: int, ce_weight: float = 0.0, label_smoothing: float = 0.0
) -> Callable[[Tensor, Tensor | None, dict[str, Any]], Tensor]:
    """``(student logits, teacher logits or DIH cohort or None, item) -> scalar``: the loss `kdlib train` runs.

    `ce_weight` adds CE on the views' (mixed) ground-truth labels (`item["label"]`, `partner_label`,
    `lam`); `loss="ce"` is that CE alone. `label_smoothing` eps smooths the label target of every CE
    term (DIH's too) to ``(1 - eps) * target + eps / num_classes``, as timm's mixup target does."""
    if loss == "dih":
        dih(torch.zeros(1, 2), torch.zeros(1, 1, 2), torch.zeros(1, dtype=torch.long), **settings)  # checks

        def cohort(student: Tensor, teacher: Tensor, item: dict[str, Any]) -> Tensor:
            target = _item_targets(item, student.device, num_classes, label_smoothing)
            total = dih(student.float(), teacher, target, **settings)
            if ce_weight:
                total = total + ce_weight * soft_cross_entropy(student.float(), target)
            return total

        return cohort
    if loss not in LOSS_SETTINGS:
        raise ConfigError(f"--loss {loss!r} is unknown; choose one of {tuple(LOSS_SETTINGS)}")
    kd = None if loss == "ce" else get_loss(loss, **settings)
    ce = 1.0 if kd is None else ce_weight

    def total(student: Tensor, teacher: Tensor | None, item: dict[str, Any]) -> Tensor:
        out = student.new_zeros(())
        if kd is not None:
            out = out + kd(student.float(), teacher)
        if ce:
            out = out + ce * soft_cross_entropy(
                student.float(), _item_targets(item, student.device, num_classes, label_smoothing)
            )
        return out

    return total


def _item_targets(item: dict[str, Any], device: torch.device, num_classes: int, label_smoothing: float = 0.0) -> Tensor:
    target = mixed_label_targets(
        item["label"].to(device), item["partner_label"].to(device), item["lam"].to(device), num_classes
    )
    if label_smoothing:  # off: the target exactly as before label smoothing existed
        target = target * (1.0 - label_smoothing) + label_smoothing / num_classes
    return target
