"""From what a user named to a model: the one entry point (`resolve_model`) every command uses.

A name is a run directory (``kdlib.rundir``), a pretrained name (``torchvision:``/``timm:``,
``kdlib.pretrained``), an architecture or a ``package.module:factory`` (``kdlib.models``); a
student named ``timm:<model>`` is timm's architecture built fresh for the data (no weights). The
input contract is settled here (``kdlib.contract``: the weights' own, never guessed for pretrained
weights) and a teacher's outputs are fitted to the data's classes (``kdlib.classmap``). A run
directory whose config names a factory is refused unless ``trust_code``: a file never names code to run.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .classmap import resolve_class_map
from .contract import InputContract, check_flags, parse_floats
from .errors import ModelError
from .headed import load_headed_run
from .models import Classifier, build_model, build_net, load_net_weights
from .pretrained import is_pretrained_spec, load_pretrained
from .rundir import CONFIG_NAME, WEIGHTS_NAME, load_run_weights, read_run_config

__all__ = ["resolve_model", "load_model", "load_student"]


def _log(line: str) -> None:
    # stderr: eval and verify print JSON on stdout; one process of many says it
    if os.environ.get("RANK", "0") == "0" and os.environ.get("LOCAL_RANK", "0") == "0":
        print(line, file=sys.stderr, flush=True)


def resolve_model(
    spec: str,
    *,
    classes: Sequence[str] | int,
    in_channels: int,
    weights: str | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    class_map: str | None = None,
    data_stats: Callable[[], tuple[list[float], list[float]]] | None = None,
    trust_code: bool = False,
    role: str = "teacher",
    size: int | None = None,
) -> Classifier:
    """The model a command names, with its input contract settled and its outputs fitted to the data.

    ``classes``: the data's class names (a teacher may then be mapped onto them, see
    ``kdlib.classmap``) or just their count (the model must answer exactly that many).
    ``data_stats``: the data's (mean, std), used only for a model trained here from scratch.
    The contract's source is printed: ``<role> <spec>: mean [...], std [...] (from ...)``.
    ``size``: the views' size, for a fresh timm student built for one input size (a ViT).
    """
    fresh_timm = role == "student" and str(spec).startswith("timm:")  # an architecture, not pretrained weights
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
    elif is_pretrained_spec(spec) and not fresh_timm:
        p = load_pretrained(spec, weights)
        check_flags(p.contract, mean, std, spec)
        model = Classifier(
            p.net,
            arch=spec,
            num_classes=p.num_classes,
            in_channels=in_channels,
            mean=p.contract.mean,
            std=p.contract.std,
            net_channels=p.net_channels,
            contract=p.contract,
        )
        names = p.class_names
    else:
        if "/" in str(spec) or os.sep in str(spec):
            raise ModelError(f"run directory not found: {spec}")
        built = build_net(spec, n, int(in_channels), size)
        contract = built.contract
        if weights is not None:
            contract = load_net_weights(built.net, Path(weights), built.num_classes) or contract
        if contract is not None:
            check_flags(contract, mean, std, spec)
        elif mean is not None:
            contract = InputContract(mean, std, origin="--mean/--std")
        elif weights is None and built.sized and data_stats is not None:
            m, s = data_stats()
            contract = InputContract(m, s, origin="the data's measured statistics (a model trained from scratch)")
        else:
            # "weights FILE say", "its pretrained head says": the verb agrees with its subject
            why = f"weights {weights} say" if weights is not None else "its pretrained head says"
            raise ModelError(
                f"{role} {spec}: the preprocessing its weights expect is unknown ({why} nothing "
                "of mean/std); give --mean and --std (e.g. --mean imagenet --std imagenet), or name "
                "the weights as torchvision:<model>:<TAG> / timm:<model>"
            )
        if contract.size is None and weights is not None and built.contract is not None:
            contract = contract.replace(size=built.contract.size)
        model = Classifier(
            built.net,
            arch=spec,
            num_classes=built.num_classes,
            in_channels=in_channels,
            mean=contract.mean,
            std=contract.std,
            net_channels=built.net_channels,
            contract=contract,
            build=built.build,
        )
    if isinstance(classes, int) or role != "teacher":
        if model.num_classes != n:
            raise ModelError(f"{role} {spec} gives {model.num_classes} outputs but the data has {n} classes")
    elif model.class_index is None:
        index, how = resolve_class_map(list(classes), model.num_classes, names, class_map, spec)
        if index is not None and getattr(model, "head_layers", None):
            raise ModelError(
                f"{role} {spec} has DIH heads, which answer over its own {model.num_classes} classes: "
                "it cannot be mapped onto the data's classes (fit the heads on a teacher of the data's "
                "classes, or drop the heads)"
            )
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


def load_model(
    spec: str,
    num_classes: int | None = None,
    in_channels: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    weights: str | None = None,
    trust_code: bool = False,
) -> Classifier:
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
    missing = [
        n
        for n, v in [("num_classes", num_classes), ("in_channels", in_channels), ("mean", mean), ("std", std)]
        if v is None
    ]
    if missing:
        raise ModelError(f"building {spec!r} needs {', '.join(missing)}")
    return build_model(spec, num_classes, in_channels, mean, std, weights).eval()


def _load_run(path: Path, num_classes: int | None, in_channels: int | None, trust_code: bool = False) -> Classifier:
    cfg = read_run_config(path, num_classes, in_channels)
    w_path = path / WEIGHTS_NAME
    arch = str(cfg["arch"])
    if ":" in arch and not is_pretrained_spec(arch) and not trust_code:
        # DESIGN invariant 8: code runs only when the user names it on the command line.
        raise ModelError(
            f"{path}: its {CONFIG_NAME} names the factory {arch!r}, and kdlib never imports code "
            f"named in a file; type it: --model/--teacher {arch} --weights {w_path} "
            "(or add --trust-code to run it from the config)"
        )
    if "heads" in cfg:  # a DIH teacher written by `kdlib heads`: the backbone plus classifier heads
        return load_headed_run(path, cfg)
    origin = f"run dir {path}"
    if isinstance(cfg.get("contract"), dict) and cfg["contract"].get("origin"):
        origin += f" (first from {cfg['contract']['origin']})"
    contract = (
        InputContract.from_dict(cfg["contract"], origin=origin)
        if isinstance(cfg.get("contract"), dict)
        else InputContract(cfg["mean"], cfg["std"], origin=origin)
    )
    net_classes = int(cfg.get("net_classes", cfg["num_classes"]))
    if arch.startswith("timm:") and isinstance(cfg.get("build"), dict):  # a timm student trained here
        built = build_net(arch, net_classes, int(cfg["net_channels"]), cfg["build"].get("img_size"))
        net, net_channels = built.net, built.net_channels
    elif is_pretrained_spec(arch):
        p = load_pretrained(arch, load=False)
        net, net_channels = p.net, p.net_channels
    else:
        built = build_net(arch, net_classes, int(cfg["in_channels"]))
        net, net_channels = built.net, built.net_channels
    model = Classifier(
        net,
        arch=arch,
        num_classes=net_classes,
        in_channels=cfg["in_channels"],
        mean=cfg["mean"],
        std=cfg["std"],
        net_channels=net_channels,
        contract=contract,
        class_index=cfg.get("class_index"),
        build=cfg.get("build") if isinstance(cfg.get("build"), dict) else None,
    )
    classes = cfg.get("classes")  # the data's class names it was trained on, when the run recorded them
    model.classes = (
        [str(c) for c in classes] if isinstance(classes, list) and len(classes) == model.num_classes else None
    )
    if cfg.get("net_channels", model.net_channels) != model.net_channels:
        raise ModelError(
            f"{path}: saved net_channels={cfg['net_channels']}, {cfg['arch']} now builds with {model.net_channels}"
        )
    load_run_weights(model, w_path, cfg, str(cfg["arch"]))
    return model


def load_student(
    spec: str,
    source: Any,
    num_classes: int,
    *,
    seed: int = 0,
    weights: str | None = None,
    mean: str | Sequence[float] | None = None,
    std: str | Sequence[float] | None = None,
    trust_code: bool = False,
    size: int | None = None,
) -> Classifier:
    """The student `kdlib train` trains: `spec` built for `num_classes`, `source`'s channels (and the
    views' `size`, where a timm net is built for one), its
    initialisation drawn from `seed` alone (not from whatever was built before), its input contract
    the weights' own, else `mean`/`std`, else the data's statistics (a student trained from scratch)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return resolve_model(
            spec,
            classes=num_classes,
            in_channels=source.channels,
            weights=weights,
            mean=parse_floats(mean, "--mean"),
            std=parse_floats(std, "--std"),
            data_stats=source.mean_std,
            trust_code=trust_code,
            role="student",
            size=size,
        )
