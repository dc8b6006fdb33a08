"""Tests for kdlib.models: every arch kind, the uint8 convention, save/load, digests, safe loading."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch
import torchvision
from torch import nn

from kdlib.errors import ModelError
from kdlib.models import Classifier, build_model, count_params, model_id
from kdlib.resolve import load_model
from kdlib.rundir import save_model
from kdlib.weights import weights_digest

GRAY = dict(in_channels=1, mean=[0.5], std=[0.25])
RGB = dict(in_channels=3, mean=[0.5, 0.4, 0.3], std=[0.2, 0.2, 0.2])


def tiny_factory(num_classes: int, in_channels: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))


# Whatever name pytest imported this module under is importable, so the spec always resolves.
TINY = f"{__name__}:tiny_factory"


def images(b: int, c: int, size: int) -> torch.Tensor:
    return torch.randint(0, 256, (b, c, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "arch", ["resnet8", "resnet20x2", "resnet8x4", "resnet18", TINY, "torchvision.models:resnet18"]
)
@pytest.mark.parametrize("chans,size", [(GRAY, 28), (RGB, 32)])
def test_each_kind_gives_logits(arch, chans, size):
    model = build_model(arch, 7, **chans).eval()
    with torch.no_grad():
        out = model(images(2, chans["in_channels"], size))
    assert out.shape == (2, 7) and out.dtype == torch.float32 and torch.isfinite(out).all()
    cfg = model.config
    assert json.loads(json.dumps(cfg)) == cfg and cfg["arch"] == arch
    rgb_net = arch == "resnet18" or arch.startswith("torchvision")
    assert cfg["net_channels"] == (3 if rgb_net else chans["in_channels"])


def test_cifar_resnet_shape():
    net = build_model("resnet8x4", 10, **RGB).net
    assert net.fc.in_features == 256 and len(net.blocks) == 3  # n = 1 per stage, widths 64/128/256
    assert len(build_model("resnet20", 10, **RGB).net.blocks) == 9
    # torchvision names win over our pattern (resnet50 = 6*8+2); resnet50x1 is ours
    assert isinstance(build_model("resnet50", 10, **RGB).net, torchvision.models.ResNet)
    assert count_params(build_model("resnet20", 10, **RGB)) == pytest.approx(0.27e6, rel=0.03)


@pytest.mark.parametrize(
    "arch,words",
    [
        ("resnet9", ["6n+2"]),
        ("resnet2", ["6n+2"]),
        ("nosuchnet", ["nosuchnet", "torchvision", "factory"]),
        ("no_such_mod_xyz:f", ["no_such_mod_xyz:f"]),
        ("torchvision.models:nope", ["torchvision.models:nope"]),
    ],
)
def test_bad_arch(arch, words):
    with pytest.raises(ModelError) as e:
        build_model(arch, 10, **RGB)
    assert all(w in str(e.value) for w in words)


def test_refuses_float_and_wrong_channels():
    model = build_model("resnet8", 10, **GRAY)
    with pytest.raises(ModelError, match="float32"):
        model(torch.rand(2, 1, 28, 28))
    with pytest.raises(ModelError, match=r"\[B,1,H,W\]"):
        model(images(2, 3, 28))
    with pytest.raises(ModelError):
        build_model("resnet8", 10, in_channels=3, mean=[0.5, 0.5], std=[1.0])


def test_normalisation_inside():
    """uint8 -> /255 -> (x - mean) / std, and grayscale repeated for an RGB net."""
    seen = {}

    class Spy(nn.Module):
        def forward(self, x):
            seen["x"] = x
            return x.mean((2, 3))[:, :2]

    model = Classifier(Spy(), arch="spy", num_classes=2, in_channels=1, mean=[0.5], std=[0.25], net_channels=3)
    x = images(2, 1, 8)
    model(x)
    want = (x.float() / 255 - 0.5) / 0.25
    assert seen["x"].shape == (2, 3, 8, 8) and torch.allclose(seen["x"][:, 2:], want)


def test_save_load_round_trip(tmp_path):
    model = build_model("resnet8", 10, **GRAY).eval()
    with torch.no_grad():  # give BN running stats non-default values so they are checked too
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    save_model(model, tmp_path / "run", extra={"epochs": 3})
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["epochs"] == 3 and cfg["weights_digest"] == weights_digest(model)
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".")]  # no temp files
    loaded = load_model(str(tmp_path / "run"), num_classes=10, in_channels=1)
    x = images(4, 1, 28)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert weights_digest(loaded) == weights_digest(model)
    assert model_id(str(tmp_path / "run")) == f"run:{(tmp_path / 'run').resolve()}"
    assert model_id("resnet8") == "resnet8"


def test_load_run_mismatch_and_corruption(tmp_path):
    save_model(build_model("resnet8", 10, **GRAY), tmp_path / "run")
    with pytest.raises(ModelError, match="num_classes=10.*num_classes=100"):
        load_model(str(tmp_path / "run"), num_classes=100)
    with pytest.raises(ModelError, match="in_channels"):
        load_model(str(tmp_path / "run"), in_channels=3)
    # a weights file swapped under the config is caught by the recorded digest
    other = build_model("resnet8", 10, **GRAY)
    safetensors.torch.save_file(other.state_dict(), str(tmp_path / "run" / "model.safetensors"))
    with pytest.raises(ModelError, match="digest"):
        load_model(str(tmp_path / "run"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="config.json"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="num_classes"):
        load_model("resnet8", in_channels=1, mean=[0.5], std=[0.5])


def test_digest_tracks_weights():
    torch.manual_seed(3)
    a = build_model("resnet8", 10, **RGB)
    torch.manual_seed(3)
    b = build_model("resnet8", 10, **RGB)
    assert weights_digest(a) == weights_digest(b)
    with torch.no_grad():
        b.net.fc.weight[0, 0] += 1e-3
    assert weights_digest(a) != weights_digest(b)
    assert weights_digest(a.to(torch.bfloat16)) != weights_digest(a.float())  # dtype counts, bf16 ok


class Evil:
    def __reduce__(self):
        return (_ran.append, ("pwned",))


_ran: list = []


def test_pickle_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"fc.weight": Evil()}, path)
    with pytest.raises(ModelError, match="evil.pt"):
        build_model("resnet18", 10, **RGB, weights=str(path))
    assert _ran == []


@pytest.mark.parametrize(
    "suffix,nest", [(".safetensors", None), (".pt", "state_dict"), (".pth", "model"), (".pt", None)]
)
def test_torchvision_weights(tmp_path, suffix, nest):
    torch.manual_seed(1)
    donor = torchvision.models.get_model("resnet18", weights=None, num_classes=10)
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        safetensors.torch.save_file(donor.state_dict(), str(path))
    else:
        torch.save({nest: donor.state_dict()} if nest else donor.state_dict(), path)
    torch.manual_seed(2)
    fresh = build_model("resnet18", 10, **GRAY).eval()
    torch.manual_seed(2)
    loaded = build_model("resnet18", 10, **GRAY, weights=str(path)).eval()
    x = images(2, 1, 28)
    with torch.no_grad():
        assert not torch.equal(fresh(x), loaded(x))
    assert weights_digest(loaded.net) == weights_digest(donor)


def test_torchvision_wrong_head(tmp_path):
    path = tmp_path / "imagenet.safetensors"
    safetensors.torch.save_file(
        torchvision.models.get_model("resnet18", weights=None, num_classes=1000).state_dict(), str(path)
    )
    with pytest.raises(ModelError) as e:
        build_model("resnet18", 10, **RGB, weights=str(path))
    msg = str(e.value)
    assert "fc.weight" in msg and "(1000, 512)" in msg and "(10, 512)" in msg and "num_classes=10" in msg
