"""Run directories: the files a trained model lives in, written and read in one place.

A run dir holds ``model.safetensors`` (the Classifier's state dict) and ``config.json`` (how to
build it again: arch, classes, channels, mean/std, contract, and a ``weights_digest`` of the
weights, checked on load). Writes go to a temp name and are renamed, weights first, so a config
never names weights that are not there. Nothing here imports code: the config is data.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
from torch import nn

from .errors import ModelError
from .weights import digest_state

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "CORE_KEYS", "read_run_config", "load_run_weights", "save_model"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CORE_KEYS = ("arch", "num_classes", "in_channels", "mean", "std")


def read_run_config(path: Path, num_classes: int | None = None, in_channels: int | None = None) -> dict[str, Any]:
    """config.json of the run dir `path`, checked: both files there, the core keys, and the class and
    channel counts a caller asks for (None: any)."""
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
    missing = [k for k in CORE_KEYS if k not in cfg]
    if missing:
        raise ModelError(f"{cfg_path} lacks {', '.join(missing)}")
    for name, given in (("num_classes", num_classes), ("in_channels", in_channels)):
        if given is not None and int(given) != int(cfg[name]):
            raise ModelError(f"{path}: model has {name}={cfg[name]} but {name}={given} was asked for")
    return cfg


def load_run_weights(model: nn.Module, w_path: Path, cfg: Mapping, what: str) -> None:
    """A run dir's model.safetensors into `model`, checked against the digest its config.json recorded."""
    try:
        state = safetensors.torch.load_file(str(w_path))
    except Exception as e:
        raise ModelError(f"cannot read {w_path}: {e}") from e
    if "weights_digest" in cfg and digest_state(state) != cfg["weights_digest"]:
        raise ModelError(f"{w_path}: weights do not match the digest in {CONFIG_NAME} (corrupt file?)")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelError(f"{w_path} does not fit {what}: {e}") from e


def leftover_temps(path: Path) -> list[Path]:
    """The temp files `atomic_write` of `path` left behind in killed processes (`.NAME.tmp-PID`)."""
    found = path.parent.glob(f".{glob.escape(path.name)}.tmp-*")
    return [p for p in found if p.is_file() and p.name.rpartition(".tmp-")[2].isdigit()]


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)`, made durable, then renamed onto `path`: a kill leaves the old file or the new, never part."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:  # durable before it becomes visible under the real name
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_model(model: nn.Module, out_dir: str | Path, extra: dict | None = None) -> None:
    """Write out_dir/model.safetensors and out_dir/config.json (config + extra + weights_digest).

    `model` is a kdlib Classifier (its `config` says how to build it again)."""
    if not isinstance(getattr(model, "config", None), dict):
        raise ModelError(f"save_model needs a kdlib Classifier, got {type(model).__name__}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    config = dict(model.config)
    for key, value in (extra or {}).items():
        if key in config and config[key] != value:
            raise ModelError(f"extra[{key!r}]={value!r} would overwrite the model's own {key}")
        config[key] = value
    config["weights_digest"] = digest_state(state)
    # Weights first: config.json names a digest, so a config next to stale weights is caught on load.
    atomic_write(out_dir / WEIGHTS_NAME, lambda p: safetensors.torch.save_file(state, str(p)))
    atomic_write(out_dir / CONFIG_NAME, lambda p: p.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"))
