"""Attention maps and the AT loss against float64 references; taps on named layers; stored codecs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdlib.attention import BETA, LayerTaps, at_loss, attention_map, decode_maps, encode_maps, parse_layers
from kdlib.errors import ConfigError, ModelError
from kdlib.models import build_model


def _act(seed: int, shape=(3, 5, 8, 8)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def ref_map(x: torch.Tensor, grid: int | None) -> np.ndarray:
    """float64 loops: channel mean of x^2, mean over each grid cell, flatten, divide by the L2 norm."""
    x = x.double().numpy()
    b, c, h, w = x.shape
    out = []
    for i in range(b):
        a = (x[i] ** 2).mean(0)
        if grid is not None and (h, w) != (grid, grid):
            cells = np.zeros((grid, grid))
            for r in range(grid):  # adaptive pooling: cell r spans [floor(r h / G), ceil((r+1) h / G))
                r0, r1 = (r * h) // grid, -((-(r + 1) * h) // grid)
                for s in range(grid):
                    s0, s1 = (s * w) // grid, -((-(s + 1) * w) // grid)
                    cells[r, s] = a[r0:r1, s0:s1].mean()
            a = cells
        v = a.reshape(-1)
        out.append(v / np.sqrt((v**2).sum()))
    return np.stack(out)


@pytest.mark.parametrize(
    "shape, grid", [((3, 5, 8, 8), None), ((3, 5, 8, 8), 4), ((2, 7, 7, 7), 8), ((2, 3, 14, 14), 7), ((2, 4, 6, 9), 3)]
)
def test_attention_map_matches_float64_reference(shape, grid):
    x = _act(1, shape)
    got = attention_map(x, grid)
    want = ref_map(x, grid)
    assert got.dtype == torch.float32 and got.shape == want.shape
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got.norm(dim=1).numpy(), 1.0, rtol=1e-6)


def test_at_loss_matches_float64_reference_and_has_gradients():
    pairs = [(_act(2, (4, 6, 8, 8)), _act(3, (4, 16, 8, 8))), (_act(4, (4, 6, 4, 4)), _act(5, (4, 32, 2, 2)))]
    s_maps = [attention_map(s.requires_grad_(True), 4) for s, _ in pairs]
    t_maps = [attention_map(t, 4) for _, t in pairs]
    want = BETA * sum(((ref_map(s.detach(), 4) - ref_map(t, 4)) ** 2).mean() for s, t in pairs)
    got = at_loss(s_maps, t_maps)
    assert abs(float(got.detach()) - want) <= 1e-5 * want
    assert float(at_loss(s_maps, t_maps, beta=2.0).detach()) == pytest.approx(2.0 * want / BETA, rel=1e-5)
    got.backward()
    assert all(torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0 for s, _ in pairs)
    assert float(at_loss(t_maps, t_maps)) == 0.0
    with pytest.raises(ConfigError, match="one to one"):
        at_loss(s_maps, t_maps[:1])
    with pytest.raises(ConfigError, match="same grid"):
        at_loss([attention_map(_act(6), 4)], [attention_map(_act(6), 2)])


def test_pooled_maps_keep_the_reference_strength():
    """Maps pooled to 4x4 from 16x16 activations that are constant over each 4x4 cell: with the layer's native
    size the term equals the reference's (its mean over 256 unpooled cells) exactly; without it, 16x that."""

    def blocky(seed: int, c: int) -> torch.Tensor:
        return _act(seed, (8, c, 4, 4)).repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)

    s, t = blocky(8, 6), blocky(9, 12)
    reference = float(((ref_map(s, None) - ref_map(t, None)) ** 2).mean())
    pooled = [attention_map(s, 4)], [attention_map(t, 4)]
    scaled = float(at_loss(*pooled, beta=1.0, native=[16 * 16]))
    assert scaled == pytest.approx(reference, rel=1e-5)
    assert float(at_loss(*pooled, beta=1.0)) == pytest.approx(16.0 * reference, rel=1e-5)
    native = float(at_loss([attention_map(s, 16)], [attention_map(t, 16)], beta=1.0, native=[256]))
    assert native == pytest.approx(reference, rel=1e-5)


@pytest.mark.parametrize("codec, tol", [("fp16", 1e-3), ("q8", 2.0 / 255)])
def test_stored_maps_round_trip_within_their_codec(codec, tol):
    maps = attention_map(_act(7, (16, 8, 16, 16)), 8)
    stored = encode_maps(maps, codec)
    assert stored.dtype == {"fp16": torch.float16, "q8": torch.uint8}[codec] and stored.shape == (16, 64)
    back = decode_maps(stored, codec)
    assert (back - maps).abs().max() <= tol
    np.testing.assert_allclose(back.norm(dim=1).numpy(), 1.0, rtol=1e-5)
    zero = encode_maps(torch.zeros(2, 64), codec)  # a dead layer (all-zero map) stays finite
    assert torch.isfinite(decode_maps(zero, codec)).all()
    with pytest.raises(ConfigError, match="codec"):
        encode_maps(maps, "int4")


def test_taps_capture_named_layers_of_teacher_and_student():
    torch.manual_seed(0)
    model = build_model("resnet14", 10, 1, [0.5], [0.25]).eval()
    taps = LayerTaps(model, parse_layers("stage1, blocks.3,stage3"))
    assert taps.names == ["blocks.1", "blocks.3", "blocks.5"]
    x = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    model(x)
    shapes = [tuple(t.shape) for t in taps.outputs]
    assert shapes == [(2, 16, 28, 28), (2, 32, 14, 14), (2, 64, 7, 7)]
    # the tapped output is the block's output: the next block computes from it
    manual = model.net.blocks[1](model.net.blocks[0](model.net.stem((x.float() / 255 - 0.5) / 0.25)))
    torch.testing.assert_close(taps.outputs[0], manual)
    taps.remove()
    model(x)
    with pytest.raises(ModelError, match="did not run"):
        taps.outputs
    with pytest.raises(ModelError, match="same layer twice"):
        LayerTaps(model, ["stage1", "blocks.1"])
