"""Teacher extras: what a DIH teacher's heads and AT's attention maps add to each view, on every path.

The stages call one function each, so their own code stays as it is:

- precompute: `prepare_teacher` (taps the attention layers, returns the store meta's `heads` /
  `attention`), then per batch `extra_columns(teacher, meta)`: the heads' soft labels and the
  attention maps of the forward the teacher just ran (hooks, no second forward);
- store readers: `decode_columns` (q8 head logits to floats, stored maps to normalised float32),
  views: `item_columns` (the extra columns of a batch, as tensors);
- train: `cohort_logits` (DIH's ``[B, 1 + k, C]`` cohort, cached or online), `dih_loss_fn`,
  `attention_term` (beta * AT, zero when off);
- verify: `ExtrasCheck` (every head and every map against a fresh teacher run).

Head j (1..k) of the store is the teacher's j-th head (shallow to deep); 0 is the main classifier.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from .attention import LayerTaps, at_loss, attention_map, decode_maps, encode_maps, parse_layers
from .errors import ConfigError
from .losses import dih, mixed_label_targets
from .softlabel import decode_logits, encode, reconstruct, to_codec

__all__ = ["prepare_teacher", "extra_columns", "decode_columns", "item_columns", "cohort_logits", "dih_loss_fn",
           "attention_term", "ExtrasCheck", "DEFAULT_GRID"]

DEFAULT_GRID = 8
_TAPS = "_kdlib_attention_taps"


def _heads_of(model: nn.Module) -> list[str]:
    return list(getattr(model, "head_layers", []) or [])


def _tap(model: nn.Module, layers: list[str]) -> LayerTaps:
    old = getattr(model, _TAPS, None)
    if old is not None:
        old.remove()
    taps = LayerTaps(model, layers)
    object.__setattr__(model, _TAPS, taps)  # a plain attribute, not a submodule or state
    return taps


# -- precompute --------------------------------------------------------------------------------

def prepare_teacher(teacher: nn.Module, attention: str | list[str] | None = None, grid: int = DEFAULT_GRID,
                    codec: str = "fp16") -> dict[str, Any]:
    """Tap the teacher's attention layers; -> the store meta's ``{"heads": [...], "attention": {...} | None}``."""
    layers = parse_layers(attention)
    spec = None
    if layers:
        if isinstance(grid, bool) or not isinstance(grid, int) or not 1 <= grid <= 64:
            raise ConfigError(f"--attention-grid {grid!r}: give an int in [1, 64] (maps of G x G values per view)")
        if codec not in ("fp16", "q8"):
            raise ConfigError(f"--attention-codec {codec!r}: choose fp16 or q8")
        spec = {"layers": _tap(teacher, layers).names, "grid": int(grid), "codec": codec}
    return {"heads": _heads_of(teacher), "attention": spec}


def extra_columns(teacher: nn.Module, meta: Any) -> dict[str, Tensor]:
    """Columns of the teacher's last forward, on its device: `h{j}_*` soft labels per head, `at{l}` maps per layer."""
    out: dict[str, Tensor] = {}
    if meta.heads:
        heads = getattr(teacher, "last_head_logits", [])
        if len(heads) != len(meta.heads):
            raise ConfigError(f"the store holds {len(meta.heads)} DIH heads; this teacher gave {len(heads)}")
        for j, z in enumerate(heads, 1):
            if z.shape[1] != meta.num_classes:
                raise ConfigError(f"DIH head {j} gives {z.shape[1]} classes, the store holds {meta.num_classes}")
            raw = encode(z.float(), meta.k, check=False)  # the writer thread checks the host copy
            labels = to_codec(raw, meta.logit_codec)
            out.update({f"h{j}_{k}": v for k, v in labels.items()})  # the writer copies them to the host
            out[f"_h{j}_logits16"] = raw["logits"]
    if meta.attention:
        maps = teacher_maps(teacher, meta.attention["grid"])
        for i, m in enumerate(maps, 1):
            out[f"at{i}"] = encode_maps(m, meta.attention["codec"])
    return out


def teacher_maps(teacher: nn.Module, grid: int) -> list[Tensor]:
    taps = getattr(teacher, _TAPS, None)
    if taps is None:
        raise ConfigError("the teacher has no attention layers tapped (prepare_teacher was not called)")
    try:
        return [attention_map(a, grid) for a in taps.outputs]
    finally:
        taps.clear()


# -- reading -----------------------------------------------------------------------------------

def decode_columns(out: dict[str, np.ndarray], meta: Any) -> dict[str, np.ndarray]:
    """Head logits as float top-k logits (whatever the codec), maps as normalised float32."""
    for j in range(1, len(meta.heads) + 1):
        if meta.logit_codec != "fp16" and f"h{j}_logits" in out:
            cols = {"logits": out[f"h{j}_logits"], "top": out.pop(f"h{j}_top"), "lse": out[f"h{j}_lse"]}
            out[f"h{j}_logits"] = decode_logits(cols, meta.logit_codec)
    if meta.attention:
        for i in range(1, len(meta.attention["layers"]) + 1):
            if f"at{i}" in out:
                out[f"at{i}"] = decode_maps(torch.from_numpy(np.ascontiguousarray(out[f"at{i}"])),
                                            meta.attention["codec"]).numpy()
    return out


def _is_extra(name: str) -> bool:
    return (name[:1] == "h" and "_" in name and name[1:name.index("_")].isdigit()) or \
        (name[:2] == "at" and name[2:].isdigit())


def item_columns(cols: dict[str, np.ndarray]) -> dict[str, Tensor]:
    """The extra columns of a batch as tensors (ids as int64), for a view batch's item."""
    return {k: torch.from_numpy(a.astype(np.int64) if k.endswith("_ids") else np.array(a))
            for k, a in cols.items() if _is_extra(k)}


# -- train -------------------------------------------------------------------------------------

def cohort_logits(item: dict[str, Any], main: Tensor, num_classes: int, heads: int, teacher: nn.Module | None,
                  device: torch.device) -> Tensor:
    """DIH's cohort ``[B, 1 + k, C]``: `main` then each head, from the store's columns or the online teacher."""
    if teacher is not None:  # online: the heads of the forward that gave `main`
        members = [z.float() for z in getattr(teacher, "last_head_logits", [])]
    else:
        members = [reconstruct(item[f"h{j}_ids"].to(device), item[f"h{j}_logits"].to(device),
                               item[f"h{j}_lse"].to(device), num_classes) for j in range(1, heads + 1)]
    return torch.stack([main.float(), *[m.to(main.device) for m in members]], dim=1)


def check_dih_source(heads: list[str], where: str) -> None:
    if not heads:
        raise ConfigError(f"--loss dih needs a teacher with heads: {where} has none (fit them with `kdlib heads`, "
                          "then precompute from that run dir)")


def dih_loss_fn(alpha: float, temperature: float, num_classes: int, ce_weight: float = 0.0) -> Callable[..., Tensor]:
    """``(student, cohort [B, 1+k, C], item) -> dih(...)`` with the views' (mixed) labels as the CE target."""
    dih(torch.zeros(1, 2), torch.zeros(1, 1, 2), torch.zeros(1, dtype=torch.long), alpha, temperature)  # checks

    def loss(student: Tensor, cohort: Tensor, item: dict[str, Any]) -> Tensor:
        dev = student.device
        target = mixed_label_targets(item["label"].to(dev), item["partner_label"].to(dev), item["lam"].to(dev),
                                     num_classes)
        total = dih(student.float(), cohort, target, alpha, temperature)
        if ce_weight:
            from .losses import soft_cross_entropy

            total = total + ce_weight * soft_cross_entropy(student.float(), target)
        return total

    return loss


def attention_term(cfg: Any, store: Any, teacher: nn.Module | None, student: nn.Module) -> Callable[..., Any]:
    """``(item, device) -> beta * AT`` between the student's tapped layers and the teacher's maps; 0.0 when off.

    Cached: the teacher's maps come from the store (its layers and grid); online: from taps on the
    teacher's layers (`cfg.attention_teacher`, default the student's names) at `cfg.attention_grid`.
    """
    layers = parse_layers(cfg.attention_student)
    if not layers:
        return lambda item, device: 0.0
    beta = float(cfg.attention_weight)
    if not beta >= 0:
        raise ConfigError(f"--attention-weight {cfg.attention_weight!r} must be >= 0")
    if store is not None:
        spec = store.meta.attention
        if not spec:
            raise ConfigError(f"--attention-student needs attention maps in the store {store.url}; precompute with "
                              "--attention LAYER[,...] --attention-grid G")
        if cfg.attention_grid not in (None, spec["grid"]):
            raise ConfigError(f"--attention-grid {cfg.attention_grid}: the store's maps are {spec['grid']}x"
                              f"{spec['grid']}; drop the flag or precompute again")
        grid, n_teacher = spec["grid"], len(spec["layers"])
    elif teacher is not None:
        grid = cfg.attention_grid or DEFAULT_GRID
        n_teacher = len(_tap(teacher, parse_layers(cfg.attention_teacher) or layers).names)
    else:
        raise ConfigError("--attention-student needs teacher maps: give --shards (stored maps) or --teacher")
    if n_teacher != len(layers):
        raise ConfigError(f"--attention-student names {len(layers)} layer(s), the teacher has {n_teacher} "
                          "attention layer(s); pair them one to one")
    taps = LayerTaps(student, layers)

    def term(item: dict[str, Any], device: torch.device) -> Tensor:
        s_maps = [attention_map(a, grid) for a in taps.outputs]
        taps.clear()
        if store is not None:
            t_maps = [item[f"at{i}"].to(device).float() for i in range(1, n_teacher + 1)]
        else:
            t_maps = teacher_maps(teacher, grid)
        return at_loss(s_maps, t_maps, beta)

    return term


# -- verify ------------------------------------------------------------------------------------

class ExtrasCheck:
    """Collects a fresh teacher's heads and maps batch by batch, then compares them with the store."""

    def __init__(self, model: nn.Module, meta: Any) -> None:
        self.meta = meta
        self.model = model
        if meta.heads and _heads_of(model) != list(meta.heads):
            raise ConfigError(f"the store's heads are on {meta.heads}; this teacher's on {_heads_of(model)}")
        if meta.attention:
            _tap(model, meta.attention["layers"])
        self.heads: list[list[Tensor]] = [[] for _ in meta.heads]
        self.maps: list[list[Tensor]] = [[] for _ in (meta.attention or {}).get("layers", [])]

    def add(self) -> None:
        """After each teacher forward."""
        for j, z in enumerate(getattr(self.model, "last_head_logits", [])[:len(self.heads)]):
            self.heads[j].append(z.float().cpu())
        if self.maps:
            for i, m in enumerate(teacher_maps(self.model, self.meta.attention["grid"])):
                self.maps[i].append(m.cpu())

    def report(self, cols: dict[str, np.ndarray], min_agreement: float, abs_tol: float,
               rel_tol: float) -> dict[str, Any]:
        """Per head: top-1 agreement and logit / lse errors within verify's bounds; per map: max error."""
        from .verify import tolerance

        out: dict[str, Any] = {"heads": [], "attention": [], "ok": True}
        for j, parts in enumerate(self.heads, 1):
            full = torch.cat(parts)
            ids = torch.from_numpy(cols[f"h{j}_ids"].astype(np.int64))
            stored = torch.from_numpy(cols[f"h{j}_logits"]).float()
            lse = torch.from_numpy(cols[f"h{j}_lse"]).float()
            recomputed = full.gather(1, ids)
            err = (stored - recomputed).abs()
            lse_err = float((lse - torch.logsumexp(full, 1)).abs().max())
            agree = float((ids[:, 0] == full.argmax(1)).float().mean())
            within = (err <= tolerance(recomputed, lse, self.meta.logit_codec, abs_tol, rel_tol)).all()
            ok = bool(within) and agree >= min_agreement and lse_err <= abs_tol + rel_tol * float(lse.abs().max())
            out["heads"].append({"head": j, "layer": self.meta.heads[j - 1], "top1_agreement": round(agree, 6),
                                 "max_logit_error": float(err.max()), "max_lse_error": lse_err, "ok": ok})
            out["ok"] &= ok
        for i, parts in enumerate(self.maps, 1):
            fresh = torch.cat(parts)
            stored = torch.from_numpy(cols[f"at{i}"]).float()
            err = float((stored - fresh).abs().max())
            bound = 2.0 / 255 if self.meta.attention["codec"] == "q8" else 2e-3  # storage rounding + renormalising
            ok = err <= bound
            out["attention"].append({"map": i, "layer": self.meta.attention["layers"][i - 1], "max_error": err,
                                     "bound": bound, "ok": ok})
            out["ok"] &= ok
        return out

