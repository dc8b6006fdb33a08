"""Pretrained networks by name: ``torchvision:<model>[:<WEIGHTS_TAG>]`` and ``timm:<model>[.<tag>]``.

Each comes with its input contract (from torchvision's weights enum or timm's ``pretrained_cfg``),
its class count and, where the library knows them, its class names. Weights are read from a file
the user names (``--weights``) or from the local caches those libraries use (torch hub's
``checkpoints/`` folder, the Hugging Face hub cache); nothing is downloaded, and every file is read
as safetensors or with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from torch import nn

from .contract import InputContract
from .errors import ModelError
from .weights import read_state_file

__all__ = ["Pretrained", "is_pretrained_spec", "load_pretrained", "hf_hub_cache", "hf_cached"]

PREFIXES = ("torchvision:", "timm:")
# Builders that torchvision calls with extra arguments when it loads weights (see their *_Weights code).
_TV_WEIGHT_KWARGS = {
    "inception_v3": {"transform_input": True, "aux_logits": True, "init_weights": False},
    "googlenet": {"transform_input": True, "aux_logits": True, "init_weights": False},
}


@dataclasses.dataclass
class Pretrained:
    """A pretrained net with its class count, input contract, class names and weights file."""

    net: nn.Module
    num_classes: int
    contract: InputContract
    class_names: list[list[str]] | None  # per class, the names it answers to (e.g. synset id, description)
    weights_file: str | None
    net_channels: int = 3


def is_pretrained_spec(spec: str) -> bool:
    """Whether `spec` names pretrained weights (`torchvision:...` or `timm:...`)."""
    return str(spec).startswith(PREFIXES)


def load_pretrained(spec: str, weights: str | None = None, load: bool = True) -> Pretrained:
    """The network named by ``spec`` with its weights loaded, its contract and its class names.
    ``load=False``: the bare network only (a run directory brings its own weights)."""
    kind, _, rest = spec.partition(":")
    if not rest:
        raise ModelError(f"{spec!r}: write torchvision:<model>[:<WEIGHTS_TAG>] or timm:<model>[.<tag>]")
    return (_torchvision if kind == "torchvision" else _timm)(spec, rest, weights, load)


def _read(path: Path) -> dict:
    return read_state_file(path)  # one safe reader for every weights file


def _load_into(net: nn.Module, state: dict, spec: str, path: Path) -> None:
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise ModelError(
            f"weights file {path} does not fit {spec}: {first} (is it the weights of another model or tag?)"
        ) from e


def _torchvision(spec: str, rest: str, weights: str | None, load: bool) -> Pretrained:
    import torchvision

    name, _, tag = rest.partition(":")
    tag = tag or "DEFAULT"
    try:
        enum = torchvision.models.get_model_weights(name)
    except (ValueError, KeyError):
        raise ModelError(
            f"{spec!r}: torchvision has no model {name!r} with weights (see torchvision.models.list_models())"
        ) from None
    try:
        w = enum[tag]
    except KeyError:
        tags = ", ".join(m for m in enum.__members__)
        raise ModelError(f"{spec!r}: {enum.__name__} has no tag {tag!r}; tags: {tags}") from None
    meta = w.meta
    categories = list(meta.get("categories") or [])
    num_classes = len(categories) if categories else int(meta.get("num_classes", 1000))
    t = w.transforms()
    if not all(hasattr(t, a) for a in ("mean", "std", "crop_size", "resize_size")):
        raise ModelError(
            f"{spec!r}: {enum.__name__}.{w.name}.transforms() is not an image classification "
            "transform (kdlib distills classifiers)"
        )
    crop, resize = int(t.crop_size[0]), int(t.resize_size[0])
    contract = InputContract(
        mean=t.mean,
        std=t.std,
        origin=f"torchvision {enum.__name__}.{w.name}",
        size=crop,
        crop_fraction=round(crop / resize, 6),
        interpolation=t.interpolation.value,
    )
    kwargs = dict(_TV_WEIGHT_KWARGS.get(name, {}))
    if "min_size" in meta and name.startswith("vit_") and tuple(meta["min_size"]) != (224, 224):
        kwargs["image_size"] = meta["min_size"][0]  # ViT SWAG weights are built for their own size
    net = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    path = None
    if load:
        path = _weights_path(spec, weights, [Path(_torch_hub_dir()) / "checkpoints" / os.path.basename(w.url)])
        _load_into(net, _read(path), spec, path)
    names = [[c] for c in categories] or None
    return Pretrained(net, num_classes, contract, names, None if path is None else str(path))


def _torch_hub_dir() -> str:
    import torch.hub

    return torch.hub.get_dir()


def _weights_path(
    spec: str,
    weights: str | None,
    cached: list[Path],
    looked: str | None = None,
    fill: str = "put the file there (download it where a network exists) or pass --weights FILE",
) -> Path:
    """`--weights FILE`, else the first of the `cached` files that exists; `looked` says where they were
    looked for (the cached paths themselves when not given), `fill` how to put them there."""
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ModelError(f"weights file not found: {path}")
        return path
    for path in cached:
        if path.is_file():
            return path
    raise ModelError(
        f"{spec}: no local weights (looked in {looked or ', '.join(map(str, cached))}); kdlib downloads nothing: {fill}"
    )


_HF_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm reads from a Hugging Face repo, in its order


def hf_hub_cache() -> tuple[Path, str]:
    """The Hugging Face hub cache folder, and how to name it. With huggingface_hub installed it is
    `huggingface_hub.constants.HF_HUB_CACHE`; without it, the same default worked out from the same
    variables (HF_HUB_CACHE, HF_HOME, XDG_CACHE_HOME), and the name says so."""
    try:
        from huggingface_hub import constants
    except ImportError:
        env = os.environ
        home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
        cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
        return Path(cache).expanduser(), "the Hugging Face hub cache's default place (huggingface_hub is not installed)"
    return Path(constants.HF_HUB_CACHE).expanduser(), "the Hugging Face hub cache"


def hf_cached(repo_id: str, filenames: tuple[str, ...] = _HF_FILES) -> tuple[list[Path], str]:
    """Files of the Hugging Face model repo `repo_id` in the standard hub cache layout
    (`<cache>/models--ORG--NAME/snapshots/<revision>/<file>`, the revision `refs/main` names first,
    then any other snapshot, newest first), and a line saying where they were looked for."""
    cache, name = hf_hub_cache()
    folder = cache / ("models--" + repo_id.replace("/", "--"))
    snapshots = folder / "snapshots"
    revisions: list[str] = []
    try:
        revisions.append((folder / "refs" / "main").read_text(encoding="utf-8").strip())
    except OSError:
        pass
    if snapshots.is_dir():
        others = sorted(snapshots.iterdir(), key=lambda d: d.lstat().st_mtime, reverse=True)
        revisions += [d.name for d in others if d.is_dir() and d.name not in revisions]
    revisions = [r for r in revisions if r]
    found = [snapshots / rev / f for rev in revisions for f in filenames]
    state = (
        f"there is no {folder.name} folder"
        if not folder.is_dir()
        else "it holds no snapshot"
        if not revisions
        else f"not in snapshot{'s' if len(revisions) > 1 else ''} {', '.join(revisions[:3])}"
    )
    return found, f"{name}: {snapshots}/<revision>/{' or '.join(filenames)}; {state}"


def _timm(spec: str, name: str, weights: str | None, load: bool) -> Pretrained:
    try:
        import timm
        from timm.data import ImageNetInfo, infer_imagenet_subset
    except ImportError:
        raise ModelError(
            f"{spec!r} needs timm, which is not installed: pip install 'kdlib[timm]' (or pip install timm)"
        ) from None
    if not timm.is_model(name):
        raise ModelError(f"{spec!r}: timm has no model {name!r} (see timm.list_models(pretrained=True))")
    try:
        net = timm.create_model(name, pretrained=False)
    except Exception as e:  # a model that needs arguments, an unknown tag, ...
        raise ModelError(f"{spec!r}: timm cannot build it: {e}") from e
    cfg = dict(getattr(net, "pretrained_cfg", None) or {})
    if "mean" not in cfg or "std" not in cfg:
        raise ModelError(f"{spec!r}: timm's pretrained_cfg has no mean/std; name a tag (e.g. resnet50.a1_in1k)")
    size = cfg.get("input_size") or (3, None, None)
    contract = InputContract(
        mean=cfg["mean"],
        std=cfg["std"],
        origin=f"timm pretrained_cfg of {name}",
        size=int(size[-1]) if size[-1] else None,
        crop_fraction=cfg.get("crop_pct"),
        interpolation=cfg.get("interpolation"),
    )
    cached: list[Path] = []
    fill = "download the weights where a network exists and pass --weights FILE"
    looked = f"nowhere: timm's pretrained_cfg of {name} names no Hugging Face repo"
    if load and weights is None and cfg.get("hf_hub_id"):
        files = (cfg["hf_hub_filename"],) if cfg.get("hf_hub_filename") else _HF_FILES
        cached, looked = hf_cached(cfg["hf_hub_id"], files)
        fill = (
            f"fill that cache where a network exists (huggingface_hub.snapshot_download({cfg['hf_hub_id']!r})) "
            "and copy it here, or pass --weights FILE"
        )
    path = _weights_path(spec, weights, cached, looked, fill) if load else None
    if path is not None:
        _load_into(net, _read(path), spec, path)
    num_classes = int(getattr(net, "num_classes", 0) or cfg.get("num_classes") or 0)
    names = None
    try:
        subset = infer_imagenet_subset(net)
        if subset:
            info = ImageNetInfo(subset)
            names = [[s, d] for s, d in zip(info.label_names(), info.label_descriptions())]
    except Exception:  # class names are a convenience for --class-map; their absence is handled there
        names = None
    if names is not None and len(names) != num_classes:
        names = None
    return Pretrained(
        net, num_classes, contract, names, None if path is None else str(path), net_channels=int(size[0] or 3)
    )
