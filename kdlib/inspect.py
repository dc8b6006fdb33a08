"""`kdlib inspect`: what a store holds, what it costs on disk, and what top-k truncation costs.

`inspect_store(url)` returns a JSON-able report; `format_report(report)` renders it as text.
The report reads the store chunk by chunk (never the whole store at once):

- meta: format and version, teacher, source, recipe summary, k, id dtype, chunk layout;
- size: bytes on disk per view, split into view params, soft labels and the full-logit sample;
- `digest`: `Store.content_digest()`, identical for identical content whichever backend or
  world size wrote it;
- label statistics over the stored views: mean tail mass beyond top-k, mean entropy of the
  reconstructed distribution, the teacher's top-1 class histogram;
- `label_kinds`, on the full-logit sample: per kind of target the store can give (top-k: `topk` and FKD's
  `marginal`; a sampled store: `sampled`), bytes per view, mean KL(teacher || target) and the bias of a
  fixed probe student's gradient, at the loss / temperature / gamma asked (`_KindStats`); a sampled
  store's draws are re-drawn from the sample's full logits and must match (`sampled.draws_match`);
- `truncation`, when the store keeps a full-logit sample (`precompute --full-sample`): KL(full ||
  reconstructed) at T = 1, and `losses.target_error` at the loss / temperature / gamma the user
  trains with (the tail is invented, so its error grows with T > 1 or gamma < 1).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np
import torch

from . import losses
from .contract import InputContract
from .errors import ConfigError, CorruptStoreError, ModelError
from .softlabel import marginal_target, reconstruct, sampled_target, tail_mass, target_logits
from .store import open_store
from .store.codecs import (
    SAMPLE,
    active_codecs,
    decode_chunk,
    draw_sampled,
    draw_uniforms,
    sampled_temperature,
)

__all__ = ["inspect_store", "format_report"]

NO_SAMPLE = "no full-logit sample in this store (precompute --full-sample > 0 keeps one)"
_BLOCK_ELEMS = 1 << 22  # rows x classes reconstructed at once (16 MiB of float32)


def _loss_params(loss: str, temperature: float, gamma: float) -> dict[str, float]:
    """The parameters that shape a loss's teacher target (DIST's `gamma` is a term weight, not a target setting)."""
    if loss not in losses.LOSSES:
        raise ConfigError(f"unknown loss {loss!r}; valid losses: {', '.join(sorted(losses.LOSSES))}")
    params = losses.loss_settings(loss, _Setting(temperature, gamma))
    losses.get_loss(loss, **params)  # checks the values (positive, finite) before any reading
    return params


class _Setting:
    """The train-config fields inspect measures a target at (`losses.loss_settings` reads them)."""

    def __init__(self, temperature: float, gamma: float) -> None:
        self.temperature, self.gamma = temperature, gamma


class _LabelStats:
    """Running sums over soft labels: tail mass, entropy and top-1 probability of the reconstruction, top-1 counts."""

    def __init__(self, num_classes: int) -> None:
        self.c = num_classes
        self.n = 0
        self.tail_sum = 0.0
        self.tail_max = 0.0
        self.entropy_sum = 0.0
        self.top1_prob_sum = 0.0
        self.counts = np.zeros(num_classes, np.int64)

    def add(self, ids: np.ndarray, logits: np.ndarray, lse: np.ndarray) -> None:
        n = len(lse)
        if n == 0:
            return
        ids_t = torch.from_numpy(ids.astype(np.int64))
        logits_t = torch.from_numpy(np.ascontiguousarray(logits))
        lse_t = torch.from_numpy(np.ascontiguousarray(lse))
        tm = tail_mass(logits_t, lse_t).double()
        self.tail_sum += float(tm.sum())
        self.tail_max = max(self.tail_max, float(tm.max()))
        block = max(1, _BLOCK_ELEMS // self.c)
        for a in range(0, n, block):
            dense = reconstruct(ids_t[a : a + block], logits_t[a : a + block], lse_t[a : a + block], self.c)
            log_p = torch.log_softmax(dense, dim=-1)
            p = log_p.exp()
            self.entropy_sum += float(-(p * log_p).sum(-1).double().sum())
            self.top1_prob_sum += float(p.max(-1).values.double().sum())
        self.counts += np.bincount(ids[:, 0].astype(np.int64), minlength=self.c)[: self.c]
        self.n += n

    def summary(self, classes: list[str] | None) -> dict[str, Any]:
        n = max(self.n, 1)
        return {
            "views": self.n,
            "tail_mass_mean": self.tail_sum / n if self.n else None,
            "tail_mass_max": self.tail_max if self.n else None,
            "entropy_mean": self.entropy_sum / n if self.n else None,
            "top1_prob_mean": self.top1_prob_sum / n if self.n else None,
            "top1_histogram": {"counts": self.counts.tolist(), "classes": classes},
        }


class _ErrorStats:
    """Row-weighted means and maxima of `losses.target_error` over chunks."""

    def __init__(self) -> None:
        self.n = 0
        self.sums = {"kl_mean": 0.0, "kl_mean_scaled": 0.0}
        self.maxes = {"kl_max": 0.0, "max_abs_prob_error": 0.0}
        self.head: dict[str, Any] = {}

    def add(self, result: dict[str, Any], rows: int) -> None:
        self.head = {"loss": result["loss"], "params": result["params"]}
        for key in self.sums:
            self.sums[key] += result[key] * rows
        for key in self.maxes:
            self.maxes[key] = max(self.maxes[key], result[key])
        self.n += rows

    def summary(self) -> dict[str, Any]:
        n = max(self.n, 1)
        return {**self.head, **{k: v / n for k, v in self.sums.items()}, **self.maxes}


def _classes(meta_source: dict[str, Any], num_classes: int) -> list[str] | None:
    classes = meta_source.get("classes")
    if isinstance(classes, list) and len(classes) == num_classes:
        return [str(c) for c in classes]
    return None


_PAIRS = 5  # class-map pairs shown


def _teacher_summary(teacher: dict[str, Any], classes: list[str] | None) -> dict[str, Any]:
    """What the store says of its teacher besides its identity: its output count, its input contract,
    and how the data's classes map onto its outputs (a mapped teacher answers over the mapped outputs
    only, so its soft labels, top-k and lse are renormalised over those)."""
    cfg = teacher.get("config") if isinstance(teacher.get("config"), dict) else {}
    index = cfg.get("class_index")
    net_classes = cfg.get("net_classes", cfg.get("num_classes"))
    contract = teacher.get("contract") if isinstance(teacher.get("contract"), dict) else None
    if contract is not None:
        try:
            contract = {**contract, "text": InputContract.from_dict(contract).describe()}
        except (KeyError, TypeError, ModelError):  # a hand-edited meta.json: show what is there, as it is
            contract = {**contract, "text": None}
    class_map = None
    if isinstance(index, list) and index:
        names = classes or [None] * len(index)
        class_map = {
            "data_classes": len(index),
            "teacher_outputs": net_classes,
            "pairs": [{"data": i, "name": n, "teacher": int(t)} for i, (n, t) in enumerate(zip(names, index))],
            "soft_labels": f"renormalised over the {len(index)} mapped outputs (the teacher answers over "
            f"those only: its top-k and lse are over them, not over its {net_classes} outputs)",
        }
    return {"teacher_net_classes": net_classes, "teacher_contract": contract, "class_map": class_map}


def _recipe_summary(r: dict[str, Any]) -> dict[str, Any]:
    m, c = r.get("images_per_group", 1), r.get("crops_per_image", 1)
    crop = r.get("crop")
    tf_law = f", min_object_covered {r.get('min_object_covered')}" if crop == "inception_tf" else ""
    crop_text = (
        f"{crop} (scale {r.get('scale')}, ratio {[round(x, 3) for x in r.get('ratio', [])]}{tf_law})"
        if crop in ("inception", "inception_tf")
        else f"{crop} (fraction {r.get('center_fraction')})"
    )
    mix = r.get("mix", "none")
    mix_text = (
        "none"
        if mix == "none"
        else (
            f"{mix} (p={r.get('mix_prob')}, lambda {r.get('lam')}"
            f"{'' if r.get('lam') == 'uniform' else ', alpha=' + str(r.get('alpha'))}"
            f"{', one draw per group' if r.get('mix_share', 'view') == 'group' else ''}"
            f"{', partner ' + r['partner'] if r.get('partner', 'next') != 'next' else ''})"
        )
    )
    return {
        "name": r.get("name"),
        "size": r.get("size"),
        "crop": crop,
        "scale": r.get("scale"),
        "ratio": r.get("ratio"),
        "center_fraction": r.get("center_fraction"),
        "min_object_covered": r.get("min_object_covered"),
        "flip": r.get("flip"),
        "mix": mix,
        "mix_prob": r.get("mix_prob"),
        "lam": r.get("lam"),
        "alpha": r.get("alpha"),
        "mix_share": r.get("mix_share", "view"),
        "partner": r.get("partner", "next"),
        "group": [m, c],
        "seed": r.get("seed"),
        "summary": f"{r.get('size')}px, crop {crop_text}, flip {'on' if r.get('flip') else 'off'}, mix {mix_text}, "
        f"groups of {m} images x {c} crop{'s' if c != 1 else ''}, seed {r.get('seed')}",
    }


# -- label kinds: what each target costs and how far it is from the full teacher (issue 21) --------
PROBE_SEED = 0  # the fixed probe student: logits ~ N(0, 1) from torch.Generator().manual_seed(PROBE_SEED)


class _KindStats:
    """One label kind on the full-logit sample: KL(teacher || target) at the loss's setting, and the gradient
    of the loss in a fixed probe student's logits with the stored target minus with the full teacher.

    `grad_bias`: the norm of the mean difference over views, classes aligned by the teacher's rank in each view
    (so a systematic error, e.g. top-k's flattened tail, adds up, and zero-mean noise averages out), relative
    to the mean norm of the full teacher's gradient; `grad_error`: the mean norm of the per-view difference,
    same units (bias and noise together)."""

    def __init__(self, kind: str, num_classes: int) -> None:
        self.kind, self.n, self.inf = kind, 0, 0
        self.kl_sum, self.full_norm, self.err_norm = 0.0, 0.0, 0.0
        self.by_rank = torch.zeros(num_classes, dtype=torch.float64)
        self.by_rank_sq = torch.zeros(num_classes, dtype=torch.float64)

    def add(
        self, log_full: torch.Tensor, log_stored: torch.Tensor, g_full: torch.Tensor, g_stored: torch.Tensor
    ) -> None:
        p = log_full.exp()
        rows = torch.where(p > 0, p * (log_full - log_stored), torch.zeros_like(p)).sum(-1)
        finite = torch.isfinite(rows)
        self.kl_sum += float(rows[finite].double().sum())
        self.inf += int((~finite).sum())
        order = log_full.argsort(-1, descending=True)
        d = (g_stored - g_full).double()
        ranked = d.gather(1, order)
        self.by_rank += ranked.sum(0)
        self.by_rank_sq += (ranked * ranked).sum(0)
        self.full_norm += float(g_full.double().norm(dim=-1).sum())
        self.err_norm += float(d.norm(dim=-1).sum())
        self.n += len(rows)

    def summary(self) -> dict[str, Any]:
        n = max(self.n, 1)
        scale = self.full_norm / n or 1.0
        mean = self.by_rank / n
        stderr = float(((self.by_rank_sq / n - mean * mean).clamp_min(0) / n).sum().sqrt()) / scale
        return {
            "kind": self.kind,
            "sample_views": self.n,
            "kl_mean": None if self.inf or not self.n else self.kl_sum / n,
            "kl_infinite_share": self.inf / n if self.n else None,
            "grad_bias": float(mean.norm()) / scale if self.n else None,
            "grad_bias_stderr": stderr if self.n else None,  # what zero-mean noise alone leaves in grad_bias
            "grad_error": self.err_norm / n / scale if self.n else None,
        }


def _target_temperature(loss: str, params: dict[str, float]) -> float:
    return 1.0 / params["gamma"] if loss in ("ttm", "wttm") else params["temperature"]


def _grads(loss_fn: Any, probe: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per-view gradient of the (batch-mean) loss in the probe student's logits."""
    s = probe.clone().requires_grad_(True)
    (loss_fn(s, teacher) * len(s)).backward()
    return s.grad


def _kind_rows(cols: dict[str, np.ndarray], s: int, meta: Any, loss: str, params: dict[str, float]) -> dict[str, Any]:
    """For the sample rows of one chunk: each kind's (log target, gradient) and the full teacher's."""
    full = torch.from_numpy(np.ascontiguousarray(cols["full"])).float()
    ids = torch.from_numpy(cols["ids"][:s].astype(np.int64))
    logits = torch.from_numpy(np.ascontiguousarray(cols["logits"][:s])).float()
    lse = torch.from_numpy(np.ascontiguousarray(cols["lse"][:s])).float()
    fn = losses.get_loss(loss, **params)
    probe = torch.randn(full.shape, generator=torch.Generator().manual_seed(PROBE_SEED))
    t = _target_temperature(loss, params)
    log_of = lambda v: torch.log_softmax(v.float() / t, -1)  # noqa: E731  the loss's teacher distribution
    out = {"full": (log_of(full), _grads(fn, probe, full))}
    proposal = sampled_temperature(meta)
    if proposal is None:
        recon = reconstruct(ids, logits, lse, meta.num_classes)
        y = marginal_target(ids, logits, lse, meta.num_classes)
        out["topk"] = (log_of(recon), _grads(fn, probe, recon))
        out["marginal"] = (torch.log(y), _grads(fn, probe, target_logits(y, t)))  # a fixed distribution
    else:
        counts = torch.from_numpy(cols["counts"][:s].astype(np.int64))
        y = sampled_target(ids, counts, logits, meta.num_classes, proposal, t)
        out["sampled"] = (torch.log(y), _grads(fn, probe, target_logits(y, t)))  # log 0 = -inf: KL is infinite
    return out


def _check_draws(cols: dict[str, np.ndarray], s: int, meta: Any, epoch: int, chunk: int) -> int:
    """Sample rows whose stored draws `draw_sampled` reproduces from the stored full logits."""
    start = chunk * meta.chunk_views
    u = draw_uniforms(int(meta.recipe["seed"]), epoch, start, s, meta.k)
    drawn = draw_sampled(np.ascontiguousarray(cols["full"]), u, sampled_temperature(meta))
    same = (drawn["ids"] == cols["ids"][:s].astype(np.int64)) & (drawn["counts"] == cols["counts"][:s].astype(np.int64))
    return int(same.all(1).sum())


def _raw_bytes(fields: dict[str, tuple[str, tuple[int, ...]]]) -> int:
    return sum(np.dtype(dt).itemsize * int(np.prod(shape)) for dt, shape in fields.values())


def inspect_store(
    url: str, temperature: float = 1.0, loss: str = "kl", gamma: float = 0.5, max_chunks: int | None = None
) -> dict:
    """A JSON-able report on the store at `url` (see the module docstring).

    Label statistics and the truncation measurement read every chunk of every done epoch, or the
    first `max_chunks` chunks of each when given; `digest` always covers the whole store.
    `loss` / `temperature` / `gamma` choose the setting at which `truncation.target_error` is
    measured (`temperature` for kl and dist, `gamma` for ttm and wttm).
    """
    params = _loss_params(loss, temperature, gamma)
    if max_chunks is not None and (isinstance(max_chunks, bool) or not isinstance(max_chunks, int) or max_chunks < 1):
        raise ConfigError(f"max_chunks must be a positive int or None, got {max_chunks!r}")
    store = open_store(str(url))
    meta = store.meta
    notes: list[str] = []

    # -- layout and size ------------------------------------------------------------------
    total_views = meta.views_per_epoch * meta.epochs_done
    partial = None
    done = store.committed_chunks(meta.epochs_done)  # chunks of the first epoch that is not done
    if done:
        partial = {"epoch": meta.epochs_done, "committed_chunks": len(done), "of": meta.chunks_per_epoch}
        notes.append(
            f"epoch {meta.epochs_done} is partly written ({len(done)} of {meta.chunks_per_epoch} "
            f"chunks committed; rerun precompute to finish it); its bytes count in bytes_on_disk "
            f"but not its views"
        )
    if meta.epochs_done == 0:
        notes.append("no epoch is complete yet: nothing to measure (run or finish `kdlib precompute`)")
    on_disk = {k: int(v) for k, v in sorted(store.bytes_on_disk().items())}
    # bytes per column family, as the codecs define the families (params, labels, heads, attention, extra kinds)
    kinds = {
        codec.name: sum(on_disk.get(name, 0) for name in codec.fields(meta))
        for codec in [*active_codecs(meta), *([SAMPLE] if SAMPLE.active(meta) else [])]
    }
    label_kind = "labels" if "labels" in kinds else "sampled"
    groups = {
        "params": kinds["params"],
        "labels": kinds[label_kind],
        "sample": kinds.get("sample", 0),
        "total": sum(on_disk.values()),
    }
    per_view = {k: (v / total_views if total_views else None) for k, v in groups.items()}

    classes = _classes(meta.source, meta.num_classes)
    report: dict[str, Any] = {
        "url": store.url,
        "format": meta.backend,
        "version": meta.format_version,
        "kdlib_version": meta.kdlib_version,
        "teacher": {
            "id": meta.teacher.get("id"),
            "arch": meta.teacher.get("arch"),
            "digest": meta.teacher.get("digest"),
            "precision": meta.precision,
        },
        **_teacher_summary(meta.teacher, classes),  # outputs, input contract, class map
        "rendered": {k: meta.rendered[k] for k in ("device", "decoder", "renderer")},
        "source": {
            "name": meta.source.get("name"),
            "data": meta.source.get("data"),
            "limit": meta.source.get("limit"),
            "images": meta.source.get("num_images"),
            "fingerprint": meta.source.get("fingerprint"),
        },
        "recipe": _recipe_summary(meta.recipe),
        "num_classes": meta.num_classes,
        "k": meta.k,
        "id_dtype": meta.id_dtype,
        "epochs": meta.epochs_done,
        "views": {"per_epoch": meta.views_per_epoch, "total": total_views, "group_size": meta.group_size},
        "chunks": {
            "chunk_views": meta.chunk_views,
            "chunks_per_epoch": meta.chunks_per_epoch,
            "sample_views_per_chunk": meta.sample_views,
            "partial_epoch": partial,
        },
        "bytes_on_disk": {"columns": on_disk, **groups},
        "bytes_per_view": per_view,
        "bytes_per_view_by_kind": {k: (v / total_views if total_views else None) for k, v in kinds.items()},
        "dense_fp16_bytes_per_view": 2 * meta.num_classes,
        "digest": None,  # filled by the one pass over the chunks below
    }

    # -- digest, label statistics and truncation: one read of each chunk -----------------
    per_epoch = meta.chunks_per_epoch if max_chunks is None else min(max_chunks, meta.chunks_per_epoch)
    stats = _LabelStats(meta.num_classes)
    trunc, target = _ErrorStats(), _ErrorStats()
    digest = hashlib.sha256()
    extras = _ExtrasStats(meta)
    proposal = sampled_temperature(meta)
    kind_stats = {
        k: _KindStats(k, meta.num_classes) for k in (["topk", "marginal"] if proposal is None else ["sampled"])
    }
    draws = {"checked": 0, "match": 0}
    for epoch in range(meta.epochs_done):
        for chunk in range(meta.chunks_per_epoch):
            raw = store.read_chunk(epoch, chunk)
            store.digest_update(digest, raw)
            if chunk >= per_epoch:
                continue
            try:
                cols = decode_chunk(raw, meta)
            except CorruptStoreError as exc:  # the codecs' checks know the values, not where they are
                raise CorruptStoreError(f"store {store.url} epoch {epoch} chunk {chunk}: {exc}") from None
            stats.add(cols["ids"], cols["logits"], cols["lse"])
            extras.add(cols)
            full = cols.get("full")
            if full is None or len(full) == 0:
                continue
            s = len(full)  # the sample rows are the chunk's first views
            full_t = torch.from_numpy(np.ascontiguousarray(full)).float()
            recon = reconstruct(
                torch.from_numpy(cols["ids"][:s].astype(np.int64)),
                torch.from_numpy(np.ascontiguousarray(cols["logits"][:s])),
                torch.from_numpy(np.ascontiguousarray(cols["lse"][:s])),
                meta.num_classes,
            )
            trunc.add(losses.target_error(full_t, recon, "kl", temperature=1.0), s)
            target.add(losses.target_error(full_t, recon, loss, **params), s)
            if proposal is None or loss in losses.SAMPLED_LOSSES:
                rows = _kind_rows(cols, s, meta, loss, params)
                for k, st in kind_stats.items():
                    st.add(rows["full"][0], rows[k][0], rows["full"][1], rows[k][1])
            if proposal is not None:
                draws["checked"] += s
                draws["match"] += _check_draws(cols, s, meta, epoch, chunk)
    report["digest"] = digest.hexdigest()
    report.update(extras.summary(on_disk, total_views))  # per DIH head and per attention map (issue 13)
    report["labels"] = {
        **stats.summary(classes),
        "epochs": meta.epochs_done,
        "chunks_per_epoch_read": per_epoch,
        "complete": per_epoch == meta.chunks_per_epoch,
    }
    label_bytes = per_view["labels"]
    raw = _raw_bytes(next(c for c in active_codecs(meta) if c.name == label_kind).fields(meta))  # uncompressed
    report["label_kinds"] = [
        {**st.summary(), "bytes_per_view": label_bytes, "raw_bytes_per_view": raw} for st in kind_stats.values()
    ]
    report["sampled"] = (
        None
        if proposal is None
        else {
            "samples": meta.k,
            "temperature": proposal,
            "draws_checked": draws["checked"],
            "draws_match": draws["match"],
        }
    )
    if proposal is not None and loss not in losses.SAMPLED_LOSSES:
        notes.append(f"sampled labels serve {losses.SAMPLED_LOSSES}, not {loss}: label kinds not measured")
    if proposal is not None and draws["match"] != draws["checked"]:
        notes.append(
            f"{draws['checked'] - draws['match']} of {draws['checked']} sample views hold draws that their "
            "full logits do not reproduce: the sampled labels are corrupt, or were not written by this kdlib"
        )
    if proposal is not None:
        report["truncation"] = None  # the S stored ids are draws, not a top-k: see label_kinds
    elif meta.sample_views == 0:
        report["truncation"] = None
        notes.append(NO_SAMPLE)
    elif trunc.n == 0:  # no done epoch yet
        report["truncation"] = None
    else:
        t1 = trunc.summary()
        report["truncation"] = {
            "sample_views": trunc.n,
            "kl_mean": t1["kl_mean"],
            "kl_max": t1["kl_max"],
            "max_abs_prob_error": t1["max_abs_prob_error"],
            "target_error": target.summary(),
        }
    if meta.k == meta.num_classes:
        notes.append(
            f"k = {meta.k} = classes: the soft labels hold every logit (fp16); the tail mass is fp16 rounding only"
        )

    # -- teacher predictions on the test split --------------------------------------------
    test = store.read_test()
    test = decode_chunk(test, meta) if test is not None else None
    if test is None:
        report["test"] = None
    else:
        ts = _LabelStats(meta.num_classes)
        ts.add(test["ids"], test["logits"], test["lse"])
        src = (meta.test or {}).get("source", {})
        report["test"] = {
            "source": {
                "name": src.get("name"),
                "split": src.get("split"),
                "images": src.get("num_images"),
                "fingerprint": src.get("fingerprint"),
            },
            **ts.summary(classes),
        }
    report["notes"] = notes
    return report


# -- DIH heads and attention maps (format v2, issue 13) ---------------------------------------
class _ExtrasStats:
    """Per head: label statistics and top-1 agreement with the main classifier; per map: its mass spread."""

    def __init__(self, meta: Any) -> None:
        self.meta = meta
        self.heads = [_LabelStats(meta.num_classes) for _ in meta.heads]
        self.agree = [0] * len(meta.heads)
        n_maps = len((meta.attention or {}).get("layers", []))
        self.map_peak = [0.0] * n_maps  # running sum of each map's largest value (1/sqrt(G*G): flat, 1: one cell)
        self.n = 0

    def add(self, cols: dict[str, np.ndarray]) -> None:
        for j, st in enumerate(self.heads, 1):
            st.add(cols[f"h{j}_ids"], cols[f"h{j}_logits"], cols[f"h{j}_lse"])
            self.agree[j - 1] += int((cols[f"h{j}_ids"][:, 0] == cols["ids"][:, 0]).sum())
        for i in range(len(self.map_peak)):
            self.map_peak[i] += float(np.asarray(cols[f"at{i + 1}"], np.float64).max(1).sum())
        self.n += len(cols["lse"])

    def summary(self, on_disk: dict[str, int], total_views: int) -> dict[str, Any]:
        def per_view(prefix: str) -> float | None:
            b = sum(
                v
                for k, v in on_disk.items()
                if k.startswith(prefix) and (k[len(prefix) : len(prefix) + 1] in ("_", ""))
            )
            return b / total_views if total_views else None

        n = max(self.n, 1)
        heads = []
        for j, (layer, st) in enumerate(zip(self.meta.heads, self.heads), 1):
            s = st.summary(None)
            heads.append(
                {
                    "head": j,
                    "layer": layer,
                    "bytes_per_view": per_view(f"h{j}"),
                    "tail_mass_mean": s["tail_mass_mean"],
                    "tail_mass_max": s["tail_mass_max"],
                    "entropy_mean": s["entropy_mean"],
                    "top1_prob_mean": s["top1_prob_mean"],
                    "top1_agreement_with_main": self.agree[j - 1] / n if self.n else None,
                }
            )
        att = self.meta.attention
        maps = (
            []
            if not att
            else [
                {
                    "map": i,
                    "layer": layer,
                    "grid": att["grid"],
                    "codec": att["codec"],
                    "bytes_per_view": per_view(f"at{i}"),
                    "peak_mean": self.map_peak[i - 1] / n if self.n else None,
                }
                for i, layer in enumerate(att["layers"], 1)
            ]
        )
        return {"heads": heads, "attention": maps}


def _kinds_text(r: dict) -> list[str]:
    kinds = [k for k in r.get("label_kinds", []) if k["sample_views"]]
    sm = r.get("sampled")
    out: list[str] = []
    if sm:
        out += _section(
            "sampled labels",
            [
                ("draws", f"S = {sm['samples']} per view from softmax(logits / {sm['temperature']:g})"),
                ("re-drawn", f"{sm['draws_match']} of {sm['draws_checked']} sample views reproduce their draws"),
            ],
        )
    if kinds:
        out += _section(
            f"label kinds on the full-logit sample ({kinds[0]['sample_views']} views; gradient of a probe student)",
            [
                (
                    k["kind"],
                    f"{_f(k['bytes_per_view'], '.2f')} B/view ({k['raw_bytes_per_view']} raw), KL(teacher||target) "
                    + (
                        _f(k["kl_mean"])
                        if k["kl_mean"] is not None
                        else f"inf on {_f(k['kl_infinite_share'], '.0%')} of views (no mass off the draws)"
                    )
                    + f", gradient bias {_f(k['grad_bias'])} (noise alone: {_f(k['grad_bias_stderr'])}),"
                    f" gradient error {_f(k['grad_error'])}",
                )
                for k in kinds
            ],
        )
    return out


def _extras_text(r: dict) -> list[str]:
    out: list[str] = []
    if r.get("heads"):
        out += _section(
            f"DIH heads ({len(r['heads'])}, one label set each, k = {r['k']})",
            [
                (
                    f"head {h['head']} {h['layer']}",
                    f"{_f(h['bytes_per_view'], '.2f')} B/view, tail mass mean "
                    f"{_f(h['tail_mass_mean'])} (max {_f(h['tail_mass_max'])}), entropy "
                    f"{_f(h['entropy_mean'])}, top-1 = main's on {_f(h['top1_agreement_with_main'])}",
                )
                for h in r["heads"]
            ],
        )
    if r.get("attention"):
        out += _section(
            "attention maps",
            [
                (
                    f"map {m['map']} {m['layer']}",
                    f"{_f(m['bytes_per_view'], '.2f')} B/view ({m['grid']}x{m['grid']} "
                    f"{m['codec']}), mean peak {_f(m['peak_mean'])}",
                )
                for m in r["attention"]
            ],
        )
    return out


# -- text -----------------------------------------------------------------------------------
def _f(x: Any, spec: str = ".4g") -> str:
    return "-" if x is None else format(x, spec)


def _section(title: str, rows: list[tuple[str, str]]) -> list[str]:
    width = max((len(k) for k, _ in rows), default=0)
    return [title] + [f"  {k.ljust(width)}  {v}" for k, v in rows] + [""]


def _histogram(hist: dict[str, Any], total: int, top: int = 20) -> list[str]:
    counts = hist["counts"]
    classes = hist.get("classes")
    order = sorted(range(len(counts)), key=lambda i: (-counts[i], i))
    shown = order if len(counts) <= top else order[:top]
    names = [f"{i}" + (f" {classes[i]}" if classes else "") for i in shown]
    width = max((len(n) for n in names), default=0)
    biggest = max(counts, default=0) or 1
    lines = []
    for i, name in zip(shown, names):
        frac = counts[i] / total if total else 0.0
        lines.append(
            f"  {name.ljust(width)}  {counts[i]:>9d}  {100 * frac:5.1f}%  {'#' * round(30 * counts[i] / biggest)}".rstrip()
        )
    if len(shown) < len(counts):
        never = sum(1 for c in counts if c == 0)
        lines.append(f"  ... {len(counts) - len(shown)} more classes ({never} never top-1)")
    return lines


def _teacher_text(r: dict[str, Any]) -> list[tuple[str, str]]:
    """Rows on the teacher's outputs, input contract and class map (stores of older kdlibs may lack them)."""
    rows = []
    if r.get("teacher_net_classes") is not None:
        rows.append(("outputs", f"{r['teacher_net_classes']} (the data has {r['num_classes']} classes)"))
    contract = r.get("teacher_contract")
    if contract:
        rows.append(("input contract", contract.get("text") or str(contract)))
    cm = r.get("class_map")
    if cm:
        pairs = ", ".join(
            f"{p['data']}{'' if p['name'] is None else ' ' + repr(p['name'])} -> {p['teacher']}"
            for p in cm["pairs"][:_PAIRS]
        )
        more = f", ... ({len(cm['pairs'])} in all)" if len(cm["pairs"]) > _PAIRS else ""
        rows.append(
            (
                "class map",
                f"{cm['data_classes']} data classes -> {cm['data_classes']} of its {cm['teacher_outputs']} "
                f"outputs: {pairs}{more}",
            )
        )
        rows.append(("soft labels", cm["soft_labels"]))
    return rows


def format_report(report: dict) -> str:
    """Human-readable text of an `inspect_store` report."""
    r = report
    out: list[str] = [f"kdlib store {r['url']}", ""]
    out += _section(
        "format",
        [
            ("backend", str(r["format"])),
            (
                "version",
                f"{r['version']}" + (f" (written by kdlib {r['kdlib_version']})" if r.get("kdlib_version") else ""),
            ),
            ("digest", str(r["digest"])),
            (
                "render",
                "{device}, decoder {decoder}, {renderer}".format(**r["rendered"])
                + f"; teacher in {r['teacher']['precision']}",
            ),
        ],
    )
    t, s = r["teacher"], r["source"]
    out += _section(
        "teacher / source",
        [
            ("teacher", f"{t['id']} (arch {t['arch']}, weights sha256 {str(t['digest'])[:16]})"),
            *_teacher_text(r),
            ("source", f"{s['name']} (data {s['data']}, limit {s['limit']}, {s['images']} images)"),
            ("fingerprint", str(s["fingerprint"])),
            ("recipe", f"{r['recipe']['name']}: {r['recipe']['summary']}"),
        ],
    )
    v, c = r["views"], r["chunks"]
    layout = [
        ("epochs done", str(r["epochs"])),
        ("views", f"{v['per_epoch']} per epoch, {v['total']} in all (groups of {v['group_size']})"),
        ("classes / k", f"{r['num_classes']} / {r['k']} (ids {r['id_dtype']})"),
        (
            "chunks",
            f"{c['chunks_per_epoch']} per epoch of {c['chunk_views']} views; "
            f"full logits kept for the first {c['sample_views_per_chunk']} views of each",
        ),
    ]
    if c.get("partial_epoch"):
        p = c["partial_epoch"]
        layout.append(("partial epoch", f"epoch {p['epoch']}: {p['committed_chunks']} of {p['of']} chunks committed"))
    out += _section("layout", layout)
    b, bv = r["bytes_on_disk"], r["bytes_per_view"]
    others = [
        (f"{kind} (column kind)", f"{_f(v, '.2f'):>8} B/view")
        for kind, v in r["bytes_per_view_by_kind"].items()
        if kind not in ("params", "labels", "sampled", "sample")
    ]
    out += _section(
        "size on disk",
        [
            (name, f"{_f(bv[name], '.2f'):>8} B/view  {b[name]:>12d} B")
            for name in ("params", "labels", "sample", "total")
        ]
        + others
        + [
            (
                "dense fp16",
                f"{float(r['dense_fp16_bytes_per_view']):8.2f} B/view  (all {r['num_classes']} logits, for comparison)",
            )
        ],
    )
    lab = r["labels"]
    scope = "all chunks" if lab["complete"] else f"first {lab['chunks_per_epoch_read']} chunks per epoch"
    out += _section(
        f"soft labels ({lab['views']} views, {scope})",
        [
            ("tail mass beyond top-k", f"mean {_f(lab['tail_mass_mean'])}, max {_f(lab['tail_mass_max'])}"),
            ("entropy (nats)", f"mean {_f(lab['entropy_mean'])} (uniform: {math.log(r['num_classes']):.4g})"),
            ("top-1 probability", f"mean {_f(lab['top1_prob_mean'])}"),
        ],
    )
    out += ["teacher top-1 histogram"] + _histogram(lab["top1_histogram"], lab["views"]) + [""]
    tr = r.get("truncation")
    if r.get("sampled"):
        pass  # its S ids are draws, not a top-k: the label kinds below measure them
    elif tr is None:
        out += _section(
            "truncation (top-k vs full logits)",
            [("sample", NO_SAMPLE if NO_SAMPLE in r["notes"] else "nothing measured")],
        )
    else:
        te = tr["target_error"]
        setting = ", ".join(f"{k}={v:g}" for k, v in te["params"].items() if k in ("temperature", "gamma"))
        out += _section(
            f"truncation (top-k vs full logits, {tr['sample_views']} sample views)",
            [
                (
                    "KL(full||stored) T=1",
                    f"mean {_f(tr['kl_mean'])}, max {_f(tr['kl_max'])}, "
                    f"max |prob error| {_f(tr['max_abs_prob_error'])}",
                ),
                (
                    f"{te['loss']} target ({setting})",
                    f"KL mean {_f(te['kl_mean'])}, in loss units {_f(te['kl_mean_scaled'])}, "
                    f"max {_f(te['kl_max'])}, max |prob error| {_f(te['max_abs_prob_error'])}",
                ),
            ],
        )
    out += _kinds_text(r)
    out += _extras_text(r)
    ts = r.get("test")
    if ts is not None:
        src = ts["source"]
        out += _section(
            "test-split predictions",
            [
                ("views", f"{ts['views']} ({src['name']} {src['split']}, {src['images']} images)"),
                ("tail mass / entropy", f"mean {_f(ts['tail_mass_mean'])} / {_f(ts['entropy_mean'])} nats"),
            ],
        )
    if r.get("notes"):
        out += ["notes"] + [f"  - {n}" for n in r["notes"]] + [""]
    return "\n".join(out).rstrip() + "\n"
