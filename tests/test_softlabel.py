"""Soft label: encode / reconstruct round trips, id dtypes, the tail, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdlib.errors import ConfigError
from kdlib.softlabel import TAIL_FLOOR, encode, id_dtype, reconstruct, tail_mass, torch_id_dtype


def _logits(n: int, c: int, scale: float = 3.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g) * scale


def _fp16_tol(x: torch.Tensor) -> float:
    """Half an fp16 ulp at the largest |logit|, i.e. the rounding bound of a stored logit."""
    return float(x.abs().max()) * 2.0**-11 + 1e-6


@pytest.mark.parametrize(
    "c, want",
    [(1, np.uint8), (256, np.uint8), (257, np.uint16), (65536, np.uint16), (65537, np.int32), (70000, np.int32)],
)
def test_id_dtype(c, want):
    assert id_dtype(c) == np.dtype(want)
    assert torch_id_dtype(c) == {np.uint8: torch.uint8, np.uint16: torch.uint16, np.int32: torch.int32}[want]


def test_encode_fields_sorted_and_typed():
    x = _logits(8, 10)
    sl = encode(x, 3)
    assert set(sl) == {"ids", "logits", "lse"}
    assert sl["ids"].shape == (8, 3) and sl["ids"].dtype == torch.uint8
    assert sl["logits"].shape == (8, 3) and sl["logits"].dtype == torch.float16
    assert sl["lse"].shape == (8,) and sl["lse"].dtype == torch.float32
    # sorted by descending value, ids point at the right logits
    assert torch.all(sl["logits"][:, :-1] >= sl["logits"][:, 1:])
    gathered = x.gather(1, sl["ids"].long())
    torch.testing.assert_close(gathered.half(), sl["logits"], rtol=0, atol=0)
    torch.testing.assert_close(sl["lse"], torch.logsumexp(x, -1))
    assert torch.equal(sl["ids"][:, 0].long(), x.argmax(-1))


def test_round_trip_full_logits():
    """k = C: reconstruct(encode(x)) is x up to fp16 rounding, same softmax."""
    x = _logits(32, 10)
    for k in (10, 50):  # k >= C stores all classes
        sl = encode(x, k)
        assert sl["ids"].shape == (32, 10)
        r = reconstruct(sl["ids"], sl["logits"], sl["lse"], 10)
        assert r.dtype == torch.float32 and r.shape == x.shape
        torch.testing.assert_close(r, x, rtol=0, atol=_fp16_tol(x))
        torch.testing.assert_close(r.softmax(-1), x.softmax(-1), rtol=0, atol=1e-3)


def _check_topk_and_tail(x: torch.Tensor, k: int, id_type: torch.dtype) -> None:
    n, c = x.shape
    sl = encode(x, k)
    assert sl["ids"].dtype == id_type
    r = reconstruct(sl["ids"], sl["logits"], sl["lse"], c)
    assert torch.isfinite(r).all()
    p_true = x.double().softmax(-1)
    p_rec = r.double().softmax(-1)
    ids = sl["ids"].long()
    topk_true = p_true.gather(1, ids)
    topk_rec = p_rec.gather(1, ids)
    # top-k probabilities kept (fp16 rounding of a logit moves its probability by ~ulp/2 relative)
    rel = _fp16_tol(x) * 2
    torch.testing.assert_close(topk_rec, topk_true, rtol=rel, atol=1e-7)
    # the tail carries the mass 1 - sum(top-k), up to the same rounding
    mass_rec = 1 - topk_rec.sum(-1)
    mass_true = 1 - topk_true.sum(-1)
    torch.testing.assert_close(mass_rec, mass_true, rtol=0, atol=rel * 1.01)
    torch.testing.assert_close(tail_mass(sl["logits"], sl["lse"]).double(), mass_true, rtol=0, atol=rel * 1.01)
    # the tail is one constant, below the smallest stored logit
    mask = torch.ones(n, c, dtype=torch.bool).scatter_(1, ids, False)
    tail = r[mask].view(n, c - k)
    assert torch.equal(tail, tail[:, :1].expand_as(tail))
    assert torch.all(tail[:, 0] <= sl["logits"].float().min(-1).values)


def test_topk_kept_small():
    _check_topk_and_tail(_logits(16, 10), 3, torch.uint8)


def test_topk_kept_uint16_ids():
    _check_topk_and_tail(_logits(16, 300, seed=1), 5, torch.uint16)


def test_topk_kept_int32_ids():
    _check_topk_and_tail(_logits(3, 70000, seed=2), 10, torch.int32)


def test_tail_strictly_below_for_spread_logits():
    x = _logits(64, 100, seed=3)
    sl = encode(x, 5)
    r = reconstruct(**sl, num_classes=100)
    mask = torch.ones_like(r, dtype=torch.bool).scatter_(1, sl["ids"].long(), False)
    assert torch.all(r[mask].view(64, 95)[:, 0] < sl["logits"].float().min(-1).values)


def test_nearly_one_hot_teacher_is_finite():
    x = _logits(4, 1000, scale=1.0, seed=4)
    x[:, 7] = 80.0  # tail mass ~ 1e-31: below float32 resolution of 1 - sum(top-k)
    sl = encode(x, 3)
    assert torch.all(tail_mass(sl["logits"], sl["lse"]) < 1e-6)
    r = reconstruct(**sl, num_classes=1000)
    assert torch.isfinite(r).all()
    assert torch.equal(r.argmax(-1), torch.full((4,), 7))
    p = r.softmax(-1)
    assert torch.all(p[:, 7] > 1 - 1e-6)
    # fp16 rounding can even make the stored top-k mass exceed 1: still finite, top-k stays on top
    logits = torch.tensor([[10.0, 9.0]], dtype=torch.float16)
    lse = torch.logsumexp(logits.float(), -1) - 1e-3  # stored mass ~1.001
    r = reconstruct(torch.tensor([[0, 1]], dtype=torch.uint8), logits, lse, 50)
    assert torch.isfinite(r).all() and float(r[0, 2:].max()) <= 9.0
    assert TAIL_FLOOR > 0


def test_reconstruct_accepts_id_dtypes():
    x = _logits(5, 20, seed=5)
    sl = encode(x, 4)
    ref = reconstruct(**sl, num_classes=20)
    for dt in (torch.uint8, torch.uint16, torch.int32, torch.int64):
        out = reconstruct(sl["ids"].to(dt), sl["logits"], sl["lse"], 20)
        assert torch.equal(out, ref)


def test_empty_batch():
    sl = encode(torch.zeros(0, 10), 3)
    assert sl["ids"].shape == (0, 3)
    assert reconstruct(**sl, num_classes=10).shape == (0, 10)


def test_bad_input():
    x = _logits(2, 10)
    for k in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="k"):
            encode(x, k)
    with pytest.raises(ConfigError, match=r"\[N, C\]"):
        encode(x[0], 3)
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ConfigError, match="finite"):
        encode(bad, 3)
    with pytest.raises(ConfigError, match="float16"):
        encode(x * 1e5, 3)
    sl = encode(x, 3)
    with pytest.raises(ConfigError, match="num_classes"):
        reconstruct(**sl, num_classes=2)
    with pytest.raises(ConfigError, match="num_classes"):
        id_dtype(0)
    with pytest.raises(ConfigError, match="shapes"):
        reconstruct(sl["ids"], sl["logits"][:, :2], sl["lse"], 10)
    with pytest.raises(ConfigError, match="ids"):
        reconstruct(sl["ids"].float(), sl["logits"], sl["lse"], 10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_encode_on_gpu_matches_cpu():
    x = _logits(64, 300, seed=6)
    cpu = encode(x, 5)
    gpu = encode(x.cuda(), 5)
    assert gpu["ids"].device.type == "cuda" and gpu["ids"].dtype == torch.uint16
    assert torch.equal(gpu["ids"].cpu(), cpu["ids"])
    assert torch.equal(gpu["logits"].cpu(), cpu["logits"])
    torch.testing.assert_close(gpu["lse"].cpu(), cpu["lse"])
    r = reconstruct(gpu["ids"], gpu["logits"], gpu["lse"], 300)
    assert r.device.type == "cuda"
    torch.testing.assert_close(r.cpu(), reconstruct(**cpu, num_classes=300))
