"""Teachers and students: building, loading, saving and fingerprinting classifiers.

Every kdlib model is a ``Classifier``: it takes the uint8 views that ``render`` produces
([B, C, H, W]) and returns logits [B, num_classes]. Scaling and normalisation live inside
the model, so precompute, train, verify and eval all feed models the same way.

Architectures (``arch``), tried in this order:

1. ``package.module:factory`` -- any importable factory.
2. a torchvision classification model name (``resnet18``, ``mobilenet_v3_small``, ...).
   torchvision names win over pattern 3, so ``resnet50`` / ``resnet152`` are torchvision's;
   write ``resnet50x1`` for the CIFAR-style net of that depth.
3. ``resnet{6n+2}[x{w}]`` -- CIFAR-style ResNets (He et al. 2016, Sec. 4.2), e.g. resnet20, resnet8x4.

``load_model`` also takes a run directory written by ``save_model``.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import safetensors.torch
import torch
import torchvision
from torch import nn

from kdlib.errors import ModelError

__all__ = [
    "Classifier",
    "build_model",
    "load_model",
    "save_model",
    "weights_digest",
    "model_id",
    "count_params",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_CORE_KEYS = ("arch", "num_classes", "in_channels", "mean", "std", "net_channels")
_RESNET_RE = re.compile(r"resnet(\d+)(?:x(\d+))?")
_FORMS = (
    "resnet{6n+2}[x{w}] (e.g. resnet20, resnet8x4), a torchvision classification model name "
    "(e.g. resnet18, mobilenet_v3_small; see torchvision.models.list_models()), "
    "'package.module:factory', or (load_model only) a run directory with config.json + model.safetensors"
)


class Classifier(nn.Module):
    """uint8 images [B, in_channels, H, W] -> logits [B, num_classes]."""

    def __init__(self, net: nn.Module, *, arch: str, num_classes: int, in_channels: int,
                 mean: Sequence[float], std: Sequence[float], net_channels: int):
        super().__init__()
        mean, std = _per_channel(mean, in_channels, "mean"), _per_channel(std, in_channels, "std")
        if any(s <= 0 for s in std):
            raise ModelError(f"std must be positive, got {std}")
        # Only the grayscale -> RGB case is bridged; anything else would be a silent guess.
        if net_channels != in_channels and not (in_channels == 1 and net_channels == 3):
            raise ModelError(f"{arch}: net expects {net_channels} channels, input has {in_channels}")
        self.net = net
        self.arch, self.num_classes, self.in_channels = arch, int(num_classes), int(in_channels)
        self.net_channels = int(net_channels)
        # Buffers, so they travel with .to(device) and are part of the saved weights and the digest.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    @property
    def config(self) -> dict:
        return {"arch": self.arch, "num_classes": self.num_classes, "in_channels": self.in_channels,
                "mean": [float(v) for v in self.mean.flatten()],
                "std": [float(v) for v in self.std.flatten()], "net_channels": self.net_channels}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One input convention: uint8 only, so a [0,1] float can never be divided by 255 twice.
        if x.dtype != torch.uint8:
            raise ModelError(f"{self.arch}: expects uint8 images [B,{self.in_channels},H,W] "
                             f"(scaling is done inside the model), got dtype {x.dtype}")
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ModelError(f"{self.arch}: expects [B,{self.in_channels},H,W], got {list(x.shape)}")
        # Normalise in float32 even if buffers were cast, then match the net's dtype (e.g. .half()).
        x = (x.float() / 255.0 - self.mean.float()) / self.std.float()
        if self.net_channels == 3 and self.in_channels == 1:
            x = x.expand(-1, 3, -1, -1)
        param = next(self.net.parameters(), None)
        if param is not None and param.is_floating_point():
            x = x.to(param.dtype)
        out = self.net(x)
        if not isinstance(out, torch.Tensor) and hasattr(out, "logits"):
            out = out.logits  # inception_v3 / googlenet return named tuples in train mode
        return out


def _per_channel(values: Sequence[float], channels: int, name: str) -> list[float]:
    try:
        values = [float(v) for v in values]
    except TypeError:  # a single number
        values = [float(values)]
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        raise ModelError(f"{name} has {len(values)} values, expected 1 or in_channels={channels}")
    return values


# --- CIFAR-style ResNet ---------------------------------------------------------------------

class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:  # projection shortcut (option B) only where shapes change
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class CifarResNet(nn.Module):
    """3x3 stem, 3 stages of n BasicBlocks (16w, 32w, 64w; strides 1, 2, 2), pool, linear."""

    def __init__(self, depth: int, width: int, num_classes: int, in_channels: int):
        super().__init__()
        n = (depth - 2) // 6
        widths = [16 * width, 32 * width, 64 * width]
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        blocks, cin = [], widths[0]
        for i, cout in enumerate(widths):
            for j in range(n):
                blocks.append(BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)  # any input size (28x28 MNIST, 32x32 CIFAR)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


# --- resolving an arch -----------------------------------------------------------------------

@functools.cache
def _torchvision_names() -> frozenset[str]:
    return frozenset(torchvision.models.list_models(module=torchvision.models))


def _from_factory(spec: str, num_classes: int, in_channels: int) -> tuple[nn.Module, int]:
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ModelError(f"cannot resolve model factory {spec!r}: {e}") from e
    if not callable(factory):
        raise ModelError(f"model factory {spec!r} is not callable")
    try:
        net, net_channels = factory(num_classes=num_classes, in_channels=in_channels), in_channels
    except TypeError as e:
        if "in_channels" not in str(e):
            raise ModelError(f"model factory {spec!r} failed: {e}") from e
        # The factory has no in_channels: assume an RGB net and let Classifier repeat grayscale.
        net, net_channels = factory(num_classes=num_classes), 3
    if not isinstance(net, nn.Module):
        raise ModelError(f"model factory {spec!r} returned {type(net).__name__}, not an nn.Module")
    return net, net_channels


def _resolve(arch: str, num_classes: int, in_channels: int) -> tuple[nn.Module, int]:
    """-> (net, net_channels)."""
    if ":" in arch:
        return _from_factory(arch, num_classes, in_channels)
    if arch in _torchvision_names():
        return torchvision.models.get_model(arch, weights=None, num_classes=num_classes), 3
    m = _RESNET_RE.fullmatch(arch)
    if m:
        depth, width = int(m.group(1)), int(m.group(2) or 1)
        if depth < 8 or (depth - 2) % 6:
            raise ModelError(f"{arch}: depth {depth} is not 6n+2 with n >= 1 "
                             "(resnet8, 14, 20, 32, 44, 56, 110, ...)")
        if width < 1:
            raise ModelError(f"{arch}: width multiplier must be >= 1")
        return CifarResNet(depth, width, num_classes, in_channels), in_channels
    close = difflib.get_close_matches(arch, sorted(_torchvision_names()), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ModelError(f"unknown model {arch!r}. Accepted: {_FORMS}.{hint}")


def build_model(arch: str, num_classes: int, in_channels: int, mean: Sequence[float],
                std: Sequence[float], weights: str | None = None) -> Classifier:
    """A fresh Classifier; ``weights`` is a local state-dict file for the inner net."""
    if int(num_classes) < 1 or int(in_channels) < 1:
        raise ModelError(f"{arch}: num_classes and in_channels must be >= 1, "
                         f"got {num_classes}, {in_channels}")
    net, net_channels = _resolve(arch, int(num_classes), int(in_channels))
    if weights is not None:
        _load_net_weights(net, Path(weights), int(num_classes))
    return Classifier(net, arch=arch, num_classes=num_classes, in_channels=in_channels,
                      mean=mean, std=std, net_channels=net_channels)


def _read_state_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            obj = safetensors.torch.load_file(str(path))
        elif path.suffix in (".pt", ".pth", ".bin"):
            # weights_only: tensors and plain containers only; a pickled object is refused, never run.
            obj = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise ModelError(f"weights file {path}: expected .safetensors, .pt, .pth or .bin")
    except ModelError:
        raise
    except Exception as e:  # UnpicklingError, corrupt zip / header, ...
        raise ModelError(f"cannot load weights from {path} (only plain state dicts are accepted, "
                         f"loaded with weights_only=True): {e}") from e
    for key in ("state_dict", "model"):  # common checkpoint layouts
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"weights file {path} does not hold a state dict of tensors")
    if obj and all(k.startswith("module.") for k in obj):  # saved from DistributedDataParallel
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


def _load_net_weights(net: nn.Module, path: Path, num_classes: int) -> None:
    state = _read_state_file(path)
    own = net.state_dict()
    problems = []
    for key, t in state.items():
        if key in own and own[key].shape != t.shape:
            want = tuple(own[key].shape)
            if want[:1] == (num_classes,) and t.dim() == len(want) and t.shape[1:] == want[1:]:
                problems.append(f"classifier head {key!r} has shape {tuple(t.shape)} "
                                f"({t.shape[0]} classes) but the model is built for "
                                f"num_classes={num_classes} (shape {want})")
            else:
                problems.append(f"{key!r} has shape {tuple(t.shape)}, model expects {want}")
    if problems:
        raise ModelError(f"weights file {path} does not fit: " + "; ".join(problems))
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelError(f"weights file {path} does not fit the model: {e}") from e


# --- run directories --------------------------------------------------------------------------

def load_model(spec: str, num_classes: int | None = None, in_channels: int | None = None,
               mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
               weights: str | None = None) -> Classifier:
    """A Classifier in eval mode from a run directory or an arch name.

    For a run directory the saved config wins; num_classes / in_channels, when given, must
    agree with it (mean / std are ignored: the model keeps the normalisation it was trained with).
    """
    path = Path(spec)
    if path.is_dir():
        if weights is not None:
            raise ModelError(f"{spec}: weights= cannot be combined with a run directory")
        return _load_run(path, num_classes, in_channels).eval()
    if os.sep in str(spec) or "/" in str(spec):
        raise ModelError(f"run directory not found: {spec}")
    missing = [n for n, v in [("num_classes", num_classes), ("in_channels", in_channels),
                              ("mean", mean), ("std", std)] if v is None]
    if missing:
        raise ModelError(f"building {spec!r} needs {', '.join(missing)}")
    return build_model(spec, num_classes, in_channels, mean, std, weights).eval()


def _load_run(path: Path, num_classes: int | None, in_channels: int | None) -> Classifier:
    cfg_path, w_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise ModelError(f"{path} is not a model run directory: {p.name} is missing")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read {cfg_path}: {e}") from e
    missing = [k for k in _CORE_KEYS[:5] if k not in cfg]
    if missing:
        raise ModelError(f"{cfg_path} lacks {', '.join(missing)}")
    for name, given in (("num_classes", num_classes), ("in_channels", in_channels)):
        if given is not None and int(given) != int(cfg[name]):
            raise ModelError(f"{path}: model has {name}={cfg[name]} but {name}={given} was asked for")
    if "heads" in cfg:  # a DIH teacher written by `kdlib heads`: the backbone plus classifier heads
        from .heads import load_headed_run

        return load_headed_run(path, cfg)
    model = build_model(cfg["arch"], cfg["num_classes"], cfg["in_channels"], cfg["mean"], cfg["std"])
    if cfg.get("net_channels", model.net_channels) != model.net_channels:
        raise ModelError(f"{path}: saved net_channels={cfg['net_channels']}, "
                         f"{cfg['arch']} now builds with {model.net_channels}")
    try:
        state = safetensors.torch.load_file(str(w_path))
    except Exception as e:
        raise ModelError(f"cannot read {w_path}: {e}") from e
    if "weights_digest" in cfg and _digest_state(state) != cfg["weights_digest"]:
        raise ModelError(f"{w_path}: weights do not match the digest in {CONFIG_NAME} (corrupt file?)")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelError(f"{w_path} does not fit {cfg['arch']}: {e}") from e
    return model


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:  # durable before it becomes visible under the real name
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_model(model: Classifier, out_dir: str | Path, extra: dict | None = None) -> None:
    """Write out_dir/model.safetensors and out_dir/config.json (config + extra + weights_digest)."""
    if not isinstance(model, Classifier):
        raise ModelError(f"save_model needs a kdlib Classifier, got {type(model).__name__}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    config = dict(model.config)
    for key, value in (extra or {}).items():
        if key in config and config[key] != value:
            raise ModelError(f"extra[{key!r}]={value!r} would overwrite the model's own {key}")
        config[key] = value
    config["weights_digest"] = _digest_state(state)
    # Weights first: config.json names a digest, so a config next to stale weights is caught on load.
    _atomic_write(out_dir / WEIGHTS_NAME, lambda p: safetensors.torch.save_file(state, str(p)))
    _atomic_write(out_dir / CONFIG_NAME,
                  lambda p: p.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"))


# --- identity ---------------------------------------------------------------------------------

def _digest_state(state: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        # Raw bytes through a uint8 view: works for bf16 (which numpy lacks) and every other dtype.
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def weights_digest(model: nn.Module) -> str:
    """sha256 of the state dict (names, dtypes, shapes, bytes): same weights, same digest."""
    return _digest_state(model.state_dict())


def model_id(spec: str) -> str:
    """A readable id for a store's meta: the arch name, or ``run:<abs path>``."""
    path = Path(spec)
    return f"run:{path.resolve()}" if path.is_dir() else str(spec)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
