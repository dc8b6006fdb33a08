"""Teachers and students: building, loading, saving and fingerprinting classifiers.

Every kdlib model is a ``Classifier``: it takes the uint8 views that ``render`` produces
([B, C, H, W]) and returns logits [B, num_classes]. Scaling and normalisation live inside
the model, so precompute, train, verify and eval all feed models the same way.

Architectures (``arch``), tried in this order:

0. ``torchvision:<model>[:<TAG>]`` and ``timm:<model>[.<tag>]`` -- pretrained weights by name, with
   the input contract those weights define (see ``kdlib.pretrained``).
1. ``package.module:factory`` -- any importable factory, called with ``num_classes`` and
   ``in_channels`` when its signature takes them, else with no arguments (the class count is then
   read from the model's output). Only a factory typed by the user is run: a run directory whose
   config names one is refused unless ``trust_code`` (``--trust-code``) is given.
2. a torchvision classification model name (``resnet18``, ``mobilenet_v3_small``, ...).
   torchvision names win over pattern 3, so ``resnet50`` / ``resnet152`` are torchvision's;
   write ``resnet50x1`` for the CIFAR-style net of that depth.
3. ``resnet{6n+2}[x{w}]`` -- CIFAR-style ResNets (He et al. 2016, Sec. 4.2), e.g. resnet20, resnet8x4.

``load_model`` also takes a run directory written by ``save_model``. ``resolve_model`` is what
the commands call: it also settles the input contract (``kdlib.contract``) and the class map
(``kdlib.classmap``).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import importlib
import inspect
import json
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torchvision
from torch import nn

from kdlib.classmap import resolve_class_map
from kdlib.contract import InputContract, check_flags
from kdlib.errors import ModelError
from kdlib.pretrained import is_pretrained_spec, load_pretrained

__all__ = [
    "Classifier",
    "build_model",
    "load_model",
    "resolve_model",
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
                 mean: Sequence[float], std: Sequence[float], net_channels: int,
                 contract: InputContract | None = None, class_index: Sequence[int] | None = None):
        super().__init__()
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
        cfg = {"arch": self.arch, "num_classes": self.num_classes, "in_channels": self.in_channels,
               "mean": [float(v) for v in self.mean.flatten()],
               "std": [float(v) for v in self.std.flatten()], "net_channels": self.net_channels,
               "contract": self.contract.to_dict()}
        if self.class_index is not None:
            cfg["class_index"] = [int(i) for i in self.class_index]
            cfg["net_classes"] = self.net_classes
        return cfg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One input convention: uint8 only, so a [0,1] float can never be divided by 255 twice.
        if x.dtype != torch.uint8:
            raise ModelError(f"{self.arch}: expects uint8 images [B,{self.in_channels},H,W] "
                             f"(scaling is done inside the model), got dtype {x.dtype}")
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


@dataclasses.dataclass
class _Built:
    """A bare net and what building it told us."""

    net: nn.Module
    net_channels: int
    num_classes: int  # the net's outputs
    sized: bool  # built for the data's class count (a fresh net), not a fixed pretrained head
    contract: InputContract | None = None
    class_names: list[list[str]] | None = None


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


def _from_factory(spec: str, num_classes: int, in_channels: int) -> _Built:
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
        needed = [n for n, p in params.items() if p.default is inspect.Parameter.empty and n not in kwargs
                  and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
        if needed:
            raise ModelError(f"model factory {spec!r} needs {', '.join(needed)}; kdlib passes only num_classes "
                             "and in_channels (when the factory takes them): wrap it in a function that does")
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
        raise ModelError(f"model factory {spec!r} was asked for num_classes={num_classes} but its model "
                         f"gives {outputs} outputs")
    return _Built(out, net_channels, outputs, sized, contract)


def _factory_contract(spec: str, factory: Callable[..., Any], net: nn.Module,
                      returned: Mapping[str, Any] | None) -> InputContract | None:
    for cfg, origin in ((returned, f"the config returned by {spec}"),
                        (getattr(net, "pretrained_cfg", None), f"the pretrained_cfg of {spec}'s model"),
                        (getattr(net, "default_cfg", None), f"the default_cfg of {spec}'s model"),
                        ({"mean": getattr(factory, "mean", None), "std": getattr(factory, "std", None)},
                         f"the mean/std attributes of {spec}")):
        if isinstance(cfg, Mapping) and cfg.get("mean") is not None and cfg.get("std") is not None:
            size = cfg.get("input_size", cfg.get("size"))
            if isinstance(size, (list, tuple)):
                size = size[-1]
            return InputContract(mean=_floats(cfg["mean"]), std=_floats(cfg["std"]), origin=origin,
                                 size=int(size) if size else None,
                                 crop_fraction=cfg.get("crop_pct", cfg.get("crop_fraction")),
                                 interpolation=cfg.get("interpolation"))
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


def _resolve(arch: str, num_classes: int, in_channels: int) -> _Built:
    if ":" in arch:
        return _from_factory(arch, num_classes, in_channels)
    if arch in _torchvision_names():
        net = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
        return _Built(net, 3, num_classes, True)
    m = _RESNET_RE.fullmatch(arch)
    if m:
        depth, width = int(m.group(1)), int(m.group(2) or 1)
        if depth < 8 or (depth - 2) % 6:
            raise ModelError(f"{arch}: depth {depth} is not 6n+2 with n >= 1 "
                             "(resnet8, 14, 20, 32, 44, 56, 110, ...)")
        if width < 1:
            raise ModelError(f"{arch}: width multiplier must be >= 1")
        return _Built(CifarResNet(depth, width, num_classes, in_channels), in_channels, num_classes, True)
    close = difflib.get_close_matches(arch, sorted(_torchvision_names()), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ModelError(f"unknown model {arch!r}. Accepted: {_FORMS}.{hint}")


def build_model(arch: str, num_classes: int, in_channels: int, mean: Sequence[float],
                std: Sequence[float], weights: str | None = None) -> Classifier:
    """A fresh Classifier; ``weights`` is a local state-dict file for the inner net (kdlib's own
    model.safetensors too, whose normalisation then wins over ``mean``/``std``)."""
    if int(num_classes) < 1 or int(in_channels) < 1:
        raise ModelError(f"{arch}: num_classes and in_channels must be >= 1, "
                         f"got {num_classes}, {in_channels}")
    built = _resolve(arch, int(num_classes), int(in_channels))
    if built.num_classes != int(num_classes):
        raise ModelError(f"model {arch!r} gives {built.num_classes} outputs but the data has {num_classes} classes")
    contract = built.contract
    if weights is not None:
        contract = _load_net_weights(built.net, Path(weights), int(num_classes)) or contract
    if contract is not None:
        mean, std = contract.mean, contract.std
    return Classifier(built.net, arch=arch, num_classes=num_classes, in_channels=in_channels,
                      mean=mean, std=std, net_channels=built.net_channels, contract=contract)


def _log(line: str) -> None:
    # stderr: eval and verify print JSON on stdout; one process of many says it
    if os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0":
        print(line, file=sys.stderr, flush=True)


def resolve_model(spec: str, *, classes: Sequence[str] | int, in_channels: int, weights: str | None = None,
                  mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                  class_map: str | None = None, data_stats: Callable[[], tuple[list[float], list[float]]] | None = None,
                  trust_code: bool = False, role: str = "teacher") -> Classifier:
    """The model a command names, with its input contract settled and its outputs fitted to the data.

    ``classes``: the data's class names (a teacher may then be mapped onto them, see
    ``kdlib.classmap``) or just their count (the model must answer exactly that many).
    ``data_stats``: the data's (mean, std), used only for a model trained here from scratch.
    The contract's source is printed: ``<role> <spec>: mean [...], std [...] (from ...)``.
    """
    n = classes if isinstance(classes, int) else len(classes)
    if (mean is None) != (std is None) and not (is_pretrained_spec(spec) or Path(spec).is_dir()):
        raise ModelError(f"{spec}: give both --mean and --std (or neither)")
    names: list[list[str]] | None = None
    if Path(spec).is_dir():
        if weights is not None:
            raise ModelError(f"{spec}: --weights cannot be combined with a run directory (it holds its weights)")
        model = _load_run(Path(spec), None, in_channels, trust_code)
        check_flags(model.contract, mean, std, spec)
        names = [[c] for c in model.classes] if getattr(model, "classes", None) else None
        if model.class_index is not None:  # already mapped when it was made: keep that mapping
            names = None
    elif is_pretrained_spec(spec):
        p = load_pretrained(spec, weights)
        check_flags(p.contract, mean, std, spec)
        model = Classifier(p.net, arch=spec, num_classes=p.num_classes, in_channels=in_channels, mean=p.contract.mean,
                           std=p.contract.std, net_channels=p.net_channels, contract=p.contract)
        names = p.class_names
    else:
        if "/" in str(spec) or os.sep in str(spec):
            raise ModelError(f"run directory not found: {spec}")
        built = _resolve(spec, n, int(in_channels))
        contract = built.contract
        if weights is not None:
            contract = _load_net_weights(built.net, Path(weights), built.num_classes) or contract
        if contract is not None:
            check_flags(contract, mean, std, spec)
        elif mean is not None:
            contract = InputContract(mean, std, origin="--mean/--std")
        elif weights is None and built.sized and data_stats is not None:
            m, s = data_stats()
            contract = InputContract(m, s, origin="the data's measured statistics (a model trained from scratch)")
        else:
            why = f"weights {weights}" if weights is not None else "its pretrained head"
            raise ModelError(f"{role} {spec}: the preprocessing its weights expect is unknown ({why} say nothing "
                             "of mean/std); give --mean and --std (e.g. --mean imagenet --std imagenet), or name "
                             "the weights as torchvision:<model>:<TAG> / timm:<model>")
        if contract.size is None and weights is not None and built.contract is not None:
            contract = contract.replace(size=built.contract.size)
        model = Classifier(built.net, arch=spec, num_classes=built.num_classes, in_channels=in_channels,
                           mean=contract.mean, std=contract.std, net_channels=built.net_channels, contract=contract)
    if isinstance(classes, int) or role != "teacher":
        if model.num_classes != n:
            raise ModelError(f"{role} {spec} gives {model.num_classes} outputs but the data has {n} classes")
    elif model.class_index is None:
        index, how = resolve_class_map(list(classes), model.num_classes, names, class_map, spec)
        if index is not None and getattr(model, "head_layers", None):
            raise ModelError(f"{role} {spec} has DIH heads, which answer over its own {model.num_classes} classes: "
                             "it cannot be mapped onto the data's classes (fit the heads on a teacher of the data's "
                             "classes, or drop the heads)")
        if index is not None:
            model.class_index = torch.tensor(index, dtype=torch.int64)
            model.num_classes = len(index)
            _log(f"{role} {spec}: {len(index)} data classes mapped to its {model.net_classes} outputs by {how}")
        elif how.startswith("position") and class_map is None and names is not None:
            _log(f"note: {role} {spec}: classes taken by {how}")
    elif class_map is not None:
        raise ModelError(f"{spec} already carries a class map; drop --class-map")
    _log(f"{role} {spec} input: {model.contract.describe()}")
    return model


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


def _kdlib_state(state: dict[str, torch.Tensor], path: Path) -> tuple[dict[str, torch.Tensor], InputContract | None]:
    """A kdlib Classifier's state (``net.*`` plus its mean/std buffers) -> the net's state and its contract."""
    if not ({"mean", "std"} <= state.keys() and any(k.startswith("net.") for k in state)):
        return state, None
    if "class_index" in state:
        raise ModelError(f"weights file {path} is a class-mapped teacher's; load its run directory instead")
    contract = InputContract(state["mean"].flatten().tolist(), state["std"].flatten().tolist(),
                             origin=f"kdlib weights {path}")
    cfg_path = path.parent / CONFIG_NAME  # its run dir's config (data only) may also know the size
    if path.name == WEIGHTS_NAME and cfg_path.is_file():
        try:
            saved = json.loads(cfg_path.read_text()).get("contract") or {}
        except (OSError, ValueError):
            saved = {}
        if saved and InputContract.from_dict(saved).same_normalisation(contract):
            contract = InputContract.from_dict(saved, origin=f"kdlib weights {path}")
    extra = sorted(k for k in state if not k.startswith("net.") and k not in ("mean", "std"))
    if extra:
        raise ModelError(f"weights file {path} mixes a kdlib model's keys with others: {extra[:5]}")
    return {k[len("net."):]: v for k, v in state.items() if k.startswith("net.")}, contract


def _load_net_weights(net: nn.Module, path: Path, num_classes: int) -> InputContract | None:
    """Load a state dict into ``net``; -> the file's contract when it is kdlib's own model.safetensors."""
    state, contract = _kdlib_state(_read_state_file(path), path)
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
    return contract


# --- run directories --------------------------------------------------------------------------

def load_model(spec: str, num_classes: int | None = None, in_channels: int | None = None,
               mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
               weights: str | None = None, trust_code: bool = False) -> Classifier:
    """A Classifier in eval mode from a run directory or an arch name.

    For a run directory the saved config wins; num_classes / in_channels, when given, must
    agree with it (mean / std are ignored: the model keeps the normalisation it was trained with).
    A run directory of a factory model is refused unless ``trust_code``: a file never names code to run.
    """
    path = Path(spec)
    if path.is_dir():
        if weights is not None:
            raise ModelError(f"{spec}: weights= cannot be combined with a run directory")
        return _load_run(path, num_classes, in_channels, trust_code).eval()
    if os.sep in str(spec) or "/" in str(spec):
        raise ModelError(f"run directory not found: {spec}")
    missing = [n for n, v in [("num_classes", num_classes), ("in_channels", in_channels),
                              ("mean", mean), ("std", std)] if v is None]
    if missing:
        raise ModelError(f"building {spec!r} needs {', '.join(missing)}")
    return build_model(spec, num_classes, in_channels, mean, std, weights).eval()


def _load_run(path: Path, num_classes: int | None, in_channels: int | None, trust_code: bool = False) -> Classifier:
    cfg_path, w_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise ModelError(f"{path} is not a model run directory: {p.name} is missing")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read {cfg_path}: {e}") from e
    if not isinstance(cfg, dict):
        raise ModelError(f"{cfg_path} must hold a JSON object")
    missing = [k for k in _CORE_KEYS[:5] if k not in cfg]
    if missing:
        raise ModelError(f"{cfg_path} lacks {', '.join(missing)}")
    for name, given in (("num_classes", num_classes), ("in_channels", in_channels)):
        if given is not None and int(given) != int(cfg[name]):
            raise ModelError(f"{path}: model has {name}={cfg[name]} but {name}={given} was asked for")
    arch = str(cfg["arch"])
    if ":" in arch and not is_pretrained_spec(arch) and not trust_code:
        # DESIGN invariant 8: code runs only when the user names it on the command line.
        raise ModelError(f"{path}: its {CONFIG_NAME} names the factory {arch!r}, and kdlib never imports code "
                         f"named in a file; type it: --model/--teacher {arch} --weights {w_path} "
                         "(or add --trust-code to run it from the config)")
    if "heads" in cfg:  # a DIH teacher written by `kdlib heads`: the backbone plus classifier heads
        from .heads import load_headed_run

        return load_headed_run(path, cfg)
    origin = f"run dir {path}"
    if isinstance(cfg.get("contract"), dict) and cfg["contract"].get("origin"):
        origin += f" (first from {cfg['contract']['origin']})"
    contract = (InputContract.from_dict(cfg["contract"], origin=origin) if isinstance(cfg.get("contract"), dict)
                else InputContract(cfg["mean"], cfg["std"], origin=origin))
    net_classes = int(cfg.get("net_classes", cfg["num_classes"]))
    if is_pretrained_spec(arch):
        p = load_pretrained(arch, load=False)
        net, net_channels = p.net, p.net_channels
    else:
        built = _resolve(arch, net_classes, int(cfg["in_channels"]))
        net, net_channels = built.net, built.net_channels
    model = Classifier(net, arch=arch, num_classes=net_classes, in_channels=cfg["in_channels"], mean=cfg["mean"],
                       std=cfg["std"], net_channels=net_channels, contract=contract,
                       class_index=cfg.get("class_index"))
    classes = cfg.get("classes")  # the data's class names it was trained on, when the run recorded them
    model.classes = [str(c) for c in classes] if isinstance(classes, list) and len(classes) == model.num_classes \
        else None
    if cfg.get("net_channels", model.net_channels) != model.net_channels:
        raise ModelError(f"{path}: saved net_channels={cfg['net_channels']}, "
                         f"{cfg['arch']} now builds with {model.net_channels}")
    load_run_weights(model, w_path, cfg, str(cfg["arch"]))
    return model


def load_run_weights(model: nn.Module, w_path: Path, cfg: Mapping, what: str) -> None:
    """A run dir's model.safetensors into `model`, checked against the digest its config.json recorded."""
    try:
        state = safetensors.torch.load_file(str(w_path))
    except Exception as e:
        raise ModelError(f"cannot read {w_path}: {e}") from e
    if "weights_digest" in cfg and _digest_state(state) != cfg["weights_digest"]:
        raise ModelError(f"{w_path}: weights do not match the digest in {CONFIG_NAME} (corrupt file?)")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelError(f"{w_path} does not fit {what}: {e}") from e


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
