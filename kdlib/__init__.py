"""kdlib: an offline teacher-logit cache for knowledge distillation.

A precompute stage runs the teacher once over seeded views and stores its soft labels;
the student trainer replays the identical views from the store, with no teacher in memory.
See DESIGN.md for the words (source, recipe, group, view, plan, render, soft label, store).

The Python API (the CLI calls the same functions)::

    import kdlib
    store = kdlib.open_store("shards/run")                      # a path or an fsspec URL
    replay = kdlib.Replay.from_store(store, batch_size=256, epochs=10)
    for batch in replay:                                        # this rank's share of each global batch
        loss = kdlib.kl(student(batch.inputs), batch.teacher_logits)

Names are imported on first use, so `import kdlib` (and `kdlib --help`) stays cheap. The commands
live in modules of their own names: `kdlib.precompute.precompute(cfg)`, `kdlib.train.train(cfg)`,
`kdlib.verify.verify(...)`, `kdlib.evaluate.evaluate(...)`; their configs are exported here too.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

# public name -> the module that is its one home
_HOMES = {
    # the store and its column kinds
    "open_store": "store",
    "create_store": "store",
    "Store": "store",
    "StoreMeta": "store",
    "Codec": "store.codecs",
    "TeacherOutput": "store.codecs",
    "register_codec": "store.codecs",
    "unregister_codec": "store.codecs",
    # replay: what a training loop consumes
    "Replay": "replay",
    "ReplayBatch": "replay",
    "rank_batches": "replay",
    # sources, recipes, plans, render
    "open_source": "source",
    "Source": "source",
    "WdsSource": "source_wds",
    "HFSource": "source_hf",
    "Recipe": "recipe",
    "load_recipe": "recipe",
    "make_plan": "plan",
    "render_views": "render",
    # models: the teacher and the student
    "Teacher": "teacher",
    "load_teacher": "teacher",
    "load_student": "resolve",
    "resolve_model": "resolve",
    "load_model": "resolve",
    "save_model": "rundir",
    "Classifier": "models",
    # losses of (student logits, teacher logits), attention transfer, the tail, train's schedule
    "kl": "losses",
    "ttm": "losses",
    "wttm": "losses",
    "dist": "losses",
    "dih": "losses",
    "soft_cross_entropy": "losses",
    "mixed_label_targets": "losses",
    "get_loss": "losses",
    "at_loss": "attention",
    "attention_map": "attention",
    "reconstruct": "softlabel",
    "marginal_target": "softlabel",
    "sampled_target": "softlabel",
    "warmup_cosine": "schedule",
    "lr_schedule": "schedule",
    "build_optimizer": "optim",
    "Lamb": "optim",
    "WeightsEma": "ema",
    # the commands' configs and the functions whose names are not their modules'
    "PrecomputeConfig": "precompute",
    "TrainConfig": "train",
    "read_students": "students",
    "train_students": "students",
    "evaluate_model": "evaluate",
    "inspect_store": "inspect",
    "fit_heads": "heads",
    "HeadsConfig": "heads",
    # errors
    "KdlibError": "errors",
    "ConfigError": "errors",
    "SourceError": "errors",
    "ModelError": "errors",
    "StoreError": "errors",
    "StoreMismatchError": "errors",
    "CorruptStoreError": "errors",
    "StorageError": "errors",
}
_COMMANDS = ("precompute", "train", "verify", "evaluate")  # modules, each holding the function of its name

__all__ = ["__version__", *_COMMANDS, *_HOMES]


def __getattr__(name: str) -> Any:
    if name in _COMMANDS:  # the module, whatever was imported before (a submodule import would set it anyway)
        return importlib.import_module(f".{name}", __name__)
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'kdlib' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what type checkers and IDEs see
    from . import evaluate, precompute, train, verify
    from .attention import at_loss, attention_map
    from .ema import WeightsEma
    from .errors import (
        ConfigError,
        CorruptStoreError,
        KdlibError,
        ModelError,
        SourceError,
        StorageError,
        StoreError,
        StoreMismatchError,
    )
    from .evaluate import evaluate_model
    from .heads import HeadsConfig, fit_heads
    from .inspect import inspect_store
    from .losses import dih, dist, get_loss, kl, mixed_label_targets, soft_cross_entropy, ttm, wttm
    from .models import Classifier
    from .optim import Lamb, build_optimizer
    from .plan import make_plan
    from .precompute import PrecomputeConfig
    from .recipe import Recipe, load_recipe
    from .render import render_views
    from .replay import Replay, ReplayBatch, rank_batches
    from .resolve import load_model, load_student, resolve_model
    from .rundir import save_model
    from .schedule import lr_schedule, warmup_cosine
    from .softlabel import marginal_target, reconstruct, sampled_target
    from .source import Source, open_source
    from .source_hf import HFSource
    from .source_wds import WdsSource
    from .store import Store, StoreMeta, create_store, open_store
    from .store.codecs import Codec, TeacherOutput, register_codec, unregister_codec
    from .students import read_students, train_students
    from .teacher import Teacher, load_teacher
    from .train import TrainConfig
