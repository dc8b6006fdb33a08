"""A pretrained teacher is fed what its weights expect (issue 11): the input contract, torchvision and
timm names with local weights, factories as people write them, class maps, kdlib's own weights,
and no module named in a run dir's config is ever imported."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import torchvision
from PIL import Image

from kdlib.errors import ModelError, StoreMismatchError
from kdlib.plan import center_params
from kdlib.render import render_views
from kdlib.resolve import resolve_model
from kdlib.rundir import save_model

IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
REPO = Path(__file__).resolve().parents[1]


def _tv_weights(tmp_path: Path, num_classes: int = 1000, seed: int = 0) -> tuple[torch.nn.Module, str]:
    """A torchvision resnet18 with random weights saved locally, as a downloaded checkpoint would be."""
    torch.manual_seed(seed)
    net = torchvision.models.resnet18(num_classes=num_classes).eval()
    path = tmp_path / f"resnet18-{seed}.safetensors"
    safetensors.torch.save_file(net.state_dict(), str(path))
    return net, str(path)


def test_torchvision_name_matches_plain_torch_with_its_own_preprocessing(tmp_path):
    net, path = _tv_weights(tmp_path)
    model = resolve_model("torchvision:resnet18:IMAGENET1K_V1", classes=1000, in_channels=3, weights=path).eval()
    c = model.contract
    assert (c.mean, c.std, c.size, c.crop_fraction, c.interpolation) == (
        IMAGENET["mean"],
        IMAGENET["std"],
        224,
        0.875,
        "bilinear",
    )
    assert "IMAGENET1K_V1" in c.origin and model.config["contract"]["origin"] == c.origin
    # plain torch: the weights' own transforms (resize 256 = no-op here, center crop 224, normalise)
    img = torch.randint(0, 256, (3, 256, 256), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    transforms = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.transforms()
    with torch.no_grad():
        want = net(transforms(img)[None])
        # kdlib: the center view the contract asks for, rendered by the one render function
        p = center_params(np.array([[256, 256]], np.int32), np.arange(1), c.crop_fraction)
        got = model(render_views(p, lambda i: img.numpy(), c.size, 1))
    assert torch.equal(got, want)


def test_torchvision_weights_from_the_hub_cache_and_nothing_downloads(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(ModelError, match=r"no local weights.*resnet18-f37072fd.pth.*--weights"):
        resolve_model("torchvision:resnet18:IMAGENET1K_V1", classes=1000, in_channels=3)
    net, _ = _tv_weights(tmp_path)
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(net.state_dict(), cache / "resnet18-f37072fd.pth")  # read back with weights_only=True
    model = resolve_model("torchvision:resnet18:IMAGENET1K_V1", classes=1000, in_channels=3).eval()
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(
            model(x),
            net(
                (x / 255.0 - torch.tensor(IMAGENET["mean"]).view(1, 3, 1, 1))
                / torch.tensor(IMAGENET["std"]).view(1, 3, 1, 1)
            ),
        )
    with pytest.raises(ModelError, match="no tag 'NOPE'.*IMAGENET1K_V1"):
        resolve_model("torchvision:resnet18:NOPE", classes=1000, in_channels=3)


def test_timm_name_with_local_weights(tmp_path):
    timm = pytest.importorskip("timm", reason="timm is an optional extra (kdlib[timm]); make test installs it")
    torch.manual_seed(0)
    net = timm.create_model("resnet18.a1_in1k", pretrained=False).eval()
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(net.state_dict(), str(path))
    model = resolve_model("timm:resnet18.a1_in1k", classes=1000, in_channels=3, weights=str(path)).eval()
    c = model.contract
    assert (c.mean, c.std, c.size, c.interpolation) == (IMAGENET["mean"], IMAGENET["std"], 224, "bicubic")
    assert c.crop_fraction == net.pretrained_cfg["crop_pct"] and "timm" in c.origin
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        want = net((x / 255.0 - torch.tensor(c.mean).view(1, 3, 1, 1)) / torch.tensor(c.std).view(1, 3, 1, 1))
        assert torch.equal(model(x), want)
    # timm knows ImageNet's synsets: a folder named by synset ids maps without a class-map file
    mapped = resolve_model(
        "timm:resnet18.a1_in1k", classes=["n01443537", "n01440764"], in_channels=3, weights=str(path)
    )
    assert mapped.config["class_index"] == [1, 0]
    with pytest.raises(ModelError, match="no local weights"):
        resolve_model("timm:resnet18.a1_in1k", classes=1000, in_channels=3)
    with pytest.raises(ModelError, match="timm has no model"):
        resolve_model("timm:no_such_net_xyz", classes=10, in_channels=3)


def test_timm_missing_gives_a_clear_line():
    code = (
        "import sys; sys.modules['timm'] = None\n"
        "from kdlib.resolve import resolve_model\n"
        "try:\n    resolve_model('timm:resnet18.a1_in1k', classes=10, in_channels=3)\n"
        "except Exception as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120).stdout
    assert "needs timm" in out and "kdlib[timm]" in out


# -- factories as people write them ----------------------------------------------------------------
FACTORIES = textwrap.dedent("""
    import pathlib, torch
    from torch import nn

    def _net(classes, chans=3):
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(chans, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes))

    def pretrained():                      # no arguments: a fixed 3-class head, ImageNet constants
        return _net(3)
    pretrained.mean = (0.485, 0.456, 0.406)
    pretrained.std = (0.229, 0.224, 0.225)

    def with_config():                     # returns (model, config) as some hubs do
        return _net(3), {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "input_size": [3, 32, 32]}

    def thousand():                        # an ImageNet-size head, no class names, no contract
        return _net(1000)

    def sized(num_classes):                # num_classes only
        return _net(num_classes)

    def both(num_classes, in_channels):
        return _net(num_classes, in_channels)

    def five(num_classes=10):              # ignores what it is asked for
        return _net(5)

    def needs_depth(depth):
        return _net(3)
""")


@pytest.fixture
def factories(tmp_path, monkeypatch) -> str:
    mod = tmp_path / "mods"
    mod.mkdir()
    (mod / "kd_factories_t11.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(mod))
    monkeypatch.setenv("PYTHONPATH", str(mod))  # for subprocess CLI calls
    return "kd_factories_t11"


def _stats():
    return [0.1, 0.2, 0.3], [0.3, 0.3, 0.3]


def test_factory_forms(factories):
    classes = ["a", "b", "c"]
    m = resolve_model(f"{factories}:pretrained", classes=classes, in_channels=3, data_stats=_stats)
    assert m.num_classes == 3 and m.contract.mean == IMAGENET["mean"] and "attributes" in m.contract.origin
    m = resolve_model(f"{factories}:with_config", classes=classes, in_channels=3, data_stats=_stats)
    assert m.contract.mean == (0.5,) * 3 and m.contract.size == 32 and "returned" in m.contract.origin
    # built for the data (num_classes taken): trained here, so the data's statistics are its contract
    for name in ("sized", "both"):
        m = resolve_model(f"{factories}:{name}", classes=classes, in_channels=3, data_stats=_stats)
        assert m.num_classes == 3 and m.contract.mean == (0.1, 0.2, 0.3) and "measured" in m.contract.origin
    # a grayscale input and a factory without in_channels: an RGB net, gray repeated
    m = resolve_model(f"{factories}:sized", classes=classes, in_channels=1, data_stats=lambda: ([0.5], [0.2]))
    assert m.net_channels == 3 and m(torch.zeros(1, 1, 16, 16, dtype=torch.uint8)).shape == (1, 3)
    with pytest.raises(ModelError, match="needs depth"):
        resolve_model(f"{factories}:needs_depth", classes=classes, in_channels=3)


def test_class_counts_are_checked_with_both_numbers(factories):
    ten = [str(i) for i in range(10)]
    with pytest.raises(ModelError, match=r"teacher .*:thousand has 1000 classes, the data has 10.*--class-map"):
        resolve_model(f"{factories}:thousand", classes=ten, in_channels=3, mean=IMAGENET["mean"], std=IMAGENET["std"])
    # issue 12 row 9: a student factory with 5 outputs on 10-class data, refused when it is built
    with pytest.raises(ModelError, match=r"asked for num_classes=10 but its model gives 5 outputs"):
        resolve_model(f"{factories}:five", classes=10, in_channels=3, data_stats=_stats, role="student")
    with pytest.raises(ModelError, match=r"student .*:pretrained gives 3 outputs but the data has 10 classes"):
        resolve_model(f"{factories}:pretrained", classes=10, in_channels=3, role="student")


def test_pretrained_weights_without_a_contract_are_not_guessed(tmp_path, factories):
    _, path = _tv_weights(tmp_path, num_classes=3)
    with pytest.raises(ModelError, match="preprocessing its weights expect is unknown.*--mean"):
        resolve_model("resnet18", classes=["a", "b", "c"], in_channels=3, weights=path, data_stats=_stats)
    with pytest.raises(ModelError, match="preprocessing its weights expect is unknown"):
        resolve_model(f"{factories}:thousand", classes=1000, in_channels=3, data_stats=_stats)
    m = resolve_model(
        "resnet18", classes=["a", "b", "c"], in_channels=3, weights=path, mean=IMAGENET["mean"], std=IMAGENET["std"]
    )
    assert m.contract.origin == "--mean/--std"
    # flags that contradict the weights' own contract are refused, not silently applied
    with pytest.raises(ModelError, match="contradicts the weights' own mean"):
        resolve_model(f"{factories}:pretrained", classes=3, in_channels=3, mean=(0.5, 0.5, 0.5), std=(0.2,) * 3)


def test_kdlib_weights_accepted_for_the_same_arch(tmp_path):
    torch.manual_seed(3)
    first = resolve_model("resnet8", classes=10, in_channels=1, data_stats=lambda: ([0.3], [0.35])).eval()
    save_model(first, tmp_path / "run", extra={"input_size": 28})
    again = resolve_model(
        "resnet8",
        classes=10,
        in_channels=1,
        weights=str(tmp_path / "run" / "model.safetensors"),
        data_stats=lambda: ([0.9], [0.1]),
    ).eval()
    x = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(first(x), again(x))
    assert again.contract.same_normalisation(first.contract) and "kdlib weights" in again.contract.origin
    with pytest.raises(ModelError, match="does not fit"):
        resolve_model("resnet14", classes=10, in_channels=1, weights=str(tmp_path / "run" / "model.safetensors"))


# -- class maps ------------------------------------------------------------------------------------
def test_class_map_by_names_file_and_refusal(tmp_path):
    _, path = _tv_weights(tmp_path)
    # folder classes named as the teacher's categories, in another order: mapped by name
    m = resolve_model("torchvision:resnet18:IMAGENET1K_V1", classes=["goldfish", "tench"], in_channels=3, weights=path)
    assert m.num_classes == 2 and m.config["class_index"] == [1, 0] and m.config["net_classes"] == 1000
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    m.eval()
    with torch.no_grad():
        full = m.net((x / 255.0 - m.mean) / m.std)
        assert torch.equal(m(x), full[:, [1, 0]])
    # a file maps folder names (e.g. synset ids) to teacher outputs or class names
    cmap = tmp_path / "map.json"
    cmap.write_text(json.dumps({"n01440764": 0, "n01443537": "goldfish"}))
    m = resolve_model(
        "torchvision:resnet18:IMAGENET1K_V1",
        classes=["n01440764", "n01443537"],
        in_channels=3,
        weights=path,
        class_map=str(cmap),
    )
    assert m.config["class_index"] == [0, 1]
    with pytest.raises(ModelError, match=r"1000 classes, the data has 2.*'n01440764'.*--class-map"):
        resolve_model(
            "torchvision:resnet18:IMAGENET1K_V1", classes=["n01440764", "n01443537"], in_channels=3, weights=path
        )
    cmap.write_text(json.dumps({"n01440764": 0}))
    with pytest.raises(ModelError, match="lacks data class"):
        resolve_model(
            "torchvision:resnet18:IMAGENET1K_V1",
            classes=["n01440764", "n01443537"],
            in_channels=3,
            weights=path,
            class_map=str(cmap),
        )
    cmap.write_text(json.dumps({"n01440764": 0, "n01443537": 0}))
    with pytest.raises(ModelError, match="share one teacher output"):
        resolve_model(
            "torchvision:resnet18:IMAGENET1K_V1",
            classes=["n01440764", "n01443537"],
            in_channels=3,
            weights=path,
            class_map=str(cmap),
        )


# -- through the CLI: precompute records it, verify refuses another, eval of a factory ---------------
def _folder(root: Path, classes: list[str], per_class: int = 4, size: int = 40) -> str:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return str(root)


RECIPE = (
    "name: t\nsize: 32\ncrop: inception\nscale: [0.5, 1.0]\nflip: true\nmix: none\nimages_per_group: 1\n"
    "crops_per_image: 1\nseed: 0\ncenter_fraction: 0.875\n"
)


def _cli(*args: str, cwd: Path, ok: bool = True) -> subprocess.CompletedProcess:
    import os

    proc = subprocess.run(
        [sys.executable, "-m", "kdlib", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "") + os.pathsep + str(REPO)},
    )
    assert (proc.returncode == 0) == ok, f"kdlib {' '.join(args)}: {proc.returncode}\n{proc.stderr[-3000:]}"
    return proc


def test_precompute_records_the_contract_verify_refuses_another(tmp_path, factories):
    data = _folder(tmp_path / "data", ["a", "b", "c"])
    (tmp_path / "r.yaml").write_text(RECIPE)
    teacher = f"{factories}:pretrained"
    out = _cli(
        "precompute",
        "--teacher",
        teacher,
        "--data",
        data,
        "--recipe",
        "r.yaml",
        "--out",
        "s",
        "--k",
        "3",
        "--workers",
        "0",
        cwd=tmp_path,
    )
    assert "mean [0.485, 0.456, 0.406], std [0.229, 0.224, 0.225]" in out.stderr and "attributes" in out.stderr
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    assert meta["teacher"]["contract"]["mean"] == list(IMAGENET["mean"])
    assert "attributes" in meta["teacher"]["contract"]["origin"]
    res = json.loads(_cli("verify", "--shards", "s", "--teacher", teacher, "--views", "8", cwd=tmp_path).stdout)
    assert res["ok"] and res["top1_agreement"] == 1.0
    # the same network fed other constants: refused, naming both normalisations
    (tmp_path / "mods" / "kd_other_t11.py").write_text(
        "from kd_factories_t11 import pretrained as _p\n"
        "def pretrained():\n    return _p()\npretrained.mean = (0.5, 0.5, 0.5)\npretrained.std = (0.5, 0.5, 0.5)\n"
    )
    proc = _cli("verify", "--shards", "s", "--teacher", "kd_other_t11:pretrained", cwd=tmp_path, ok=False)
    assert proc.returncode == 2 and "error: store s was written with the teacher fed mean [0.485" in proc.stderr
    assert "Traceback" not in proc.stderr
    from kdlib.verify import verify

    with pytest.raises(StoreMismatchError, match="mean"):
        verify(str(tmp_path / "s"), "kd_other_t11:pretrained", views=8)
    # eval of a factory teacher whose contract names no size: the size is given (issue 20 row 9)
    res = json.loads(
        _cli(
            "eval",
            "--model",
            teacher,
            "--data",
            data,
            "--split",
            "test",
            "--workers",
            "0",
            "--size",
            "40",
            cwd=tmp_path,
        ).stdout
    )
    assert res["images"] == 12 and 0 <= res["top1"] <= 1


def test_run_dir_config_never_imports_a_module(tmp_path, factories):
    marker = tmp_path / "imported"
    (tmp_path / "evil_t11.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\nfrom kd_factories_t11 import sized as fn\n"
    )
    model = resolve_model(f"{factories}:sized", classes=3, in_channels=3, data_stats=_stats)
    save_model(model, tmp_path / "run", extra={"input_size": 32})
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    cfg["arch"] = "evil_t11:fn"
    (tmp_path / "run" / "config.json").write_text(json.dumps(cfg))
    data = _folder(tmp_path / "data", ["a", "b", "c"])
    proc = _cli("eval", "--model", "run", "--data", data, cwd=tmp_path, ok=False)
    assert proc.returncode == 2 and "never imports code named in a file" in proc.stderr
    assert "--model/--teacher evil_t11:fn --weights run/model.safetensors" in proc.stderr and not marker.exists()
    # typed on the command line, the factory runs, and the run dir's weights fit it
    res = _cli(
        "eval",
        "--model",
        f"{factories}:sized",
        "--weights",
        "run/model.safetensors",
        "--data",
        data,
        "--workers",
        "0",
        cwd=tmp_path,
    )
    assert json.loads(res.stdout)["images"] == 12


def test_run_dir_of_a_named_and_mapped_teacher_reloads_offline(tmp_path, monkeypatch):
    from kdlib.resolve import load_model

    _, path = _tv_weights(tmp_path)
    m = resolve_model(
        "torchvision:resnet18:IMAGENET1K_V1", classes=["goldfish", "tench"], in_channels=3, weights=path
    ).eval()
    save_model(m, tmp_path / "run")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-hub"))  # the run dir needs no cached weights
    again = load_model(str(tmp_path / "run"))
    assert again.config["class_index"] == [1, 0] and again.contract.size == 224
    assert "run dir" in again.contract.origin and "IMAGENET1K_V1" in again.contract.origin
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(m(x), again(x))


def test_cli_imagenet_teacher_over_a_folder_of_its_classes(tmp_path):
    """The headline case: a 1000-class torchvision teacher, a folder of two of its classes, by name."""
    _, weights = _tv_weights(tmp_path)
    data = _folder(tmp_path / "data", ["goldfish", "tench"], per_class=3)
    (tmp_path / "r.yaml").write_text(RECIPE)
    teacher = ["--teacher", "torchvision:resnet18:IMAGENET1K_V1", "--weights", weights]
    out = _cli(
        "precompute", *teacher, "--data", data, "--recipe", "r.yaml", "--out", "s", "--workers", "0", cwd=tmp_path
    )
    assert "2 data classes mapped to its 1000 outputs by the teacher's class names" in out.stderr
    assert "note: teacher torchvision:resnet18:IMAGENET1K_V1 was evaluated at 224 px" in out.stdout
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    assert meta["num_classes"] == 2 and meta["teacher"]["config"]["class_index"] == [1, 0]
    assert meta["teacher"]["contract"]["origin"] == "torchvision ResNet18_Weights.IMAGENET1K_V1"
    assert json.loads(_cli("verify", "--shards", "s", *teacher, "--views", "6", cwd=tmp_path).stdout)["ok"]
    proc = _cli("verify", "--shards", "s", *teacher, "--mean", "0.5", "--std", "0.5", cwd=tmp_path, ok=False)
    assert proc.returncode == 2 and "contradicts the weights' own mean" in proc.stderr
    # eval feeds it at its own size and crop, over the data's two classes
    res = json.loads(
        _cli(
            "eval",
            "--model",
            "torchvision:resnet18:IMAGENET1K_V1",
            "--weights",
            weights,
            "--data",
            data,
            "--workers",
            "0",
            cwd=tmp_path,
        ).stdout
    )
    assert res["images"] == 6


def test_kdlib_teacher_maps_a_reordered_folder_by_its_recorded_class_names(tmp_path):
    from kdlib.resolve import load_model

    model = resolve_model("resnet8", classes=["cat", "dog", "emu"], in_channels=3, data_stats=_stats).eval()
    save_model(model, tmp_path / "run", extra={"classes": ["cat", "dog", "emu"]})
    assert load_model(str(tmp_path / "run")).classes == ["cat", "dog", "emu"]
    sub = resolve_model(str(tmp_path / "run"), classes=["emu", "cat"], in_channels=3)
    assert sub.config["class_index"] == [2, 0]
    with pytest.raises(ModelError, match="not among the teacher's class names: 'yak'"):
        resolve_model(str(tmp_path / "run"), classes=["cat", "yak"], in_channels=3)


def test_timm_weights_from_the_hugging_face_cache(tmp_path):
    timm = pytest.importorskip("timm", reason="timm is an optional extra (kdlib[timm]); make test installs it")
    import os

    torch.manual_seed(0)
    net = timm.create_model("resnet18.a1_in1k", pretrained=False)
    repo = tmp_path / "hf" / "models--timm--resnet18.a1_in1k"
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    safetensors.torch.save_file(net.state_dict(), str(snap / "model.safetensors"))
    code = (
        "from kdlib.resolve import resolve_model\nfrom kdlib.weights import weights_digest\n"
        "m = resolve_model('timm:resnet18.a1_in1k', classes=1000, in_channels=3)\n"
        "print(weights_digest(m.net))\n"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hf"), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    from kdlib.weights import weights_digest

    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == weights_digest(net)
