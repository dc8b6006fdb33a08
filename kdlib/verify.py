"""Verify: re-render stored views, re-run the teacher, and compare with what the store says.

On the machine that wrote the store, agreement must be total and the logit error within the
storage rounding of the store's logit codec, fp16 or q8's 1/32 nat (invariant 3). Views are
whole groups spread evenly over every stored epoch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .contract import check_store_contract, parse_floats
from .errors import StoreMismatchError
from .models import resolve_model, weights_digest
from .plan import PARAM_FIELDS
from .precompute import teacher_logits
from .render import render_views
from .softlabel import Q8_STEPS_PER_NAT, reconstruct
from .store import ChunkCache, open_store, open_store_source

__all__ = ["verify", "FP16_RTOL"]

FP16_RTOL = 2.0**-11  # half an fp16 ulp, relative: the rounding of stored logits
ABS_TOL = 2e-3  # plus float32 differences between two teacher runs (batch composition, kernels)


def verify(shards: str, teacher: str, views: int = 256, weights: str | None = None, data: str | None = None,
           min_agreement: float = 1.0, batch_size: int = 256, mean: str | None = None, std: str | None = None,
           class_map: str | None = None, trust_code: bool = False) -> dict[str, Any]:
    store = open_store(shards)
    meta = store.meta
    if meta.epochs_done == 0:
        raise StoreMismatchError(f"store {shards} has no complete epoch to verify")
    source = open_store_source(store, data)
    # The teacher's contract comes from its weights (or flags), never from the store: a store made
    # with another normalisation must be refused, not silently adopted.
    model = resolve_model(teacher, classes=source.classes, in_channels=source.channels, weights=weights,
                          mean=parse_floats(mean, "--mean"), std=parse_floats(std, "--std"), class_map=class_map,
                          data_stats=source.mean_std, trust_code=trust_code)
    check_store_contract(meta.teacher, model.contract, shards)
    if weights_digest(model) != meta.teacher["digest"]:
        raise StoreMismatchError(f"teacher {teacher} has weights digest {weights_digest(model)[:12]}, the store "
                                 f"{shards} was written by {meta.teacher.get('id')} ({meta.teacher['digest'][:12]})")
    model.eval()
    device = next(model.parameters()).device

    g = meta.group_size
    groups_per_epoch = meta.views_per_epoch // g
    n_groups = min(-(-views // g), groups_per_epoch * meta.epochs_done)
    picks = np.linspace(0, groups_per_epoch * meta.epochs_done - 1, n_groups).round().astype(np.int64)
    cache = ChunkCache(store)
    parts = [cache.views(int(p // groups_per_epoch), int(p % groups_per_epoch) * g, int(p % groups_per_epoch + 1) * g)
             for p in picks]
    cols = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    recipe_size = int(meta.recipe["size"])

    fresh = []
    for a in range(0, len(cols["image"]), batch_size):
        b = min(a + batch_size, len(cols["image"]))
        p = {k: cols[k][a:b] for k in PARAM_FIELDS}
        fresh.append(teacher_logits(model, render_views(p, source.decode, recipe_size, g), device).cpu())
    full = torch.cat(fresh)

    ids = torch.from_numpy(cols["ids"].astype(np.int64))
    stored = torch.from_numpy(cols["logits"]).float()
    lse = torch.from_numpy(cols["lse"])
    agree = (ids[:, 0] == full.argmax(1)).float().mean().item()
    recomputed = full.gather(1, ids)
    err = (stored - recomputed).abs()
    if meta.logit_codec == "q8":  # half a 1/16-nat step, plus the fp16 top-1 log-probability's rounding
        tol = ABS_TOL + 0.5 / Q8_STEPS_PER_NAT + FP16_RTOL * (recomputed - lse[:, None]).abs()
    else:
        tol = ABS_TOL + FP16_RTOL * recomputed.abs()
    within = bool((err <= tol).all())
    lse_err = (lse - torch.logsumexp(full, 1)).abs().max().item()
    rec = reconstruct(ids, torch.from_numpy(cols["logits"]), lse, meta.num_classes)
    kl = F.kl_div(F.log_softmax(rec, 1), F.log_softmax(full, 1), log_target=True, reduction="batchmean").item()
    ok = agree >= min_agreement and within and lse_err <= ABS_TOL + FP16_RTOL * float(lse.abs().max())
    return {"store": shards, "views": int(len(ids)), "epochs": meta.epochs_done, "top1_agreement": round(agree, 6),
            "max_logit_error": float(err.max()), "max_lse_error": lse_err, "mean_kl": kl,
            "logits_within_tolerance": within, "logit_codec": meta.logit_codec, "min_agreement": min_agreement, "ok": bool(ok)}
