"""Classifiers: the one model shape every stage feeds, and the architectures kdlib builds.

Every kdlib model is a ``Classifier``: it takes the uint8 views that ``render`` produces
([B, C, H, W]) and returns logits [B, num_classes]. Scaling and normalisation live inside
the model, so precompute, train, verify and eval all feed models the same way.

Architectures (``arch``) ``build_model`` knows, tried in this order:

1. ``package.module:factory`` -- any importable factory, called with ``num_classes`` and
   ``in_channels`` when its signature takes them, else with no arguments (the class count is then
   read from the model's output). Only a factory typed by the user is run (see ``kdlib.resolve``).
2. a torchvision classification model name (``resnet18``, ``mobilenet_v3_small``, ...).
   torchvision names win over pattern 3, so ``resnet50`` / ``resnet152`` are torchvision's;
   write ``resnet50x1`` for the CIFAR-style net of that depth.
3. ``resnet{6n+2}[x{w}]`` -- CIFAR-style ResNets (He et al. 2016, Sec. 4.2), e.g. resnet20, resnet8x4.
4. ``timm:<model>`` (a student): timm's architecture, randomly initialised for the data's classes,
   channels and (where the model takes an ``img_size``) view size; timm is an optional extra.

Pretrained names (``torchvision:``, ``timm:``) are ``kdlib.pretrained``'s; run directories are
``kdlib.rundir``'s; ``kdlib.resolve.resolve_model`` is the one entry point from a name to a model.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import inspect
import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from .contract import InputContract
from .errors import ModelError
from .rundir import CONFIG_NAME, WEIGHTS_NAME
from .weights import read_state_file

__all__ = [
    "Classifier",
    "CifarResNet",
    "Built",
    "build_net",
    "build_model",
    "load_net_weights",
    "model_id",
    "count_params",
]

_RESNET_RE = re.compile(r"resnet(\d+)(?:x(\d+))?")
_FORMS = (
    "resnet{6n+2}[x{w}] (e.g. resnet20, resnet8x4), a torchvision classification model name "
    "(e.g. resnet18, mobilenet_v3_small; see torchvision.models.list_models()), "
    "'package.module:factory', or (load_model only) a run directory with config.json + model.safetensors"
)


class Classifier(nn.Module):
    """uint8 images [B, in_channels, H, W] -> logits [B, num_classes]."""

    def __init__(
        self,
        net: nn.Module,
        *,
        arch: str,
        num_classes: int,
        in_channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        net_channels: int,
        contract: InputContract | None = None,
        class_index: Sequence[int] | None = None,
        build: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        self.build = dict(build) if build is not None else None  # how a timm student was built (its img_size)
        # A grayscale input fed to an RGB net may carry the net's 3-channel constants (ImageNet's).
        chans = net_channels if len(_floats(mean)) == net_channels == 3 and in_channels == 1 else in_channels
        mean, std = _per_channel(mean, chans, "mean"), _per_channel(std, chans, "std")
        if any(s <= 0 for s in std):
            raise ModelError(f"std must be positive, got {std}")
        # Only the grayscale -> RGB case is bridged; anything else would be a silent guess.
        if net_channels != in_channels and not (in_channels == 1 and net_channels == 3):
            raise ModelError(f"{arch}: net expects {net_channels} channels, input has {in_channels}")
        self.net = net
        self.arch, self.in_channels = arch, int(in_channels)
        self.net_channels = int(net_channels)
        # The net's own outputs; with a class map only the mapped ones are answered, in the data's order.
        self.net_classes = int(num_classes)
        self.num_classes = len(class_index) if class_index is not None else int(num_classes)
        if contract is None or not contract.same_normalisation(InputContract(mean, std, "")):
            contract = InputContract(mean, std, origin=contract.origin if contract else "given")
        self.contract = contract
        # Buffers, so they travel with .to(device) and are part of the saved weights and the digest.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        index = None
        if class_index is not None:
            index = torch.tensor([int(i) for i in class_index], dtype=torch.int64)
            if len(index) == 0 or int(index.min()) < 0 or int(index.max()) >= self.net_classes:
                raise ModelError(f"{arch}: class map {list(class_index)[:8]} outside 0..{self.net_classes - 1}")
        self.register_buffer("class_index", index)  # None: not in the state dict

    @property
    def config(self) -> dict:
        cfg = {
            "arch": self.arch,
            "num_classes": self.num_classes,
            "in_channels": self.in_channels,
            "mean": [float(v) for v in self.mean.flatten()],
            "std": [float(v) for v in self.std.flatten()],
            "net_channels": self.net_channels,
            "contract": self.contract.to_dict(),
        }
        if self.class_index is not None:
            cfg["class_index"] = [int(i) for i in self.class_index]
            cfg["net_classes"] = self.net_classes
        if self.build is not None:
            cfg["build"] = self.build
        return cfg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One input convention: uint8 only, so a [0,1] float can never be divided by 255 twice.
        if x.dtype != torch.uint8:
            raise ModelError(
                f"{self.arch}: expects uint8 images [B,{self.in_channels},H,W] "
                f"(scaling is done inside the model), got dtype {x.dtype}"
            )
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ModelError(f"{self.arch}: expects [B,{self.in_channels},H,W], got {list(x.shape)}")
        # Normalise in float32 even if buffers were cast, then match the net's dtype (e.g. .half()).
        x = x.float() / 255.0
        if self.net_channels == 3 and self.in_channels == 1:
            x = x.expand(-1, 3, -1, -1)
        x = (x - self.mean.float()) / self.std.float()
        param = next(self.net.parameters(), None)
        if param is not None and param.is_floating_point():
            x = x.to(param.dtype)
        out = self.net(x)
        if not isinstance(out, torch.Tensor) and hasattr(out, "logits"):
            out = out.logits  # inception_v3 / googlenet return named tuples in train mode
        if self.class_index is not None:
            out = out.index_select(1, self.class_index)
        return out


def _floats(values: Sequence[float] | float) -> list[float]:
    try:
        return [float(v) for v in values]
    except TypeError:  # a single number
        return [float(values)]


def _per_channel(values: Sequence[float], channels: int, name: str) -> list[float]:
    values = _floats(values)
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        raise ModelError(f"{name} has {len(values)} values, expected 1 or in_channels={channels}")
    return values


# --- CIFAR-style ResNet ---------------------------------------------------------------------


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a shortcut (projection only where the shape changes)."""

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
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)
        )
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

    def stage_layers(self) -> list[str]:
        """The last block of each of the three stages (`kdlib._layers` names them stage1..stage3)."""
        n = len(self.blocks) // 3
        return [f"blocks.{n * (i + 1) - 1}" for i in range(3)]


# --- resolving an arch -----------------------------------------------------------------------


@functools.cache
def _torchvision_names() -> frozenset[str]:
    return frozenset(torchvision.models.list_models(module=torchvision.models))


@dataclasses.dataclass
class Built:
    """A bare net and what building it told us."""

    net: nn.Module
    net_channels: int
    num_classes: int  # the net's outputs
    sized: bool  # built for the data's class count (a fresh net), not a fixed pretrained head
    contract: InputContract | None = None
    class_names: list[list[str]] | None = None
    build: dict[str, Any] | None = None  # keyword arguments it was built with, beyond classes and channels


def _import_factory(spec: str) -> Callable[..., Any]:
    module_name, _, attr = spec.partition(":")
    try:
        factory = functools.reduce(getattr, attr.split("."), importlib.import_module(module_name))
    except (ImportError, AttributeError, ValueError) as e:
        raise ModelError(f"cannot resolve model factory {spec!r}: {e}") from e
    if not callable(factory):
        raise ModelError(f"model factory {spec!r} is not callable")
    return factory


def _first_conv_channels(net: nn.Module) -> int | None:
    conv = next((m for m in net.modules() if isinstance(m, nn.Conv2d)), None)
    return None if conv is None else int(conv.in_channels)


def _from_factory(spec: str, num_classes: int, in_channels: int) -> Built:
    """Call the factory as it is written: with num_classes / in_channels where it takes them."""
    factory = _import_factory(spec)
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # a builtin or C callable: offer both, as before
        params = None
    kwargs: dict[str, int] = {}
    if params is None:
        kwargs = {"num_classes": num_classes, "in_channels": in_channels}
    else:
        var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        if "num_classes" in params or var_kw:
            kwargs["num_classes"] = num_classes
        if "in_channels" in params:
            kwargs["in_channels"] = in_channels
        needed = [
            n
            for n, p in params.items()
            if p.default is inspect.Parameter.empty
            and n not in kwargs
            and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        ]
        if needed:
            raise ModelError(
                f"model factory {spec!r} needs {', '.join(needed)}; kdlib passes only num_classes "
                "and in_channels (when the factory takes them): wrap it in a function that does"
            )
    try:
        out = factory(**kwargs)
    except TypeError as e:
        if params is not None or "in_channels" not in str(e):
            raise ModelError(f"model factory {spec!r} failed: {e}") from e
        kwargs.pop("in_channels")  # no in_channels: an RGB net, Classifier repeats grayscale
        out = factory(**kwargs)
    except Exception as e:
        raise ModelError(f"model factory {spec!r} failed: {type(e).__name__}: {e}") from e
    returned = None
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping):
        out, returned = out  # (model, config): a factory that says how its weights expect input
    if not isinstance(out, nn.Module):
        raise ModelError(f"model factory {spec!r} returned {type(out).__name__}, not an nn.Module")
    net_channels = in_channels if "in_channels" in kwargs else (_first_conv_channels(out) or 3)
    contract = _factory_contract(spec, factory, out, returned)
    size = contract.size if contract else None
    outputs = _probe_classes(spec, out, net_channels, size)
    sized = "num_classes" in kwargs
    if sized and outputs != num_classes:
        raise ModelError(
            f"model factory {spec!r} was asked for num_classes={num_classes} but its model gives {outputs} outputs"
        )
    return Built(out, net_channels, outputs, sized, contract)


def _factory_contract(
    spec: str, factory: Callable[..., Any], net: nn.Module, returned: Mapping[str, Any] | None
) -> InputContract | None:
    for cfg, origin in (
        (returned, f"the config returned by {spec}"),
        (getattr(net, "pretrained_cfg", None), f"the pretrained_cfg of {spec}'s model"),
        (getattr(net, "default_cfg", None), f"the default_cfg of {spec}'s model"),
        (
            {"mean": getattr(factory, "mean", None), "std": getattr(factory, "std", None)},
            f"the mean/std attributes of {spec}",
        ),
    ):
        if isinstance(cfg, Mapping) and cfg.get("mean") is not None and cfg.get("std") is not None:
            size = cfg.get("input_size", cfg.get("size"))
            if isinstance(size, (list, tuple)):
                size = size[-1]
            return InputContract(
                mean=_floats(cfg["mean"]),
                std=_floats(cfg["std"]),
                origin=origin,
                size=int(size) if size else None,
                crop_fraction=cfg.get("crop_pct", cfg.get("crop_fraction")),
                interpolation=cfg.get("interpolation"),
            )
    return None


def _probe_classes(spec: str, net: nn.Module, channels: int, size: int | None) -> int:
    """The class count a net answers with, read from one forward pass (eval mode, no grad)."""
    was_training = net.training
    errors = []
    try:
        net.eval()
        for s in dict.fromkeys(x for x in (size, 32, 28, 64, 224) if x):
            param = next(net.parameters(), None)
            dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
            device = param.device if param is not None else torch.device("cpu")
            try:
                with torch.inference_mode():
                    out = net(torch.zeros(1, channels, s, s, dtype=dtype, device=device))
            except Exception as e:  # a net made for another input size: try the next one
                errors.append(f"{s}x{s}: {type(e).__name__}: {e}")
                continue
            if not isinstance(out, torch.Tensor) and hasattr(out, "logits"):
                out = out.logits
            if not isinstance(out, torch.Tensor) or out.dim() != 2:
                shape = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ModelError(f"model {spec!r} returns {shape} for one image; want logits [B, classes]")
            return int(out.shape[1])
    finally:
        net.train(was_training)
    raise ModelError(f"model {spec!r} fails on a [1,{channels},S,S] input for every S tried ({errors[0]})")


def _from_timm(spec: str, num_classes: int, in_channels: int, size: int | None) -> Built:
    """A timm architecture, randomly initialised (no weights are looked for) for these classes and
    channels, and for views of `size` px where its default input size differs and it takes `img_size`."""
    try:
        import timm
    except ImportError:
        raise ModelError(
            f"{spec!r} needs timm, which is not installed: pip install 'kdlib[timm]' (or pip install timm)"
        ) from None
    name = spec.partition(":")[2]
    if not name or not timm.is_model(name):
        raise ModelError(f"{spec!r}: timm has no model {name!r} (see timm.list_models())")
    kwargs: dict[str, Any] = {"num_classes": num_classes, "in_chans": in_channels}
    default = getattr(timm.get_pretrained_cfg(name), "input_size", None)
    try:
        if size and default and int(default[-1]) != int(size):
            try:
                return Built(
                    timm.create_model(name, pretrained=False, img_size=int(size), **kwargs),
                    in_channels,
                    num_classes,
                    True,
                    build={"img_size": int(size)},
                )
            except TypeError:  # a net that takes any size (a CNN): no img_size to give
                pass
        return Built(timm.create_model(name, pretrained=False, **kwargs), in_channels, num_classes, True, build={})
    except Exception as e:  # a model that needs arguments, another kind of model ...
        raise ModelError(f"{spec!r}: timm cannot build it: {type(e).__name__}: {e}") from e


def build_net(arch: str, num_classes: int, in_channels: int, size: int | None = None) -> Built:
    """The bare net an arch names, built for `num_classes` (a fresh net) or as its factory made it;
    `size`: the view size, for a timm net built for one input size (a ViT's img_size)."""
    if arch.startswith("timm:"):
        return _from_timm(arch, num_classes, in_channels, size)
    if ":" in arch:
        return _from_factory(arch, num_classes, in_channels)
    if arch in _torchvision_names():
        net = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
        return Built(net, 3, num_classes, True)
    m = _RESNET_RE.fullmatch(arch)
    if m:
        depth, width = int(m.group(1)), int(m.group(2) or 1)
        if depth < 8 or (depth - 2) % 6:
            raise ModelError(f"{arch}: depth {depth} is not 6n+2 with n >= 1 (resnet8, 14, 20, 32, 44, 56, 110, ...)")
        if width < 1:
            raise ModelError(f"{arch}: width multiplier must be >= 1")
        return Built(CifarResNet(depth, width, num_classes, in_channels), in_channels, num_classes, True)
    close = difflib.get_close_matches(arch, sorted(_torchvision_names()), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ModelError(f"unknown model {arch!r}. Accepted: {_FORMS}.{hint}")


def build_model(
    arch: str,
    num_classes: int,
    in_channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    weights: str | None = None,
) -> Classifier:
    """A fresh Classifier; ``weights`` is a local state-dict file for the inner net (kdlib's own
    model.safetensors too, whose normalisation then wins over ``mean``/``std``)."""
    if int(num_classes) < 1 or int(in_channels) < 1:
        raise ModelError(f"{arch}: num_classes and in_channels must be >= 1, got {num_classes}, {in_channels}")
    built = build_net(arch, int(num_classes), int(in_channels))
    if built.num_classes != int(num_classes):
        raise ModelError(f"model {arch!r} gives {built.num_classes} outputs but the data has {num_classes} classes")
    contract = built.contract
    if weights is not None:
        contract = load_net_weights(built.net, Path(weights), int(num_classes)) or contract
    if contract is not None:
        mean, std = contract.mean, contract.std
    return Classifier(
        built.net,
        arch=arch,
        num_classes=num_classes,
        in_channels=in_channels,
        mean=mean,
        std=std,
        net_channels=built.net_channels,
        contract=contract,
    )


def _kdlib_state(state: dict[str, torch.Tensor], path: Path) -> tuple[dict[str, torch.Tensor], InputContract | None]:
    """A kdlib Classifier's state (``net.*`` plus its mean/std buffers) -> the net's state and its contract."""
    if not ({"mean", "std"} <= state.keys() and any(k.startswith("net.") for k in state)):
        return state, None
    if "class_index" in state:
        raise ModelError(f"weights file {path} is a class-mapped teacher's; load its run directory instead")
    contract = InputContract(
        state["mean"].flatten().tolist(), state["std"].flatten().tolist(), origin=f"kdlib weights {path}"
    )
    cfg_path = path.parent / CONFIG_NAME  # its run dir's config (data only) may also know the size
    if path.name == WEIGHTS_NAME and cfg_path.is_file():
        try:
            cfg = json.loads(cfg_path.read_text())
        except (OSError, ValueError):
            cfg = {}
        saved = cfg.get("contract") or {} if isinstance(cfg, dict) else {}
        if saved and InputContract.from_dict(saved).same_normalisation(contract):
            contract = InputContract.from_dict(saved, origin=f"kdlib weights {path}")
        size = cfg.get("input_size") if isinstance(cfg, dict) else None
        if contract.size is None and isinstance(size, int) and not isinstance(size, bool) and size > 0:
            contract = contract.replace(size=size)  # the size the run was trained at
    extra = sorted(k for k in state if not k.startswith("net.") and k not in ("mean", "std"))
    if extra:
        raise ModelError(f"weights file {path} mixes a kdlib model's keys with others: {extra[:5]}")
    return {k[len("net.") :]: v for k, v in state.items() if k.startswith("net.")}, contract


def load_net_weights(net: nn.Module, path: Path, num_classes: int) -> InputContract | None:
    """Load a state dict into ``net``; -> the file's contract when it is kdlib's own model.safetensors."""
    state, contract = _kdlib_state(read_state_file(path), path)
    own = net.state_dict()
    problems = []
    for key, t in state.items():
        if key in own and own[key].shape != t.shape:
            want = tuple(own[key].shape)
            if want[:1] == (num_classes,) and t.dim() == len(want) and t.shape[1:] == want[1:]:
                problems.append(
                    f"classifier head {key!r} has shape {tuple(t.shape)} "
                    f"({t.shape[0]} classes) but the model is built for "
                    f"num_classes={num_classes} (shape {want})"
                )
            else:
                problems.append(f"{key!r} has shape {tuple(t.shape)}, model expects {want}")
    if problems:
        raise ModelError(f"weights file {path} does not fit: " + "; ".join(problems))
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelError(f"weights file {path} does not fit the model: {e}") from e
    return contract


def model_id(spec: str) -> str:
    """A readable id for a store's meta: the arch name, or ``run:<abs path>``."""
    path = Path(spec)
    return f"run:{path.resolve()}" if path.is_dir() else str(spec)


def count_params(model: nn.Module) -> int:
    """The number of parameters of `model`."""
    return sum(p.numel() for p in model.parameters())
