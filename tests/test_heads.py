"""DIH heads: fitting leaves the backbone bit-identical, the run dir reloads, the cohort is the main + heads."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import FMNIST_RECIPE

from kdlib.errors import ModelError
from kdlib.headed import HeadedClassifier, attach_heads, backbone_digest
from kdlib.models import build_model
from kdlib.resolve import load_model
from kdlib.weights import weights_digest


def _views(n: int = 8, size: int = 28, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, size, size), generator=g, dtype=torch.uint8)


def test_fitting_heads_leaves_the_backbone_unchanged_and_reloads(teacher_dir, headed_teacher_dir):
    plain = load_model(teacher_dir)
    headed = load_model(headed_teacher_dir)
    assert isinstance(headed, HeadedClassifier) and headed.head_layers == ["blocks.0", "blocks.1", "blocks.2"]
    # the digest of everything but the heads is the plain teacher's, byte for byte (BatchNorm stats included)
    assert backbone_digest(headed) == weights_digest(plain)
    state = safetensors.torch.load_file(str(Path(headed_teacher_dir) / "model.safetensors"))
    for key, value in load_model(teacher_dir).state_dict().items():
        assert torch.equal(state[key], value), key
    cfg = json.loads((Path(headed_teacher_dir) / "config.json").read_text())
    assert cfg["heads"]["backbone_digest"] == weights_digest(plain) and cfg["heads"]["input_size"] == 28
    assert weights_digest(headed) == cfg["weights_digest"] != weights_digest(plain)
    # the model returns the main logits (every stage runs it unchanged) and the heads' in the same forward
    x = _views()
    with torch.no_grad():
        main, cohort = headed(x), headed.cohort_logits(x)
        again = load_model(headed_teacher_dir).cohort_logits(x)
    assert cohort.shape == (8, 4, 10)
    assert torch.equal(main, plain(x)) and torch.equal(cohort[:, 0], main)
    assert torch.equal(cohort, again)  # a reload gives the same logits, bit for bit
    assert len(headed.last_head_logits) == 3
    report = json.loads((Path(headed_teacher_dir) / "heads.json").read_text())
    assert set(report["test_top1"]) == {"main", "blocks.0", "blocks.1", "blocks.2"}
    assert all(0.1 < v <= 1 for v in report["test_top1"].values())  # heads learned something (10 classes)


def test_heads_learn_on_their_layers():
    torch.manual_seed(0)
    base = build_model("resnet14", 10, 1, [0.5], [0.25])
    headed = attach_heads(base, ["stage1", "blocks.5"], 28)
    assert headed.head_layers == ["blocks.1", "blocks.5"]
    assert [h.in_features for h in headed.heads] == [16 * 28 * 28, 64 * 7 * 7]  # flattened feature maps
    tv = attach_heads(build_model("resnet18", 10, 1, [0.5], [0.25]), None, 32)
    assert tv.head_layers == ["layer1", "layer2", "layer3", "layer4"]  # torchvision stages, k = 4


def test_bad_head_layers_and_sizes_are_refused():
    base = build_model("resnet8", 10, 1, [0.5], [0.25])
    with pytest.raises(ModelError, match=r"'nope' is not a submodule.*stage1..stage3"):
        attach_heads(base, ["nope"], 28)
    with pytest.raises(ModelError, match=r"stage4.*stage1..stage3"):
        attach_heads(base, ["stage4"], 28)
    headed = attach_heads(base, None, 28)
    twin = copy.deepcopy(headed)  # a copy keeps its own taps: its heads see its own features
    x = _views(2)
    with torch.no_grad():
        torch.testing.assert_close(twin.cohort_logits(x), headed.cohort_logits(x))
        twin.heads[0].weight.add_(1.0)
        assert not torch.equal(twin.cohort_logits(x)[:, 1], headed.cohort_logits(x)[:, 1])
    with pytest.raises(ModelError, match=r"fitted on 28x28.*got 32x32"):
        headed(_views(size=32))
    with pytest.raises(ModelError, match="already has heads"):
        attach_heads(headed, None, 28)


def test_heads_command_line(teacher_dir, tmp_path):
    """`kdlib heads` through the real CLI, with explicit layers; a bad layer is one clear line."""
    out = tmp_path / "th"
    cmd = [
        sys.executable,
        "-m",
        "kdlib",
        "heads",
        "--teacher",
        teacher_dir,
        "--data",
        "fashion-mnist",
        "--recipe",
        FMNIST_RECIPE,
        "--epochs",
        "1",
        "--limit",
        "64",
        "--workers",
        "0",
        "--cpu",
        "--no-eval",
        "--head-layers",
        "stage2,stage3",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 heads" in proc.stdout and "unchanged" in proc.stdout
    assert load_model(str(out)).head_layers == ["blocks.1", "blocks.2"]
    bad = subprocess.run(
        cmd[:-4] + ["--head-layers", "conv9", "--out", str(tmp_path / "bad")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = bad.stderr.strip().splitlines()  # the teacher's input contract is printed first, then the one error
    assert bad.returncode == 2 and lines[-1].startswith("error: head layer 'conv9'") and "Traceback" not in bad.stderr
    assert sum(line.startswith("error:") for line in lines) == 1
    assert not (tmp_path / "bad").exists()


def test_heads_refuse_a_teacher_mapped_onto_other_classes():
    """Heads answer over the net's own classes; on a class-mapped teacher they would store ids outside the data's."""
    import pytest as _pytest

    from kdlib.errors import ModelError
    from kdlib.headed import attach_heads
    from kdlib.models import Classifier, build_model

    base = build_model("resnet8", 4, 1, [0.5], [0.25])
    mapped = Classifier(
        base.net,
        arch="resnet8",
        num_classes=4,
        in_channels=1,
        mean=[0.5],
        std=[0.25],
        net_channels=base.net_channels,
        class_index=[2, 0],
    )
    assert mapped.num_classes == 2
    with _pytest.raises(ModelError, match="class-map"):
        attach_heads(mapped, None, 28)
    assert attach_heads(base, None, 28).num_classes == 4  # unmapped: fine
