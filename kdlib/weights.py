"""Weights files and weights identity: one safe reader for every state-dict file, one digest.

Files are read as safetensors, or with ``torch.load(weights_only=True)`` (tensors and plain
containers only: a pickled object is refused, never run). The digest of a state dict is what a
store records as its teacher's identity and what a run dir's config.json checks its weights by.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from .errors import ModelError

__all__ = ["read_state_file", "digest_state", "weights_digest"]


def read_state_file(path: Path) -> dict[str, torch.Tensor]:
    """A plain state dict of tensors from .safetensors or .pt/.pth/.bin (loaded with weights_only=True)."""
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
        raise ModelError(
            f"cannot load weights from {path} (only plain state dicts are accepted, loaded with weights_only=True): {e}"
        ) from e
    for key in ("state_dict", "model"):  # common checkpoint layouts
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"weights file {path} does not hold a state dict of tensors")
    if obj and all(k.startswith("module.") for k in obj):  # saved from DistributedDataParallel
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return dict(obj)


def digest_state(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 of a state dict: names, dtypes, shapes and bytes, in sorted name order."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        # Raw bytes through a uint8 view: works for bf16 (which numpy lacks) and every other dtype.
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def weights_digest(model: nn.Module) -> str:
    """sha256 of the state dict (names, dtypes, shapes, bytes): same weights, same digest."""
    return digest_state(model.state_dict())
