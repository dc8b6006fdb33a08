"""The on-disk store format, as one frozen, versioned dataclass (`shards/README.md` is its prose).

I/O lives in the backends; this module only says what a store's `meta.json` holds, checks
each field once, and decides whether a store may be used for a given command.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..errors import StoreError, StoreMismatchError, StoreVersionError
from ..plan import PACKINGS
from .codecs import LOGIT_CODECS, MAP_CODECS, sample_fields, test_fields, view_fields

__all__ = ["FORMAT_VERSION", "READABLE_VERSIONS", "LEGACY_RENDER", "BACKENDS", "StoreMeta", "check_compatible"]

# 2: meta records what rendered the views (`render`) and the teacher's precision; optional DIH head
# label sets (`heads`) and attention maps (`attention`). A v1 store is a v2 store rendered on the CPU
# with PIL by an fp32 teacher, with neither heads nor maps, so v1 stores read (and train) unchanged.
# An optional `codecs` list names extra column kinds (`kdlib.store.codecs.register_codec`); it is
# written only when not empty, so a store without extra kinds has exactly the v2 meta.json.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
# What wrote a version-1 store: roi_align on the CPU in DataLoader workers, PIL decoding, fp32 teacher.
LEGACY_RENDER = {"device": "cpu", "decoder": "pil", "renderer": "roi_align-1"}
LEGACY_PRECISION = "fp32"
BACKENDS = ("zarr", "wds")
ID_DTYPES = ("uint8", "uint16", "int32")


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
    # teacher predictions on the test split: {"source": describe(), "views": n, "size", "center_fraction", "decoder"}
    test: dict[str, Any] | None = None
    # what rendered the views: {"device": "cpu"|"cuda", "decoder": "pil"|"pil-draft",
    # "renderer": "pil-bilinear-1"|"roi_align-1"},
    # and optionally "pixels": {"epoch", "start", "views"} (a sample of rendered views kept for verify)
    render: dict[str, Any] | None = None
    heads: list[str] = field(default_factory=list)  # v2: DIH head layers of the teacher, one label set each
    attention: dict[str, Any] | None = None  # v2: {"layers": [...], "grid": G, "codec": "fp16" | "q8"}
    codecs: list[str] = field(default_factory=list)  # extra column kinds (registered codecs), in column order
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
        need(
            isinstance(self.views_per_epoch, int)
            and self.views_per_epoch > 0
            and self.views_per_epoch % self.group_size == 0,
            "views_per_epoch",
            "must be a positive multiple of group_size",
        )
        need(
            isinstance(self.chunk_views, int) and self.chunk_views > 0 and self.chunk_views % self.group_size == 0,
            "chunk_views",
            "must be a positive multiple of group_size",
        )
        need(isinstance(self.epochs_done, int) and self.epochs_done >= 0, "epochs_done", "must be an int >= 0")
        need(self.logit_codec in LOGIT_CODECS, "logit_codec", f"must be one of {LOGIT_CODECS}")
        need(self.param_packing in PACKINGS, "param_packing", f"must be one of {PACKINGS}")
        need(
            self.render is None
            or (isinstance(self.render, dict) and {"device", "decoder", "renderer"} <= set(self.render)),
            "render",
            "must be a mapping with device, decoder and renderer",
        )
        need(
            isinstance(self.sample_views, int) and 0 <= self.sample_views <= self.chunk_views,
            "sample_views",
            "must be an int in [0, chunk_views]",
        )
        need(
            isinstance(self.heads, list) and all(isinstance(h, str) and h for h in self.heads),
            "heads",
            "must be a list of layer names",
        )
        a = self.attention
        need(
            a is None
            or (
                isinstance(a, dict)
                and set(a) == {"layers", "grid", "codec"}
                and isinstance(a["layers"], list)
                and a["layers"]
                and all(isinstance(x, str) for x in a["layers"])
                and isinstance(a["grid"], int)
                and not isinstance(a["grid"], bool)
                and 1 <= a["grid"] <= 64
                and a["codec"] in MAP_CODECS
            ),
            "attention",
            f"must be null or {{'layers': [str, ...], 'grid': int in [1, 64], 'codec': one of {MAP_CODECS}}}",
        )
        need(not (self.format_version < 2 and (self.heads or a)), "format_version", "1 cannot hold heads or attention")
        need(
            isinstance(self.codecs, list)
            and all(isinstance(c, str) and c for c in self.codecs)
            and len(set(self.codecs)) == len(self.codecs),
            "codecs",
            "must be a list of distinct codec names",
        )

    @property
    def chunks_per_epoch(self) -> int:
        return -(-self.views_per_epoch // self.chunk_views)

    def chunk_range(self, chunk: int) -> tuple[int, int]:
        start = chunk * self.chunk_views
        return start, min(start + self.chunk_views, self.views_per_epoch)

    @property
    def fields(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """One row per view: every active codec's columns (params, soft labels, heads, maps, extra kinds)."""
        return view_fields(self)

    @property
    def label_fields(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """The columns of the teacher's test-split predictions."""
        return test_fields(self)

    @property
    def sample_fields(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Full logits of the first `sample_views` views of each chunk (measures the cost of top-k)."""
        return sample_fields(self)

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
        d = dataclasses.asdict(self)
        if not d["codecs"]:
            del d["codecs"]  # a store without extra column kinds keeps the v2 meta.json unchanged
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], origin: str = "meta.json") -> StoreMeta:
        if not isinstance(d, dict) or "format_version" not in d:
            raise StoreVersionError(
                f"{origin}: no format_version; not a kdlib store (readable versions {list(READABLE_VERSIONS)})"
            )
        _check_version(d["format_version"])
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        missing = sorted(
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in d and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        )
        if unknown or missing:
            raise StoreError(
                f"{origin}: unknown keys {unknown} / missing keys {missing} for format version {d['format_version']}"
            )
        return cls(**d)

    def replace(self, **changes: Any) -> StoreMeta:
        return dataclasses.replace(self, **changes)


def _check_version(version: Any) -> None:
    if version not in READABLE_VERSIONS:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        raise StoreVersionError(
            f"store format version {version!r} found; this kdlib reads versions "
            f"{list(READABLE_VERSIONS)}" + (" (written by a newer kdlib: upgrade)" if newer else "")
        )


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
        ("extra column kinds", found.codecs, wanted.codecs),
    ]
    for name, a, b in checks:
        if a != b:
            if isinstance(a, dict) and isinstance(b, dict):
                keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                a = {k: a.get(k) for k in keys}
                b = {k: b.get(k) for k in keys}
            diffs.append(f"  {name}: store has {a!r}, this command has {b!r}")
    if diffs:
        raise StoreMismatchError(
            f"store {where} was written for something else; nothing was written:\n"
            + "\n".join(diffs)
            + "\nUse a new --out directory, or the same source/teacher/recipe/k."
        )
