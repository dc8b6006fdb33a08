"""Losses against independent dense references, gradients, get_loss, and the k < C target error."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from kdlib.errors import ConfigError
from kdlib.losses import (
    LOSSES,
    dist,
    get_loss,
    kl,
    mixed_label_targets,
    soft_cross_entropy,
    target_error,
    ttm,
    wttm,
)
from kdlib.softlabel import encode, reconstruct

B, C = 16, 10


def _pair(seed: int = 0, b: int = B, c: int = C) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, generator=g) * 2, torch.randn(b, c, generator=g) * 3


def _stored(teacher: torch.Tensor, k: int) -> torch.Tensor:
    """The teacher as training sees it: encoded to a soft label, then reconstructed."""
    return reconstruct(**encode(teacher, k), num_classes=teacher.shape[1])


# ---- dense numpy references (float64, explicit loops) ----------------------------------------


def _np_softmax(row: np.ndarray) -> np.ndarray:
    e = np.exp(row - row.max())
    return e / e.sum()


def _np_kl(p: np.ndarray, q: np.ndarray) -> float:
    return float(sum(pi * (np.log(pi) - np.log(qi)) for pi, qi in zip(p, q) if pi > 0))


def ref_kl(s, t, temperature):
    s, t = s.double().numpy(), t.double().numpy()
    vals = [_np_kl(_np_softmax(t[i] / temperature), _np_softmax(s[i] / temperature)) for i in range(len(s))]
    return temperature**2 * np.mean(vals)


def ref_ttm(s, t, gamma, weighted):
    s, t = s.double().numpy(), t.double().numpy()
    vals = []
    for i in range(len(s)):
        p = _np_softmax(t[i]) ** gamma  # power transform of the teacher's probabilities
        u = p.sum()  # U_gamma(p_t)
        kl_i = _np_kl(p / u, _np_softmax(s[i]))
        vals.append(u * kl_i if weighted else kl_i)
    return np.mean(vals)


def _np_pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (np.sqrt((a * a).sum()) * np.sqrt((b * b).sum()) + 1e-8))


def ref_dist(s, t, beta, gamma, temperature):
    s, t = s.double().numpy(), t.double().numpy()
    ys = np.stack([_np_softmax(r / temperature) for r in s])
    yt = np.stack([_np_softmax(r / temperature) for r in t])
    inter = 1 - np.mean([_np_pearson(ys[i], yt[i]) for i in range(ys.shape[0])])
    intra = 1 - np.mean([_np_pearson(ys[:, c], yt[:, c]) for c in range(ys.shape[1])])
    return temperature**2 * (beta * inter + gamma * intra)


CASES = [
    ("kl", {"temperature": 1.0}, lambda s, t: ref_kl(s, t, 1.0)),
    ("kl", {"temperature": 4.0}, lambda s, t: ref_kl(s, t, 4.0)),
    ("ttm", {"gamma": 0.5}, lambda s, t: ref_ttm(s, t, 0.5, False)),
    ("ttm", {"gamma": 0.25}, lambda s, t: ref_ttm(s, t, 0.25, False)),
    ("wttm", {"gamma": 0.5}, lambda s, t: ref_ttm(s, t, 0.5, True)),
    ("wttm", {"gamma": 0.2}, lambda s, t: ref_ttm(s, t, 0.2, True)),
    ("dist", {}, lambda s, t: ref_dist(s, t, 1.0, 1.0, 1.0)),
    ("dist", {"beta": 2.0, "gamma": 0.5, "temperature": 4.0}, lambda s, t: ref_dist(s, t, 2.0, 0.5, 4.0)),
]


@pytest.mark.parametrize("name, params, ref", CASES, ids=[f"{n}-{p}" for n, p, _ in CASES])
def test_loss_matches_dense_reference(name, params, ref):
    s, t = _pair()
    t_stored = _stored(t, C)  # k = C: the soft label holds every class
    want = ref(s, t_stored)
    got = get_loss(name, **params)(s, t_stored)
    assert got.ndim == 0 and got.dtype == torch.float32
    assert abs(float(got) - want) <= 1e-5 * max(1.0, abs(want))
    # and the direct call agrees with the bound one
    assert float(LOSSES[name](s, t_stored, **params)) == float(got)


@pytest.mark.parametrize("name, params, ref", CASES, ids=[f"{n}-{p}" for n, p, _ in CASES])
def test_gradient_flows_to_student(name, params, ref):
    s, t = _pair(seed=1)
    s = s.clone().requires_grad_(True)
    get_loss(name, **params)(s, t).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    # gradient check in float64 semantics: compare with a finite difference of the reference
    eps = 1e-3
    i, j = 3, 4
    sp, sm = s.detach().clone(), s.detach().clone()
    sp[i, j] += eps
    sm[i, j] -= eps
    fd = (ref(sp, t) - ref(sm, t)) / (2 * eps)
    assert abs(float(s.grad[i, j]) - fd) < 1e-3


def test_minimal_when_student_matches_teacher():
    s, t = _pair(seed=2)
    for temp in (1.0, 4.0):
        assert abs(float(kl(t, t, temperature=temp))) < 1e-6
    for gamma in (0.5, 1.0, 2.0):
        # TTM's optimum is the transformed teacher: softmax(gamma * t)
        assert abs(float(ttm(gamma * t, t, gamma=gamma))) < 1e-6
        assert abs(float(wttm(gamma * t, t, gamma=gamma))) < 1e-6
        assert float(ttm(gamma * t, t, gamma=gamma)) <= float(ttm(s, t, gamma=gamma))
    assert abs(float(dist(t, t))) < 1e-5
    # ttm with gamma = 1 is kl at T = 1
    torch.testing.assert_close(ttm(s, t, gamma=1.0), kl(s, t))


def test_wttm_weight_is_power_sum():
    s, t = _pair(seed=3)
    gamma = 0.5
    u = (t.softmax(-1) ** gamma).sum(-1)
    assert torch.all(u >= 1) and torch.all(u <= C ** (1 - gamma) + 1e-5)
    rows = torch.stack([ttm(s[i : i + 1], t[i : i + 1], gamma=gamma) for i in range(B)])
    torch.testing.assert_close(wttm(s, t, gamma=gamma), (u * rows).mean())


def test_soft_cross_entropy_and_mixed_labels():
    s, _ = _pair(seed=4)
    y_a = torch.arange(B) % C
    y_b = (torch.arange(B) + 3) % C
    target = mixed_label_targets(y_a, y_b, 0.7, C)
    assert target.shape == (B, C)
    torch.testing.assert_close(target.sum(-1), torch.ones(B))
    assert float(target[0, 0]) == pytest.approx(0.7) and float(target[0, 3]) == pytest.approx(0.3)
    # equals the usual mixed CE: lam * CE(y_a) + (1 - lam) * CE(y_b)
    ce = torch.nn.functional.cross_entropy
    torch.testing.assert_close(soft_cross_entropy(s, target), 0.7 * ce(s, y_a) + 0.3 * ce(s, y_b))
    # per-view lambdas
    lam = torch.linspace(0.5, 1.0, B)
    per_view = mixed_label_targets(y_a, y_b, lam, C)
    torch.testing.assert_close(per_view[:, :].gather(1, y_a[:, None]).squeeze(1), lam)
    s.requires_grad_(True)
    soft_cross_entropy(s, per_view).backward()
    assert torch.isfinite(s.grad).all()


def test_stored_target_error_grows_with_temperature():
    """k < C: the invented tail costs little at T = 1 and more at T = 4, in the loss's units."""
    g = torch.Generator().manual_seed(5)
    t = torch.randn(64, 100, generator=g) * 2
    t[:, 0] += 8  # a confident teacher, as distillation teachers are
    s = torch.randn(64, 100, generator=g)
    t_stored = _stored(t, 5)

    loss_gap = {temp: abs(float(kl(s, t_stored, temp) - kl(s, t, temp))) for temp in (1.0, 4.0)}
    err = {temp: target_error(t, t_stored, "kl", temperature=temp) for temp in (1.0, 4.0, 16.0)}
    assert 0 < loss_gap[1.0] < loss_gap[4.0]
    assert 0 < err[1.0]["kl_mean_scaled"] < err[4.0]["kl_mean_scaled"] < err[16.0]["kl_mean_scaled"]
    assert err[1.0]["kl_mean_scaled"] == err[1.0]["kl_mean"]
    assert err[4.0]["kl_mean_scaled"] == pytest.approx(16 * err[4.0]["kl_mean"])
    # the raw KL falls again at high T (both targets tend to uniform): documented, not a bug
    assert err[16.0]["kl_mean"] < err[4.0]["kl_mean"]
    assert err[1.0]["params"] == {"temperature": 1.0} and err[1.0]["loss"] == "kl"
    for key in ("kl_mean", "kl_max", "kl_mean_scaled", "max_abs_prob_error"):
        assert isinstance(err[1.0][key], float) and err[1.0][key] > 0

    # ttm at gamma has the same target as kl at T = 1 / gamma, with no T^2 factor
    ttm_err = target_error(t, t_stored, "wttm", gamma=0.25)
    assert ttm_err["kl_mean"] == pytest.approx(err[4.0]["kl_mean"], rel=1e-4)
    assert ttm_err["kl_mean_scaled"] == ttm_err["kl_mean"]
    # with every class stored the error is fp16 rounding only
    exact = target_error(t, _stored(t, 100), "kl", temperature=4.0)
    assert exact["kl_mean"] < 1e-6 and exact["max_abs_prob_error"] < 1e-3


def test_get_loss_binds_and_checks():
    fn = get_loss("kl", temperature=2)
    assert isinstance(fn, functools.partial) and fn.keywords == {"temperature": 2.0}
    assert get_loss("dist").keywords == {"beta": 1.0, "gamma": 1.0, "temperature": 1.0}
    assert set(LOSSES) == {"kl", "ttm", "wttm", "dist"}


def test_get_loss_errors():
    with pytest.raises(ConfigError, match=r"'klx'.*dist, kl, ttm, wttm"):
        get_loss("klx")
    with pytest.raises(ConfigError, match=r"'temp'.*'kl'.*temperature"):
        get_loss("kl", temp=2.0)
    with pytest.raises(ConfigError, match=r"'temperature'.*'ttm'.*gamma"):
        get_loss("ttm", temperature=2.0)
    with pytest.raises(ConfigError, match=r"'temperature'.*> 0"):
        get_loss("kl", temperature=0.0)
    with pytest.raises(ConfigError, match=r"'gamma'.*> 0"):
        get_loss("wttm", gamma=-0.5)
    with pytest.raises(ConfigError, match=r"'beta'.*>= 0"):
        get_loss("dist", beta=-1.0)
    with pytest.raises(ConfigError, match=r"'gamma'.*number"):
        get_loss("ttm", gamma="0.5")
    with pytest.raises(ConfigError, match="finite"):
        get_loss("dist", gamma=float("nan"))
    with pytest.raises(ConfigError, match="unknown loss"):
        target_error(torch.zeros(2, 3), torch.zeros(2, 3), "nope")
    with pytest.raises(ConfigError, match="same shape"):
        target_error(torch.zeros(2, 3), torch.zeros(2, 4), "kl")
    # ConfigError is a ValueError, so generic handlers still work
    with pytest.raises(ValueError):
        get_loss("nope")


# ---- DIH: the cohort loss of the reference (sum over teachers, not mean) -----------------------


def ref_dih(s, teachers, y, alpha, temperature):
    """float64 loops of the reference's train_dih.py + KD_Loss.kd_loss: per teacher
    alpha * T^2 * batchmean KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y); summed over teachers."""
    s = s.double().numpy()
    total = 0.0
    for t in teachers:
        t = t.double().numpy()
        kd = np.mean([_np_kl(_np_softmax(t[i] / temperature), _np_softmax(s[i] / temperature)) for i in range(len(s))])
        ce = np.mean([-np.log(_np_softmax(s[i])[int(y[i])]) for i in range(len(s))])
        total += alpha * temperature**2 * kd + (1 - alpha) * ce
    return total


@pytest.mark.parametrize("k", [C, 3])
def test_dih_matches_the_reference_from_stored_labels(k):
    from kdlib.losses import dih

    g = torch.Generator().manual_seed(11)
    s = torch.randn(B, C, generator=g) * 2
    cohort_full = [torch.randn(B, C, generator=g) * sc for sc in (3.0, 2.0, 1.0, 0.5)]  # main + 3 heads
    y = torch.randint(0, C, (B,), generator=g)
    stored = [_stored(t, k) for t in cohort_full]  # each head's soft label, reconstructed
    want = ref_dih(s, stored, y, 0.1, 5.0)
    got = dih(s, torch.stack(stored, 1), y)  # defaults: alpha 0.1, T 5
    assert abs(float(got) - want) <= 1e-5 * want
    assert float(dih(s, stored, y)) == pytest.approx(float(got), rel=1e-6)  # a list works too
    # summed, not averaged: two copies of the cohort cost twice as much
    assert float(dih(s, stored + stored, y)) == pytest.approx(2 * float(got), rel=1e-5)
    if k == C:  # every class stored: the stored cohort is the full one up to fp16
        assert abs(ref_dih(s, cohort_full, y, 0.1, 5.0) - want) <= 1e-3 * want
    else:  # k < C: the tail is invented, and it shows at T = 5
        assert abs(ref_dih(s, cohort_full, y, 0.1, 5.0) - want) > 1e-4
    # mixed-label targets: one-hot probabilities give the hard-label CE
    onehot = torch.nn.functional.one_hot(y, C).float()
    assert float(dih(s, stored, onehot)) == pytest.approx(float(got), rel=1e-5)
    # gradient in the student only, finite
    s_req = s.clone().requires_grad_(True)
    dih(s_req, stored, y, alpha=0.3, temperature=2.0).backward()
    assert torch.isfinite(s_req.grad).all()
    eps, i, j = 1e-3, 2, 5
    sp, sm = s.clone(), s.clone()
    sp[i, j] += eps
    sm[i, j] -= eps
    fd = (ref_dih(sp, stored, y, 0.3, 2.0) - ref_dih(sm, stored, y, 0.3, 2.0)) / (2 * eps)
    assert abs(float(s_req.grad[i, j]) - fd) < 1e-3


def test_dih_refuses_bad_settings():
    from kdlib.losses import dih

    s, t = _pair()
    y = torch.zeros(B, dtype=torch.long)
    with pytest.raises(ConfigError, match="alpha"):
        dih(s, [t], y, alpha=0.0)
    with pytest.raises(ConfigError, match="temperature"):
        dih(s, [t], y, temperature=-1.0)
    with pytest.raises(ConfigError, match="cohort"):
        dih(s, [], y)
