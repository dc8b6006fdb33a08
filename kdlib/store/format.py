"""The on-disk store format, as one frozen, versioned dataclass (`shards/README.md` is its prose).

I/O lives in the backends; this module only says what a store's `meta.json` holds, checks
each field once, and decides whether a store may be used for a given command.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..errors import StoreError, StoreMismatchError, StoreVersionError
from ..plan import PACKINGS, param_fields
from ..attention import MAP_CODECS
from ..softlabel import CODECS

__all__ = ["FORMAT_VERSION", "READABLE_VERSIONS", "LEGACY_RENDER", "BACKENDS", "StoreMeta", "label_fields",
           "view_fields", "head_fields", "attention_fields", "check_compatible"]

# 2: meta records what rendered the views (`render`) and the teacher's precision; optional DIH head
# label sets (`heads`) and attention maps (`attention`). A v1 store is a v2 store rendered on the CPU
# with PIL by an fp32 teacher, with neither heads nor maps, so v1 stores read (and train) unchanged.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
# What wrote a version-1 store: roi_align on the CPU in DataLoader workers, PIL decoding, fp32 teacher.
LEGACY_RENDER = {"device": "cpu", "decoder": "pil", "renderer": "roi_align-1"}
LEGACY_PRECISION = "fp32"
BACKENDS = ("zarr", "wds")
ID_DTYPES = ("uint8", "uint16", "int32")


def label_fields(k: int, id_dtype: str, codec: str = "fp16") -> dict[str, tuple[str, tuple[int, ...]]]:
    """Soft label columns: top-k ids and logits (sorted by logit), log-sum-exp of all logits.

    codec q8 stores the logits as uint8 distances below the top-1 plus the top-1 log-probability
    `top` (see `kdlib.softlabel.to_codec`); readers get float logits back from `decode_logits`.
    """
    if codec == "q8":
        return {"ids": (id_dtype, (k,)), "logits": ("uint8", (k,)), "top": ("float16", ()), "lse": ("float32", ())}
    return {"ids": (id_dtype, (k,)), "logits": ("float16", (k,)), "lse": ("float32", ())}


def head_fields(heads: list[str], k: int, id_dtype: str, codec: str = "fp16") -> dict[str, tuple[str, tuple[int, ...]]]:
    """One soft label set per DIH head j = 1..len(heads): `h{j}_ids`, `h{j}_logits`, `h{j}_lse` (and `h{j}_top`
    with q8), the same k and codec as the main label set (head 0 is the main classifier: `ids`, ...)."""
    return {f"h{j}_{col}": spec for j in range(1, len(heads) + 1)
            for col, spec in label_fields(k, id_dtype, codec).items()}


def attention_fields(attention: dict[str, Any] | None) -> dict[str, tuple[str, tuple[int, ...]]]:
    """One attention map per tapped teacher layer l = 1..L: `at{l}`, G*G values, float16 or uint8 (q8)."""
    if not attention:
        return {}
    dtype = "uint8" if attention["codec"] == "q8" else "float16"
    g = int(attention["grid"])
    return {f"at{i}": (dtype, (g * g,)) for i in range(1, len(attention["layers"]) + 1)}


def view_fields(k: int, id_dtype: str, codec: str = "fp16", packing: str = "none") -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every column of an epoch: view params (see `kdlib.plan`) then soft labels."""
    return {**param_fields(packing), **label_fields(k, id_dtype, codec)}


@dataclass(frozen=True)
class StoreMeta:
    """Contents of `meta.json`. `epochs_done` counts epochs whose every chunk is committed."""

    format_version: int
    backend: str
    recipe: dict[str, Any]
    source: dict[str, Any]  # Source.describe() of the train split (fingerprint decides)
    teacher: dict[str, Any]  # {"id", "digest", "arch"}
    num_classes: int
    k: int  # labels kept per view (min(k asked, num_classes))
    id_dtype: str
    views_per_epoch: int
    group_size: int
    chunk_views: int  # views per chunk, the unit of writing, checksumming and resuming
    epochs_done: int = 0
    sample_views: int = 0  # the first views of every chunk also keep their full logits (fp16)
    logit_codec: str = "fp16"  # fp16, or q8 (8-bit distances below the top-1 logit)
    param_packing: str = "none"  # none, or packed (uint16 boxes, lambda on a 1/65535 grid)
    test: dict[str, Any] | None = None  # teacher predictions on the test split: {"source": describe(), "views": n}
    # what rendered the views: {"device": "cpu"|"cuda", "decoder": "pil"|"pil-draft",
    # "renderer": "pil-bilinear-1"|"roi_align-1"},
    # and optionally "pixels": {"epoch", "start", "views"} (a sample of rendered views kept for verify)
    render: dict[str, Any] | None = None
    heads: list[str] = field(default_factory=list)  # v2: DIH head layers of the teacher, one label set each
    attention: dict[str, Any] | None = None  # v2: {"layers": [...], "grid": G, "codec": "fp16" | "q8"}
    kdlib_version: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        def need(ok: bool, key: str, why: str) -> None:
            if not ok:
                raise StoreError(f"meta.json: {key}={getattr(self, key)!r} {why}")

        _check_version(self.format_version)
        need(self.backend in BACKENDS, "backend", f"must be one of {BACKENDS}")
        need(isinstance(self.recipe, dict), "recipe", "must be a mapping")
        need(isinstance(self.source, dict) and "fingerprint" in self.source, "source", "must hold a fingerprint")
        need(isinstance(self.teacher, dict) and "digest" in self.teacher, "teacher", "must hold a digest")
        need(isinstance(self.num_classes, int) and self.num_classes >= 2, "num_classes", "must be an int >= 2")
        need(isinstance(self.k, int) and 1 <= self.k <= self.num_classes, "k", "must be in [1, num_classes]")
        need(self.id_dtype in ID_DTYPES, "id_dtype", f"must be one of {ID_DTYPES}")
        need(isinstance(self.group_size, int) and self.group_size >= 1, "group_size", "must be a positive int")
        need(isinstance(self.views_per_epoch, int) and self.views_per_epoch > 0
             and self.views_per_epoch % self.group_size == 0, "views_per_epoch", "must be a positive multiple of group_size")
        need(isinstance(self.chunk_views, int) and self.chunk_views > 0 and self.chunk_views % self.group_size == 0,
             "chunk_views", "must be a positive multiple of group_size")
        need(isinstance(self.epochs_done, int) and self.epochs_done >= 0, "epochs_done", "must be an int >= 0")
        need(self.logit_codec in CODECS, "logit_codec", f"must be one of {CODECS}")
        need(self.param_packing in PACKINGS, "param_packing", f"must be one of {PACKINGS}")
        need(self.render is None or (isinstance(self.render, dict) and {"device", "decoder", "renderer"} <= set(self.render)),
             "render", "must be a mapping with device, decoder and renderer")
        need(isinstance(self.sample_views, int) and 0 <= self.sample_views <= self.chunk_views, "sample_views",
             "must be an int in [0, chunk_views]")
        need(isinstance(self.heads, list) and all(isinstance(h, str) and h for h in self.heads), "heads",
             "must be a list of layer names")
        a = self.attention
        need(a is None or (isinstance(a, dict) and set(a) == {"layers", "grid", "codec"}
                           and isinstance(a["layers"], list) and a["layers"] and all(isinstance(x, str) for x in a["layers"])
                           and isinstance(a["grid"], int) and not isinstance(a["grid"], bool) and 1 <= a["grid"] <= 64
                           and a["codec"] in MAP_CODECS), "attention",
             f"must be null or {{'layers': [str, ...], 'grid': int in [1, 64], 'codec': one of {MAP_CODECS}}}")
        need(not (self.format_version < 2 and (self.heads or a)), "format_version", "1 cannot hold heads or attention")

    @property
    def chunks_per_epoch(self) -> int:
        return -(-self.views_per_epoch // self.chunk_views)

    def chunk_range(self, chunk: int) -> tuple[int, int]:
        start = chunk * self.chunk_views
        return start, min(start + self.chunk_views, self.views_per_epoch)

    @property
    def fields(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """One row per view: params and soft labels (and, v2, each head's soft labels and the attention maps)."""
        return {**view_fields(self.k, self.id_dtype, self.logit_codec, self.param_packing),
                **head_fields(self.heads, self.k, self.id_dtype, self.logit_codec), **attention_fields(self.attention)}

    @property
    def label_fields(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        return label_fields(self.k, self.id_dtype, self.logit_codec)

    @property
    def sample_fields(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Full logits of the first `sample_views` views of each chunk (measures the cost of top-k)."""
        return {"full": ("float16", (self.num_classes,))} if self.sample_views else {}

    @property
    def columns(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        return {**self.fields, **self.sample_fields}

    def rows(self, column: str, chunk: int) -> tuple[int, int]:
        """Rows [a, b) of `column`'s epoch array that belong to `chunk`."""
        start, stop = self.chunk_range(chunk)
        if column in self.fields:
            return start, stop
        a = chunk * self.sample_views
        return a, a + min(self.sample_views, stop - start)

    def epoch_rows(self, column: str) -> tuple[int, int]:
        """(rows per epoch, rows per chunk) of `column`: the array shape and its shard size."""
        if column in self.fields:
            return self.views_per_epoch, self.chunk_views
        return self.chunks_per_epoch * self.sample_views, self.sample_views

    @property
    def rendered(self) -> dict[str, Any]:
        """What rendered this store's views (version-1 stores: the CPU, PIL, roi_align)."""
        return {**LEGACY_RENDER, **(self.render or {})}

    @property
    def precision(self) -> str:
        """The teacher's precision when it wrote the soft labels."""
        return self.teacher.get("precision", LEGACY_PRECISION)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], origin: str = "meta.json") -> "StoreMeta":
        if not isinstance(d, dict) or "format_version" not in d:
            raise StoreVersionError(f"{origin}: no format_version; not a kdlib store (readable versions "
                                    f"{list(READABLE_VERSIONS)})")
        _check_version(d["format_version"])
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.name not in d and f.default is dataclasses.MISSING
                         and f.default_factory is dataclasses.MISSING)
        if unknown or missing:
            raise StoreError(f"{origin}: unknown keys {unknown} / missing keys {missing} for format "
                             f"version {d['format_version']}")
        return cls(**d)

    def replace(self, **changes: Any) -> "StoreMeta":
        return dataclasses.replace(self, **changes)


def _check_version(version: Any) -> None:
    if version not in READABLE_VERSIONS:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        raise StoreVersionError(f"store format version {version!r} found; this kdlib reads versions "
                                f"{list(READABLE_VERSIONS)}" + (" (written by a newer kdlib: upgrade)" if newer else ""))


def _render_key(meta: StoreMeta) -> dict[str, Any]:
    """What must match to extend a store's views: pil-bilinear-1 is integer arithmetic, the same bytes
    on any device, so only roi_align-1 stores are tied to the device kind that rendered them."""
    r = meta.rendered
    keys = [k for k in LEGACY_RENDER if not (k == "device" and r["renderer"] == "pil-bilinear-1")]
    return {k: r[k] for k in keys}


def check_compatible(found: StoreMeta, wanted: StoreMeta, where: str) -> None:
    """Refuse to extend or read `found` for a command that would write `wanted`: name every difference."""
    diffs = []
    checks = [
        ("source fingerprint", found.source.get("fingerprint"), wanted.source.get("fingerprint")),
        ("teacher weights digest", found.teacher.get("digest"), wanted.teacher.get("digest")),
        ("recipe", found.recipe, wanted.recipe),
        ("k", found.k, wanted.k),
        ("logit codec", found.logit_codec, wanted.logit_codec),
        ("param packing", found.param_packing, wanted.param_packing),
        ("num_classes", found.num_classes, wanted.num_classes),
        ("backend", found.backend, wanted.backend),
        ("chunk_views", found.chunk_views, wanted.chunk_views),
        ("sample_views (full-logit sample per chunk)", found.sample_views, wanted.sample_views),
        ("teacher precision", found.precision, wanted.precision),
        # pixels must come from one renderer: another decoder (or, for roi_align-1, device kind) changes some
        ("render", _render_key(found), _render_key(wanted)),
        ("DIH heads", found.heads, wanted.heads),
        ("attention maps", found.attention, wanted.attention),
    ]
    for name, a, b in checks:
        if a != b:
            if isinstance(a, dict) and isinstance(b, dict):
                keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                a = {k: a.get(k) for k in keys}
                b = {k: b.get(k) for k in keys}
            diffs.append(f"  {name}: store has {a!r}, this command has {b!r}")
    if diffs:
        raise StoreMismatchError(f"store {where} was written for something else; nothing was written:\n"
                                 + "\n".join(diffs)
                                 + "\nUse a new --out directory, or the same source/teacher/recipe/k.")
