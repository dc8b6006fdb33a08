"""Codecs: one small object per column family of a store, the one place a column kind is defined.

A store's chunk is a set of columns (one row per view). Each family of columns is a codec that
owns its field names and dtypes, how a teacher forward is encoded into them (on the device), how
the writer checks the host copy, how readers decode them, what a replay item carries from them,
how `verify` compares them with a fresh teacher run, and so its bytes per view (`inspect`):

| codec      | columns                                   | present when |
| ---------- | ----------------------------------------- | ------------ |
| params     | image, box, flip, partner, mix, lam, cutbox | always (`kdlib.plan`; `packed`: fewer bytes) |
| labels     | ids, logits, lse (+ top with q8)            | a top-k store (the default) |
| sampled    | ids, logits, counts, lse                    | a sampled-label store (`precompute --labels sampled`) |
| heads      | h{j}_ids, h{j}_logits, h{j}_lse (+ h{j}_top) | the teacher has DIH heads |
| attention  | at{l}                                       | precompute --attention |
| sample     | full (rows: the first views of each chunk)  | a full-logit sample is kept |
| extra      | whatever a registered codec says            | named in meta.json `codecs` |

Test predictions and the pixel sample are named sets outside the epochs: `test_fields` and
`pixel_fields` say their columns. The store, precompute's writer, train's reader, verify and
inspect all ask the codecs; adding a column kind is adding a class and registering it
(`register_codec`), with no edit to any of them. Data never runs code: a store naming a kind
this process has no codec for is refused, never imported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from ..attention import MAP_CODECS, decode_maps, encode_maps
from ..errors import ConfigError, CorruptStoreError, StoreError, StoreVersionError
from ..plan import pack_params, param_fields, unpack_params
from ..softlabel import CODECS as LOGIT_CODECS
from ..softlabel import Q8_STEPS_PER_NAT, check_finite, decode_logits, encode, reconstruct, to_codec

__all__ = [
    "Fields",
    "TeacherOutput",
    "Tolerance",
    "Codec",
    "ParamsCodec",
    "LabelsCodec",
    "HeadsCodec",
    "AttentionCodec",
    "SampleCodec",
    "SampledLabelsCodec",
    "SAMPLED",
    "LABEL_STREAM",
    "sampled_kind",
    "sampled_temperature",
    "sampled_fields",
    "draw_uniforms",
    "draw_sampled",
    "register_codec",
    "unregister_codec",
    "registered_codecs",
    "active_codecs",
    "view_fields",
    "sample_fields",
    "label_fields",
    "test_fields",
    "pixel_fields",
    "decode_chunk",
    "item_columns",
    "tolerance",
    "LOGIT_CODECS",
    "MAP_CODECS",
]

Fields = dict[str, tuple[str, tuple[int, ...]]]
Chunk = dict[str, np.ndarray]


@dataclass
class TeacherOutput:
    """What one teacher forward says about a batch of views, on the teacher's device."""

    logits: Tensor  # float32 [B, C]
    head_logits: list[Tensor] = field(default_factory=list)  # DIH heads, shallow to deep, [B, C] each
    maps: list[Tensor] = field(default_factory=list)  # attention maps, float32 [B, G*G] per tapped layer
    # (epoch, index in the epoch) of the batch's first view, set by precompute: sampled labels key their draws on it
    first_view: tuple[int, int] | None = None

    def cpu(self) -> TeacherOutput:
        return TeacherOutput(
            self.logits.float().cpu(), [z.float().cpu() for z in self.head_logits], [m.float().cpu() for m in self.maps]
        )

    @staticmethod
    def cat(parts: list[TeacherOutput]) -> TeacherOutput:
        def join(xs: list[list[Tensor]]) -> list[Tensor]:
            return [torch.cat(col) for col in zip(*xs)] if xs and xs[0] else []

        return TeacherOutput(
            torch.cat([p.logits for p in parts]), join([p.head_logits for p in parts]), join([p.maps for p in parts])
        )


@dataclass(frozen=True)
class Tolerance:
    """What verify accepts: top-1 agreement at least `min_agreement`, logit errors within storage
    rounding (`rel`, relative) plus the precision's and device's own noise (`abs`)."""

    min_agreement: float
    abs: float
    rel: float


def tolerance(recomputed: Tensor, lse: Tensor, codec: str, abs_tol: float, rel_tol: float) -> Tensor:
    """Largest |stored - recomputed| top-k logit error that storage rounding (and the precision's
    noise) explains, for the main labels and for each DIH head's."""
    if codec == "q8":  # half a 1/16-nat step, plus the fp16 top-1 log-probability's rounding
        return abs_tol + 0.5 / Q8_STEPS_PER_NAT + rel_tol * (recomputed - lse[:, None]).abs()
    return abs_tol + rel_tol * recomputed.abs()


def label_fields(k: int, id_dtype: str, codec: str = "fp16", prefix: str = "") -> Fields:
    """Soft label columns: top-k ids and logits (sorted by logit), log-sum-exp of all logits.

    codec q8 stores the logits as uint8 distances below the top-1 plus the top-1 log-probability
    `top` (see `kdlib.softlabel.to_codec`); readers get float logits back from `decode`."""
    if codec == "q8":
        spec = {"ids": (id_dtype, (k,)), "logits": ("uint8", (k,)), "top": ("float16", ()), "lse": ("float32", ())}
    else:
        spec = {"ids": (id_dtype, (k,)), "logits": ("float16", (k,)), "lse": ("float32", ())}
    return {prefix + name: s for name, s in spec.items()}


def _encode_labels(logits: Tensor, meta: Any, prefix: str = "") -> dict[str, Tensor]:
    raw = encode(logits.float(), meta.k, check=False)  # the writer thread checks the host copy
    cols = {prefix + name: v for name, v in to_codec(raw, meta.logit_codec).items()}
    if meta.logit_codec != "fp16":
        cols[f"_{prefix}logits16"] = raw["logits"]  # what the finiteness check reads (q8 hides overflow)
    return cols


def _check_labels(host: Chunk, prefix: str = "") -> None:
    fp16 = host.pop(f"_{prefix}logits16", None)
    check_finite(host[f"{prefix}logits"] if fp16 is None else fp16, host[f"{prefix}lse"])


def _decode_labels(cols: Chunk, meta: Any, prefix: str = "") -> None:
    """In place: q8 logits back to float top-k logits (and `top` dropped)."""
    if meta.logit_codec != "fp16" and f"{prefix}logits" in cols:
        stored = {"logits": cols[f"{prefix}logits"], "top": cols.pop(f"{prefix}top"), "lse": cols[f"{prefix}lse"]}
        cols[f"{prefix}logits"] = decode_logits(stored, meta.logit_codec)


def _item_labels(cols: Chunk, prefix: str = "") -> dict[str, Tensor]:
    out = {}
    for name in ("ids", "logits", "lse"):
        if prefix + name in cols:
            a = cols[prefix + name]
            out[prefix + name] = torch.from_numpy(a.astype(np.int64) if name == "ids" else np.array(a))
    return out


def _compare_labels(full: Tensor, cols: Chunk, prefix: str, meta: Any, tol: Tolerance) -> dict[str, Any]:
    """Top-1 agreement and top-k logit / lse errors of stored labels against fresh logits `full`."""
    ids = torch.from_numpy(cols[f"{prefix}ids"].astype(np.int64))
    stored = torch.from_numpy(np.ascontiguousarray(cols[f"{prefix}logits"])).float()
    lse = torch.from_numpy(np.ascontiguousarray(cols[f"{prefix}lse"])).float()
    recomputed = full.gather(1, ids)
    err = (stored - recomputed).abs()
    lse_err = float((lse - torch.logsumexp(full, 1)).abs().max())
    agree = float((ids[:, 0] == full.argmax(1)).float().mean())
    within = bool((err <= tolerance(recomputed, lse, meta.logit_codec, tol.abs, tol.rel)).all())
    ok = within and agree >= tol.min_agreement and lse_err <= tol.abs + tol.rel * float(lse.abs().max())
    return {
        "top1_agreement": round(agree, 6),
        "max_logit_error": float(err.max()),
        "max_lse_error": lse_err,
        "logits_within_tolerance": within,
        "ok": ok,
    }


class Codec:
    """One column family. Subclasses override what their family needs; the defaults do nothing.

    `name` is the family's name (meta.json's `codecs` lists the extra ones); `builtin` codecs are
    switched on by meta's own fields, extra ones by being named in `meta.codecs`."""

    name: ClassVar[str] = ""
    builtin: ClassVar[bool] = False

    def active(self, meta: Any) -> bool:
        """Whether a store with `meta` holds this family."""
        return self.name in getattr(meta, "codecs", ())

    def fields(self, meta: Any) -> Fields:
        """Per-view columns: name -> (dtype, trailing shape)."""
        return {}

    def encode(self, out: TeacherOutput, meta: Any) -> dict[str, Tensor]:
        """The family's columns for one batch, from the teacher's forward, on its device. Names
        starting with `_` are for `check` only (popped there, never stored)."""
        return {}

    def check(self, host: Chunk, meta: Any) -> None:
        """In the writer thread, on the host copy: refuse values that cannot be stored, finish columns made
        on the host (sampled labels draw there, the same on every kind of device); pop `_` columns."""

    def decode(self, cols: Chunk, meta: Any) -> None:
        """In place on a chunk's columns: stored form -> what readers use."""

    def item(self, cols: Chunk, meta: Any) -> dict[str, Tensor]:
        """What a replay item carries from decoded columns (tensors, one row per view)."""
        return {name: torch.from_numpy(np.array(cols[name])) for name in self.fields(meta) if name in cols}

    def verify(self, fresh: TeacherOutput, cols: Chunk, meta: Any, tol: Tolerance) -> dict[str, Any] | None:
        """Stored columns against a fresh teacher run of the same views: a report with `ok`, or None."""
        return None


class ParamsCodec(Codec):
    """View params (`kdlib.plan`), as drawn or `packed` (fewer bytes, quantized before rendering)."""

    name, builtin = "params", True

    def active(self, meta: Any) -> bool:
        return True

    def fields(self, meta: Any) -> Fields:
        return dict(param_fields(meta.param_packing))

    def pack(self, params: dict[str, np.ndarray], meta: Any) -> Chunk:
        """A chunk's plan params in the store's dtypes."""
        return pack_params(params, meta.param_packing)

    def decode(self, cols: Chunk, meta: Any) -> None:
        cols.update(unpack_params({k: cols[k] for k in self.fields(meta) if k in cols}, meta.param_packing))

    def item(self, cols: Chunk, meta: Any) -> dict[str, Tensor]:
        return {}  # the feed turns params into pixels, labels and mix info itself


class LabelsCodec(Codec):
    """The teacher's soft label: top-k ids and logits (fp16 or q8) and the lse of all logits."""

    name, builtin = "labels", True

    def active(self, meta: Any) -> bool:
        return sampled_temperature(meta) is None  # a sampled store holds `SampledLabelsCodec`'s columns instead

    def fields(self, meta: Any) -> Fields:
        return label_fields(meta.k, meta.id_dtype, meta.logit_codec)

    def encode(self, out: TeacherOutput, meta: Any) -> dict[str, Tensor]:
        return _encode_labels(out.logits, meta)

    def check(self, host: Chunk, meta: Any) -> None:
        _check_labels(host)

    def decode(self, cols: Chunk, meta: Any) -> None:
        _decode_labels(cols, meta)

    def item(self, cols: Chunk, meta: Any) -> dict[str, Tensor]:
        return _item_labels(cols)

    def verify(self, fresh: TeacherOutput, cols: Chunk, meta: Any, tol: Tolerance) -> dict[str, Any]:
        report = _compare_labels(fresh.logits, cols, "", meta, tol)
        rec = reconstruct(
            torch.from_numpy(cols["ids"].astype(np.int64)),
            torch.from_numpy(cols["logits"]),
            torch.from_numpy(cols["lse"]),
            meta.num_classes,
        )
        report["mean_kl"] = torch.nn.functional.kl_div(
            torch.log_softmax(rec, 1), torch.log_softmax(fresh.logits, 1), log_target=True, reduction="batchmean"
        ).item()
        return report


class HeadsCodec(Codec):
    """One soft label set per DIH head j = 1..len(meta.heads), the main set's k and codec."""

    name, builtin = "heads", True

    def active(self, meta: Any) -> bool:
        return bool(meta.heads)

    def fields(self, meta: Any) -> Fields:
        return {
            name: spec
            for j in range(1, len(meta.heads) + 1)
            for name, spec in label_fields(meta.k, meta.id_dtype, meta.logit_codec, f"h{j}_").items()
        }

    def encode(self, out: TeacherOutput, meta: Any) -> dict[str, Tensor]:
        if len(out.head_logits) != len(meta.heads):
            raise ConfigError(f"the store holds {len(meta.heads)} DIH heads; this teacher gave {len(out.head_logits)}")
        cols: dict[str, Tensor] = {}
        for j, z in enumerate(out.head_logits, 1):
            if z.shape[1] != meta.num_classes:
                raise ConfigError(f"DIH head {j} gives {z.shape[1]} classes, the store holds {meta.num_classes}")
            cols.update(_encode_labels(z, meta, f"h{j}_"))
        return cols

    def check(self, host: Chunk, meta: Any) -> None:
        for j in range(1, len(meta.heads) + 1):
            _check_labels(host, f"h{j}_")

    def decode(self, cols: Chunk, meta: Any) -> None:
        for j in range(1, len(meta.heads) + 1):
            _decode_labels(cols, meta, f"h{j}_")

    def item(self, cols: Chunk, meta: Any) -> dict[str, Tensor]:
        return {k: v for j in range(1, len(meta.heads) + 1) for k, v in _item_labels(cols, f"h{j}_").items()}

    def verify(self, fresh: TeacherOutput, cols: Chunk, meta: Any, tol: Tolerance) -> dict[str, Any]:
        heads = [
            {
                "head": j,
                "layer": meta.heads[j - 1],
                **{
                    k: v
                    for k, v in _compare_labels(z, cols, f"h{j}_", meta, tol).items()
                    if k != "logits_within_tolerance"
                },
            }
            for j, z in enumerate(fresh.head_logits, 1)
        ]
        return {"heads": heads, "ok": all(h["ok"] for h in heads)}


class AttentionCodec(Codec):
    """One attention map per tapped teacher layer l = 1..L: `at{l}`, G*G values, float16 or uint8 (q8)."""

    name, builtin = "attention", True

    def active(self, meta: Any) -> bool:
        return bool(meta.attention)

    def fields(self, meta: Any) -> Fields:
        att = meta.attention
        dtype = "uint8" if att["codec"] == "q8" else "float16"
        g = int(att["grid"])
        return {f"at{i}": (dtype, (g * g,)) for i in range(1, len(att["layers"]) + 1)}

    def encode(self, out: TeacherOutput, meta: Any) -> dict[str, Tensor]:
        return {f"at{i}": encode_maps(m, meta.attention["codec"]) for i, m in enumerate(out.maps, 1)}

    def decode(self, cols: Chunk, meta: Any) -> None:
        for name in self.fields(meta):
            if name in cols:
                cols[name] = decode_maps(
                    torch.from_numpy(np.ascontiguousarray(cols[name])), meta.attention["codec"]
                ).numpy()

    def verify(self, fresh: TeacherOutput, cols: Chunk, meta: Any, tol: Tolerance) -> dict[str, Any]:
        bound = 2.0 / 255 if meta.attention["codec"] == "q8" else 2e-3  # storage rounding + renormalising
        maps = []
        for i, m in enumerate(fresh.maps, 1):
            err = float((torch.from_numpy(cols[f"at{i}"]).float() - m).abs().max())
            maps.append(
                {
                    "map": i,
                    "layer": meta.attention["layers"][i - 1],
                    "max_error": err,
                    "bound": bound,
                    "ok": err <= bound,
                }
            )
        return {"attention": maps, "ok": all(m["ok"] for m in maps)}


# -- sampled soft labels (RS-KD: Anshumann et al., ACL 2025, arXiv 2503.16870) ---------------------

SAMPLED = "sampled"  # meta.json `codecs` entry of a sampled-label store: "sampled:T=<proposal temperature>"
LABEL_STREAM = 7  # the draws' random stream, SeedSequence([recipe seed, epoch, 7]); the plan's are 0-3
_SAMPLED_PREFIX = f"{SAMPLED}:T="


def sampled_kind(temperature: float) -> str:
    """The `codecs` entry that marks a sampled-label store drawn at `temperature` (repr: it reads back exactly)."""
    t = float(temperature)
    if not (np.isfinite(t) and t > 0):
        raise ConfigError(f"--sample-temperature {temperature!r} must be a finite number > 0")
    return f"{_SAMPLED_PREFIX}{t!r}"


def sampled_temperature(meta: Any) -> float | None:
    """The proposal temperature of a sampled-label store; None for a top-k store."""
    for name in getattr(meta, "codecs", ()):
        if name.startswith(_SAMPLED_PREFIX):
            try:
                t = float(name[len(_SAMPLED_PREFIX) :])
            except ValueError:
                t = float("nan")
            if not (np.isfinite(t) and t > 0):
                raise StoreError(f"meta.json: codecs entry {name!r} must be {_SAMPLED_PREFIX}<temperature > 0>")
            return t
    return None


def _count_dtype(samples: int) -> str:
    return "uint8" if samples <= 255 else "uint16" if samples <= 65535 else "uint32"


def sampled_fields(samples: int, id_dtype: str) -> Fields:
    """S slots per view: distinct class ids, their fp16 logits and how often each was drawn, and the lse."""
    return {
        "ids": (id_dtype, (samples,)),
        "logits": ("float16", (samples,)),
        "counts": (_count_dtype(samples), (samples,)),
        "lse": ("float32", ()),
    }


def draw_uniforms(seed: int, epoch: int, start: int, n: int, samples: int) -> np.ndarray:
    """float64 [n, S] uniforms of views start .. start+n of an epoch: view v takes draws v*S .. v*S+S-1 of the
    one PCG64 stream SeedSequence([seed, epoch, LABEL_STREAM]) (one 64-bit output per draw, so `advance`
    jumps to any view): the same numbers whatever the batch, chunk, rank or world size."""
    bits = np.random.PCG64(np.random.SeedSequence([int(seed), int(epoch), LABEL_STREAM]))
    bits.advance(int(start) * int(samples))
    return np.random.Generator(bits).random((int(n), int(samples)))


def draw_sampled(full16: np.ndarray, uniforms: np.ndarray, temperature: float) -> dict[str, np.ndarray]:
    """Sampled soft labels of fp16 teacher logits [n, C] from uniforms [n, S] (numpy, float64 arithmetic).

    Draw j of view v is class `searchsorted(cdf, u[v, j], side="right")` of the normalised cumulative
    softmax(logits16 / T) (inverse CDF). The S slots hold the distinct drawn classes with their counts,
    then, when fewer than S distinct classes were drawn, the highest-logit classes not drawn (count 0), all
    ordered by descending logit, then id. Returns ids (int64), logits (float16), counts (int64) [n, S]."""
    n, c = full16.shape
    s = uniforms.shape[1]
    z = full16.astype(np.float64) / float(temperature)
    p = np.exp(z - z.max(1, keepdims=True))
    cdf = np.cumsum(p, 1)
    cdf /= cdf[:, -1:]
    # all views at once (the writer thread's hot path): inverse CDF, counts per class, then the S slots
    drawn = np.minimum((cdf[:, None, :] <= uniforms[:, :, None]).sum(-1), c - 1)  # searchsorted(side="right")
    per_class = np.zeros((n, c), np.int64)
    np.add.at(per_class, (np.arange(n)[:, None], drawn), 1)
    neg = -full16.astype(np.float32)
    cls = np.broadcast_to(np.arange(c), (n, c))
    # drawn classes first, then the highest-logit classes not drawn (count 0), ties by id; keep S
    keep = np.lexsort((cls, neg, per_class == 0), axis=-1)[:, :s]
    order = np.lexsort((keep, np.take_along_axis(neg, keep, 1)), axis=-1)  # by descending logit, then id
    ids = np.take_along_axis(keep, order, 1).astype(np.int64)
    counts = np.take_along_axis(per_class, ids, 1)
    return {"ids": ids, "logits": np.take_along_axis(full16, ids, 1), "counts": counts}


def check_sampled(cols: Chunk, meta: Any) -> None:
    """Refuse sampled labels that cannot come from `draw_sampled`: ids out of range or repeated in a view,
    counts that do not add up to S (a column rewritten with valid checksums, or a bug, not a flipped byte)."""
    ids, counts = cols["ids"].astype(np.int64), cols["counts"].astype(np.int64)
    s, c = meta.k, meta.num_classes
    bad = []
    sums = counts.sum(1)
    if (sums != s).any():
        r = int(np.flatnonzero(sums != s)[0])
        bad.append(f"view row {r}: counts add up to {int(sums[r])}, not S={s}")
    if ((ids < 0) | (ids >= c)).any():
        bad.append(f"a class id outside [0, {c})")
    srt = np.sort(ids, 1)
    if (srt[:, 1:] == srt[:, :-1]).any():
        bad.append("a class id repeated within a view")
    if bad:
        raise CorruptStoreError(
            f"sampled labels are corrupt ({'; '.join(bad)}); precompute them again into a new --out"
        )


class SampledLabelsCodec(Codec):
    """Sampled soft labels (RS-KD): per view, S draws from softmax(teacher logits / T), stored as distinct
    class ids + counts, with the teacher's fp16 logits of those ids and the lse of all logits. Replaces
    `LabelsCodec` on a store whose meta.codecs names `sampled:T=<T>`; S is meta.k. The draws are made on
    the host from the fp16 logits and uniforms keyed by (recipe seed, epoch, view): a resumed store, another
    world size or another device kind with the same fp16 logits writes the same bytes."""

    name, builtin = SAMPLED, True

    def active(self, meta: Any) -> bool:
        return sampled_temperature(meta) is not None

    def fields(self, meta: Any) -> Fields:
        return sampled_fields(meta.k, meta.id_dtype)

    def encode(self, out: TeacherOutput, meta: Any) -> dict[str, Tensor]:
        if out.first_view is None:
            raise ConfigError("sampled labels need the views' place in the plan (TeacherOutput.first_view)")
        epoch, start = out.first_view
        n, device = len(out.logits), out.logits.device
        x = out.logits.float()
        return {
            "lse": torch.logsumexp(x, -1),
            "_full16": x.half(),  # overflow shows as inf: refused in `check`, as top-k refuses it
            "_view": torch.arange(start, start + n, device=device, dtype=torch.int64),
            "_epoch": torch.full((n,), epoch, device=device, dtype=torch.int64),
        }

    def check(self, host: Chunk, meta: Any) -> None:
        full16, views, epochs = host.pop("_full16"), host.pop("_view"), host.pop("_epoch")
        check_finite(full16, host["lse"])
        if len(views) and (np.any(np.diff(views) != 1) or np.any(epochs != epochs[0])):
            raise ConfigError("sampled labels: a chunk's views must be consecutive views of one epoch")
        u = draw_uniforms(int(meta.recipe["seed"]), int(epochs[0]), int(views[0]), len(views), meta.k)
        drawn = draw_sampled(full16, u, sampled_temperature(meta))
        host["ids"] = drawn["ids"].astype(meta.id_dtype)
        host["logits"] = drawn["logits"]
        host["counts"] = drawn["counts"].astype(_count_dtype(meta.k))

    def decode(self, cols: Chunk, meta: Any) -> None:
        if "counts" in cols and "ids" in cols:
            check_sampled(cols, meta)

    def item(self, cols: Chunk, meta: Any) -> dict[str, Tensor]:
        out = _item_labels(cols)
        if "counts" in cols:
            out["counts"] = torch.from_numpy(cols["counts"].astype(np.int64))
        return out

    def verify(self, fresh: TeacherOutput, cols: Chunk, meta: Any, tol: Tolerance) -> dict[str, Any]:
        """The stored logits of the drawn ids and the lse against a fresh run; top-1 agreement is the share
        of views whose fresh top-1 class is among the stored ids (a draw need not hold the top-1)."""
        ids = torch.from_numpy(cols["ids"].astype(np.int64))
        stored = torch.from_numpy(np.ascontiguousarray(cols["logits"])).float()
        lse = torch.from_numpy(np.ascontiguousarray(cols["lse"])).float()
        recomputed = fresh.logits.gather(1, ids)
        err = (stored - recomputed).abs()
        lse_err = float((lse - torch.logsumexp(fresh.logits, 1)).abs().max())
        within = bool((err <= tolerance(recomputed, lse, "fp16", tol.abs, tol.rel)).all())
        lse_ok = lse_err <= tol.abs + tol.rel * float(lse.abs().max())
        held = float((ids == fresh.logits.argmax(1, keepdim=True)).any(1).float().mean())
        return {
            "sampled": {"samples": meta.k, "temperature": sampled_temperature(meta)},
            "top1_in_stored_ids": round(held, 6),
            "max_logit_error": float(err.max()),
            "max_lse_error": lse_err,
            "logits_within_tolerance": within,
            "ok": within and lse_ok,
        }


class SampleCodec(Codec):
    """Full logits (fp16) of the first `sample_views` views of each chunk: what top-k truncation
    costs is measured (`kdlib inspect`), not guessed. Its rows are not one per view."""

    name, builtin = "sample", True

    def active(self, meta: Any) -> bool:
        return bool(meta.sample_views)

    def fields(self, meta: Any) -> Fields:
        return {"full": ("float16", (meta.num_classes,))}

    def encode_rows(self, out: TeacherOutput, rows: int) -> dict[str, Tensor]:
        """The first `rows` views of the batch (those that fall in the chunk's sample)."""
        return {"full": out.logits[:rows].clamp(-65504, 65504).half()}

    def item(self, cols: Chunk, meta: Any) -> dict[str, Tensor]:
        return {}


_BUILTIN: tuple[Codec, ...] = (ParamsCodec(), LabelsCodec(), SampledLabelsCodec(), HeadsCodec(), AttentionCodec())
SAMPLE = SampleCodec()
_EXTRA: dict[str, Codec] = {}


def register_codec(codec: Codec) -> Codec:
    """Add a column kind: stores naming it in meta.json's `codecs` (precompute's `columns`) hold and
    replay its columns. Its names must not collide with another family's."""
    if not isinstance(codec, Codec) or not codec.name or codec.builtin:
        raise ConfigError(f"register_codec needs a Codec subclass instance with a name, got {codec!r}")
    if codec.name in {c.name for c in _BUILTIN} | {SAMPLE.name} or codec.name.startswith(_SAMPLED_PREFIX):
        raise ConfigError(f"codec name {codec.name!r} is kdlib's own; choose another")
    _EXTRA[codec.name] = codec
    return codec


def unregister_codec(name: str) -> None:
    """Remove an extra column kind (stores naming it are then refused)."""
    _EXTRA.pop(name, None)


def registered_codecs() -> list[str]:
    """The names of the extra column kinds registered in this process."""
    return sorted(_EXTRA)


def active_codecs(meta: Any) -> list[Codec]:
    """The per-view families a store with `meta` holds, in column order (params, labels, heads,
    attention, then the extra ones in meta's order); an unknown extra kind is refused."""
    found = [c for c in _BUILTIN if c.active(meta)]
    for name in getattr(meta, "codecs", ()):
        if name.startswith(_SAMPLED_PREFIX):
            continue  # kdlib's own sampled labels, switched on by this entry (`SampledLabelsCodec`)
        if name not in _EXTRA:
            raise StoreVersionError(
                f"the store holds columns of kind {name!r}, which this process has no codec for; "
                "register it (kdlib.register_codec) before opening the store"
            )
        found.append(_EXTRA[name])
    return found


def view_fields(meta: Any) -> Fields:
    """Every per-view column of an epoch, in the store's canonical order (the content digest's)."""
    out: Fields = {}
    for codec in active_codecs(meta):
        for name, spec in codec.fields(meta).items():
            if name in out:
                raise ConfigError(f"codec {codec.name!r} column {name!r} collides with another family's")
            out[name] = spec
    return out


def sample_fields(meta: Any) -> Fields:
    """The full-logit sample's columns (rows: the first `sample_views` views of each chunk)."""
    return SAMPLE.fields(meta) if SAMPLE.active(meta) else {}


def test_fields(meta: Any) -> Fields:
    """The teacher's predictions on the test split: one soft label per test image (top-k, k = meta.k, on
    sampled stores too: eval reads the teacher's top-1 there)."""
    return label_fields(meta.k, meta.id_dtype, meta.logit_codec)


def pixel_fields(shape: tuple[int, ...]) -> Fields:
    """A sample of rendered views kept as the renderer made them (verify measures pixel parity)."""
    return {"views": ("uint8", tuple(shape))}


def decode_chunk(cols: Chunk, meta: Any) -> Chunk:
    """Columns in the plan's dtypes and float logits / maps, whatever the store's codecs."""
    out = dict(cols)
    for codec in active_codecs(meta):
        codec.decode(out, meta)
    return out


def item_columns(cols: Chunk, meta: Any) -> dict[str, Tensor]:
    """What a replay item carries from a store's decoded columns: every family's tensors."""
    out: dict[str, Tensor] = {}
    for codec in active_codecs(meta):
        out.update(codec.item(cols, meta))
    return out


def check_names(names: list[str], where: str) -> list[str]:
    """Extra codec names a command asks to store: each registered."""
    for name in names:
        if name not in _EXTRA:
            raise ConfigError(
                f"{where}: no codec named {name!r} is registered (known: {registered_codecs()}); "
                "register it with kdlib.register_codec first"
            )
    return list(names)
