"""Several students, one pass: each batch of a store is read, decoded and rendered once and fed to N students.

A students file names the students and what they share (`kdlib train --shards S --students FILE`)::

    # every key at the top is shared by all students (any `kdlib train` setting)
    batch_size: 128
    epochs: 10
    students:                       # each: its own run dir, and any setting of its own
      - {out: runs/r8, student: resnet8}
      - {out: runs/r20-dist, student: resnet20, loss: dist, lr: 0.001, seed: 1}

Precedence, as everywhere in kdlib: flags given on the command line > a student's entry > the file's
top > `--config` > defaults.

Each student is a `StudentRun` (kdlib.train): its own model, loss, optimizer, schedule, EMA, seed, run
dir, checkpoint and resume. Its random generators are its own too (`_Generators`, swapped in around
everything it does), so its run dir is what `kdlib train` writes for it alone, bit for bit on CPU.
What one pass cannot give each student its own is in `SHARED`, with the reason; students that differ
there are refused before anything starts. A student whose loss turns non-finite (or that runs out of
memory) stops with one line naming it; the others go on, its last checkpoint is kept, and the pass can
be resumed with or without it (`--resume`: each run dir goes on from its own checkpoint; the replay
starts at the earliest of them and each student joins at its own step).
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm import tqdm

from .checkpoint import FAILED, check_out_dir, clear_run, lock_run, mark_failed, read_failed, training_settings
from .errors import ConfigError, NonFiniteLossError
from .plots import save_curves
from .replay import Replay
from .rundir import save_model
from .runtime import check_world, end_trackers
from .source_base import using_storage_options
from .store.base import LOCK
from .targets import Targets, choose_targets
from .train import (
    StudentRun,
    TrainConfig,
    _broadcast_float,
    _check_compile,
    _check_test_split,
    _data_arg,
    _describe_failure,
    _padded,
    _run_extra,
    _test_source,
    _truncate_logs,
    _warn_target_error,
    recorded,
    resolve_config,
    run_lr,
)

__all__ = ["SHARED", "read_students", "check_students", "train_students"]

# What one pass shares, and why each must be equal for every student.
SHARED = {
    "shards": "the pass replays one store",
    "data": "the views are rendered from one source",
    "recipe": "the recipe decides the views",
    "limit": "it decides which images the views come from",
    "stored_epochs": "it decides which stored epochs are replayed",
    "batch_size": "it cuts the views into the batches every student steps on",
    "epochs": "the pass replays the views once, for this many epochs",
    "workers": "one feed reads and decodes for every student",
    "render": "one feed renders for every student",
    "cpu": "one accelerator (one device) runs every student",
    "mixed_precision": "one accelerator runs every student",
    "resume": "the pass starts (or goes on) for every student alike",
    "overwrite": "the pass starts (or goes on) for every student alike",
    "storage_options": "one feed opens the store and the data",
}
# Settings one pass does not offer at all (each with what to do instead).
REFUSED = {
    "teacher": "--students replays a store; an online --teacher is not shared: precompute a store "
    "(`kdlib precompute`) and give --shards",
    "log_with": "--log-with logs one run; drop it with --students (each run dir keeps steps.jsonl and metrics.jsonl)",
}
_KNOWN = {f.name for f in fields(TrainConfig)}


# -- the students file ---------------------------------------------------------------------------
def read_students(
    path: str | Path, flags: dict[str, Any] | None = None, given: set[str] = frozenset(), config_file: str | None = None
) -> list[TrainConfig]:
    """The students of a students file, each a full `TrainConfig`, checked together (`check_students`).

    `flags`: the command line's values (`given`: those the user typed, which override the file)."""
    path = Path(path)
    where = f"students file {path}"
    if not path.is_file():
        raise ConfigError(f"{where} not found; give a YAML file with a `students:` list (see `kdlib train -h`)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where} is not valid YAML ({str(exc).splitlines()[0]}); fix it") from exc
    if not isinstance(data, dict) or not isinstance(data.get("students"), list) or not data["students"]:
        raise ConfigError(f"{where} must hold a mapping with a non-empty `students:` list of mappings")
    top = {k: v for k, v in data.items() if k != "students"}
    _check_keys(top, where, top_level=True)
    flags = dict(flags or {})
    if "out" in given:
        raise ConfigError(f"--out with --students: each student of {path} names its own `out`; drop --out")
    cfgs = []
    for i, entry in enumerate(data["students"]):
        at = f"{where}, student {i}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{at} must be a mapping of settings, e.g. {{out: runs/a, student: resnet8}}")
        _check_keys(entry, at, top_level=False)
        if not entry.get("out"):
            raise ConfigError(f"{at} has no `out`: give each student its own run dir")
        values = {**flags, **{k: v for k, v in {**top, **entry}.items() if k not in given}}
        try:
            cfgs.append(resolve_config(values, set(given) | set(top) | set(entry), config_file))
        except ConfigError as exc:
            raise ConfigError(f"{at} (out {entry['out']}): {exc}") from exc
    check_students(cfgs, where)
    return cfgs


def _check_keys(values: dict[str, Any], where: str, top_level: bool) -> None:
    unknown = sorted(set(values) - _KNOWN)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys: {sorted(_KNOWN)} (and `students`)")
    if top_level and "out" in values:
        raise ConfigError(f"{where}: `out` at the top would be shared; give each student its own `out`")
    for key in sorted(set(values) & set(REFUSED)):
        if values[key]:
            raise ConfigError(f"{where}: {REFUSED[key]}")
    if not top_level:
        shared = sorted(set(values) & set(SHARED))
        if shared:
            raise ConfigError(
                f"{where}: {', '.join(shared)} cannot differ between students of one pass "
                f"({'; '.join(f'{k}: {SHARED[k]}' for k in shared)}); give it once, at the top of the file"
            )


def check_students(cfgs: list[TrainConfig], where: str = "students") -> None:
    """Refuse students that cannot share one pass: one run dir each, and equal `SHARED` settings."""
    if not cfgs:
        raise ConfigError(f"{where}: no students")
    seen: dict[Path, int] = {}
    for i, cfg in enumerate(cfgs):
        out = Path(cfg.out).expanduser().resolve()
        if out in seen:
            raise ConfigError(
                f"{where}: students {seen[out]} and {i} both write into --out {cfg.out}; give each its own out"
            )
        for other, j in seen.items():  # one run dir inside another: its --overwrite, best/ or ema/ would hit it
            if other in out.parents or out in other.parents:
                inner, outer = (i, j) if other in out.parents else (j, i)
                raise ConfigError(
                    f"{where}: student {inner}'s out {cfgs[inner].out} is inside student {outer}'s out "
                    f"{cfgs[outer].out}; give each its own out, side by side"
                )
        seen[out] = i
        for key, why in REFUSED.items():
            if getattr(cfg, key):
                raise ConfigError(f"{where}, student {i} (out {cfg.out}): {why}")
    for key, why in SHARED.items():
        values = [getattr(c, key) for c in cfgs]
        if any(v != values[0] for v in values[1:]):
            secret = key == "storage_options"  # may hold credentials: say which differ, never the values
            shown = ", ".join(
                f"{c.out}: {('set' if v else 'not set') if secret else repr(v)}" for c, v in zip(cfgs, values)
            )
            raise ConfigError(
                f"{where}: {key} differs between students ({shown}), and one pass needs it shared "
                f"({why}); give it once for all, or train the odd one alone"
            )


# -- each student's random generators ------------------------------------------------------------
def _capture() -> tuple[Any, ...]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return torch.get_rng_state(), cuda, np.random.get_state(), random.getstate()


def _restore(state: tuple[Any, ...]) -> None:
    cpu, cuda, numpy_state, python_state = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
    np.random.set_state(numpy_state)
    random.setstate(python_state)


class _Generators:
    """One student's global generators (torch CPU and CUDA, numpy, Python), seeded as `kdlib train`
    seeds them and swapped in around everything the student does: what it draws (dropout, a DataLoader's
    seed at evaluation) and what its checkpoint records are what a run of its own would have."""

    def __init__(self, seed: int) -> None:
        set_seed(seed)
        self.state = _capture()

    @contextmanager
    def active(self) -> Iterator[None]:
        _restore(self.state)
        try:
            yield
        finally:
            self.state = _capture()


def _feed_started() -> None:
    """What starting the feed draws from the global generators (a DataLoader iterator takes its base
    seed), drawn in a student's own: a run of its own starts its feed after building the student."""
    iter(DataLoader([0], batch_size=None))


# -- the pass --------------------------------------------------------------------------------------
@dataclass
class _Student:
    """A `StudentRun` and where it stands in the pass."""

    index: int
    cfg: TrainConfig
    targets: Targets
    rng: _Generators
    name: str = ""
    run: StudentRun | None = None
    spe: int = 0  # its optimizer steps per epoch
    start: int = 0  # the optimizer step it (re)starts from
    step: int = 0
    replace_run: bool = False
    failed: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # the step being accumulated, and the epoch's counters
    losses: list[torch.Tensor] = field(default_factory=list)
    images: list[torch.Tensor] = field(default_factory=list)
    finite: list[Any] = field(default_factory=list)
    first_start: int = 0
    n: int = 0
    views_seen: int = 0


def train_students(cfgs: list[TrainConfig]) -> dict[str, Any]:
    """Train several students from one pass over a store (one replay feeding several models); -> per
    student the summary `kdlib.train.train` gives, and the students that failed (`failed`: out, error)."""
    with ExitStack() as held:
        held.enter_context(using_storage_options(cfgs[0].storage_options if cfgs else None))
        return _train_students(cfgs, held)


def _train_students(cfgs: list[TrainConfig], held: ExitStack) -> dict[str, Any]:
    check_students(cfgs)
    first = cfgs[0]
    accelerator = Accelerator(mixed_precision=first.mixed_precision, cpu=first.cpu)
    check_world(accelerator.num_processes)
    if accelerator.mixed_precision == "fp16":
        raise ConfigError(
            "--students with fp16 mixed precision: the accelerator keeps one loss scale, and the students would "
            "share it (each run alone has its own); use --mixed-precision bf16 or no, or train them apart"
        )
    world, device = accelerator.num_processes, accelerator.device
    # 1. prepare: every check of every student before anything is built or written
    students: list[_Student] = []
    for i, cfg in enumerate(cfgs):
        if cfg.compile:
            _check_compile(device)
        replace_run = check_out_dir(Path(cfg.out), cfg.resume, cfg.overwrite)
        rng = _Generators(cfg.seed)
        with rng.active():
            targets = choose_targets(cfg, device)  # each its own (the loss decides what stored labels become)
        if (
            cfg.keep_best
            and cfg.keep_best.endswith("agreement")
            and (targets.store is None or targets.store.meta.test is None)
        ):
            raise ConfigError(
                f"student {i} (out {cfg.out}): --keep-best {cfg.keep_best} needs the teacher's test predictions "
                "in the store (precomputed with its test split); rank by top1 instead"
            )
        if cfg.eval or cfg.eval_every:
            _check_test_split(cfg, targets)
        name = Path(cfg.out).name or str(i)
        if any(other.name == name for other in students):  # the bar needs one label per student
            name = f"{i}:{name}"
        students.append(_Student(i, cfg, targets, rng, name=name, replace_run=replace_run))
    shared = students[0].targets
    if len({s.targets.stored_epochs for s in students}) > 1:  # a precompute committed an epoch meanwhile
        raise ConfigError(
            f"store {first.shards} gained an epoch while the students opened it; start again (or give "
            "stored_epochs at the top of the students file)"
        )
    if shared.store is not None and accelerator.is_main_process:
        writer = shared.store.writer()
        if writer is not None:
            accelerator.print(
                f"notice: store {shared.store.url} is being written by {writer} ({LOCK}); "
                f"{shared.store.meta.epochs_done} of its epochs are committed and only those are used"
            )
    replay = Replay(
        shared,
        batch_size=first.batch_size,
        epochs=first.epochs,
        device=device,
        rank=accelerator.process_index,
        world=world,
        workers=first.workers,
        render=first.render,
    )
    bpe = replay.steps_per_epoch  # global batches per epoch, the same for every student
    if shared.stored_epochs is not None and first.epochs > shared.stored_epochs:
        accelerator.print(
            f"notice: training {first.epochs} epochs from {shared.stored_epochs} stored epoch(s); stored epochs "
            f"are cycled (epoch e replays stored epoch e mod {shared.stored_epochs})"
        )
    for s in students:
        s.spe = -(-bpe // s.cfg.grad_accum)  # its optimizer steps per epoch
        with s.rng.active():
            s.run = StudentRun(s.cfg, accelerator, s.targets, s.spe, s.spe * s.cfg.epochs)
            if s.targets.store is not None and s.cfg.loss != "ce" and accelerator.is_main_process:
                _warn_target_error(s.targets.store, s.cfg, accelerator)
            if s.cfg.resume:
                failed = read_failed(Path(s.cfg.out))
                if failed is not None:
                    accelerator.print(
                        f"notice: student {s.name}: the run in {s.cfg.out} stopped at step {failed.get('step')}: "
                        f"{_describe_failure(failed)}; it goes on from its last finite checkpoint"
                    )
                s.start = s.run.resume(s.spe * s.cfg.epochs)
            s.step = s.start
            _feed_started()
        s.extra = _run_extra(s.cfg, s.targets)
    # 3 (of the setup). write: each run dir locked, cleared if replaced, its config written
    for s in students:
        _open_run_dir(s, accelerator, held, world)
    replay.start_step = min(_first_batch(s, s.start, bpe) for s in students)
    batches = iter(replay)
    # 2. the loop: global batch by global batch; each student takes those from its own step on
    logits_of: dict[Any, Any] = {}
    shown: dict[str, str] = {}
    b = replay.start_step
    total = bpe * first.epochs
    for epoch in range(b // bpe, first.epochs):
        live = [s for s in students if s.failed is None and s.step < s.spe * (epoch + 1)]
        for s in live:
            s.run.model.train()
            s.n = s.spe * (epoch + 1) - s.step
            s.run.log.epoch_losses, s.views_seen = [], 0
        t0 = time.time()
        end = min((epoch + 1) * bpe, total)
        bar = tqdm(
            total=end - b, unit="batch", desc=f"train epoch {epoch}", disable=not accelerator.is_local_main_process
        )
        while b < end:
            item = next(batches).item
            logits_of.clear()
            for s in live:
                if s.failed is None and b >= _first_batch(s, s.step, bpe):
                    _feed(s, item, b, bpe, epoch, accelerator, logits_of, shown)
            b += 1
            bar.update(1)
            if shown:
                bar.set_postfix(shown, refresh=False)
        bar.close()
        dt = time.time() - t0
        for s in live:
            if s.failed is None:
                _guarded(s, accelerator, lambda s=s: _end_epoch(s, epoch, dt, accelerator, world))
    accelerator.wait_for_everyone()
    # 3. save and evaluate each student that finished
    result: dict[str, Any] = {"students": [], "failed": [], "world_size": world}
    done = [s for s in students if s.failed is None]
    if accelerator.is_main_process:  # every model saved before any evaluation: a failing one loses none
        for s in done:
            for sub, module in s.run.final_modules().items():
                save_model(module, Path(s.cfg.out) / sub, extra=s.extra)
    for s in done:
        with s.rng.active():
            result["students"].append(_finish(s, accelerator, world))
    result["failed"] = [
        {"out": s.cfg.out, "student": s.cfg.student, "error": s.failed} for s in students if s.failed is not None
    ]
    accelerator.wait_for_everyone()
    end_trackers(accelerator)  # not end_training(): it destroys the process group, which a script's next command needs
    return result


def _first_batch(s: _Student, step: int, bpe: int) -> int:
    """The global batch that student `s`'s optimizer step `step` starts at."""
    return (step // s.spe) * bpe + (step % s.spe) * s.cfg.grad_accum


def _open_run_dir(s: _Student, accelerator: Accelerator, held: ExitStack, world: int) -> None:
    """As `kdlib train` does before its first step: lock, clear (--overwrite), write train_config.json."""
    cfg, out = s.cfg, Path(s.cfg.out)
    if not accelerator.is_main_process:
        return
    held.callback(lock_run(out).release)
    if s.replace_run:
        clear_run(out)
    (out / FAILED).unlink(missing_ok=True)
    (out / "train_config.json").write_text(
        json.dumps(
            {
                **recorded(cfg),
                "recipe": s.targets.recipe.to_dict(),
                "world_size": world,
                "training": training_settings(cfg),
                "run_lr": run_lr(cfg),
                "views_per_step": cfg.batch_size * cfg.grad_accum,
            },
            indent=1,
        )
    )
    _truncate_logs(out, s.start, s.spe)


def _logits(s: _Student, item: dict[str, Any], device: torch.device, cache: dict[Any, Any]) -> Any:
    """The student's targets of this batch, decoded once per kind of target (students with the same
    loss temperature and label kind share them)."""
    t = s.targets
    key = (type(t), getattr(t, "soft_target", None), getattr(t, "target_temperature", None), t.dih_heads)
    if key not in cache:
        cache[key] = (t.logits(item, device), t.logits_finite)
    return cache[key]


def _feed(
    s: _Student,
    item: dict[str, Any],
    b: int,
    bpe: int,
    epoch: int,
    accelerator: Accelerator,
    cache: dict[Any, Any],
    shown: dict[str, str],
) -> None:
    """One global batch into student `s`: its backward, and at the last batch of its step the step, as
    `kdlib train`'s loop does it."""

    def work() -> None:
        run, cfg = s.run, s.cfg
        accum = cfg.grad_accum
        first = _first_batch(s, s.step, bpe)
        k = min(accum, bpe - (s.step % s.spe) * accum)
        j = b - first
        teacher, finite = _logits(s, item, accelerator.device, cache)
        if j == 0:
            run.optimizer.zero_grad(set_to_none=True)
            s.losses, s.images, s.finite, s.first_start = [], [], [], item["start"]
        with accelerator.no_sync(run.model) if j < k - 1 else nullcontext():
            s.losses.append(run.backward(item, teacher, accelerator.device, k))
        s.images.append(item["image_cpu"])
        s.finite.append(finite)
        if j < k - 1:
            return
        run.step()
        s.step += 1
        s.views_seen += k * cfg.batch_size
        rec = {
            "step": s.step,
            "epoch": epoch,
            "lr": run.scheduler.get_last_lr()[0],
            "world_size": accelerator.num_processes,
        }
        if k == 1 and accum == 1:
            loss, image, teacher_ok = s.losses[0], s.images[0], s.finite[0]
        else:
            loss = torch.stack([x.detach().float() for x in s.losses]).mean()
            image = _padded(torch.cat(s.images), accum * len(s.images[0]))
            teacher_ok = None if s.finite[0] is None else torch.stack(s.finite).all()
        if run.log.add(rec, loss, image, s.first_start, teacher_ok):
            shown[s.name] = f"{run.flush():.4f}"
        if cfg.checkpoint_every and s.step % cfg.checkpoint_every == 0 and s.step % s.spe:
            run.flush()
            run.save_checkpoint(s.step, epoch)

    _guarded(s, accelerator, work)
    if s.failed is not None:
        shown[s.name] = "stopped"


def _guarded(s: _Student, accelerator: Accelerator, work: Any) -> None:
    """Run `work` in the student's generators; a non-finite loss or running out of memory stops this
    student alone, with one line naming it."""
    try:
        with s.rng.active():
            work()
    except NonFiniteLossError as exc:  # StudentRun.stop wrote failed.json; its checkpoint is kept
        _stopped(s, accelerator, str(exc))
    except torch.OutOfMemoryError as exc:
        _out_of_memory(s, accelerator, exc)


def _out_of_memory(s: _Student, accelerator: Accelerator, exc: BaseException) -> None:
    run, out = s.run, Path(s.cfg.out)
    kept = (
        f"its last checkpoint (step {run.last_ckpt}) is kept in {run.ckpt}"
        if run.last_ckpt is not None
        else "no checkpoint was written before it"
    )
    if accelerator.is_main_process:
        info = {"step": s.step + 1, "epoch": s.step // s.spe, "loss": None, "reason": "memory"}
        try:
            mark_failed(out, {**info, "student": s.cfg.student, "teacher": None, "last_checkpoint": run.last_ckpt})
        except OSError:
            pass
    detail = str(exc).splitlines()[0] if str(exc) else "out of memory"
    _stopped(
        s,
        accelerator,
        f"student {s.cfg.student} ({out}) ran out of memory at step {s.step + 1} ({detail}): training stopped for "
        f"it, {kept} and {out / FAILED} says so; train it alone (`kdlib train ... --out {out} --resume`) "
        "or with a smaller student",
    )


def _stopped(s: _Student, accelerator: Accelerator, line: str) -> None:
    """Drop a failed student from the pass, freeing what it holds; the others go on."""
    s.failed = line
    if accelerator.is_main_process:
        tqdm.write(f"error: {line} (the other students go on)", file=sys.stderr)  # on a line of its own
    run = s.run
    run.optimizer.zero_grad(set_to_none=True)
    s.losses, s.images, s.finite = [], [], []
    run.log.rows = []
    s.run = None
    # let go of its model and optimizer (accelerator.free_memory would drop every student's)
    for held, obj in (
        (getattr(accelerator, "_models", []), run.model),
        (getattr(accelerator, "_optimizers", []), run.optimizer),
    ):
        if any(x is obj for x in held):
            held.remove(obj)
    del run
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _end_epoch(s: _Student, epoch: int, dt: float, accelerator: Accelerator, world: int) -> None:
    """As `kdlib train` ends an epoch: flush, --eval-every, metrics.jsonl, --keep-best, checkpoint."""
    run, cfg, out = s.run, s.cfg, Path(s.cfg.out)
    log = run.log
    run.flush()
    run.check_weights(s.step, epoch)  # before the evaluation and --keep-best see them
    stored = s.targets.stored_epochs
    rec = {
        "epoch": epoch,
        "stored_epoch": epoch % stored if stored else None,
        "steps": s.n,
        "loss": sum(log.epoch_losses) / max(len(log.epoch_losses), 1),
        "lr": run.scheduler.get_last_lr()[0],
        "seconds": round(dt, 3),
        "views_per_s": round(s.views_seen / max(dt, 1e-9), 1),
        "world_size": world,
    }
    if cfg.eval_every and (epoch + 1) % cfg.eval_every == 0 and epoch + 1 < cfg.epochs:
        rec["eval"] = run.evaluate(_test_source(cfg, s.targets), s.targets.recipe, cfg.shards, cfg.workers)
    if accelerator.is_main_process:
        if s.n < s.spe:  # resumed mid-epoch: the epoch's loss is over all its steps, as logged
            losses = [
                r["loss"]
                for r in map(json.loads, (out / "steps.jsonl").read_text().splitlines())
                if r["epoch"] == epoch and r["loss"] is not None
            ]
            rec["loss"] = sum(losses) / max(len(losses), 1)
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec, allow_nan=False) + "\n")
    if cfg.keep_best == "loss":
        rec["loss"] = _broadcast_float(accelerator, rec["loss"])
    if cfg.keep_best == "loss" or "eval" in rec:
        run.keep_best(rec, s.step, s.extra)
    run.save_checkpoint(s.step, epoch)  # last, as in `kdlib train`
    accelerator.print(
        f"epoch {epoch} [{s.name}]: loss {rec['loss']:.4f}, {rec['views_per_s']:.0f} views/s"
        + (f", test top-1 {rec['eval']['top1']:.4f}" if "eval" in rec else "")
        + (f", EMA {rec['eval']['ema']['top1']:.4f}" if "ema" in rec.get("eval", {}) else "")
    )


def _finish(s: _Student, accelerator: Accelerator, world: int) -> dict[str, Any]:
    """As `kdlib train` ends (its model saved): evaluate, write the final metrics and curves."""
    run, cfg, out = s.run, s.cfg, Path(s.cfg.out)
    result: dict[str, Any] = {"out": str(out), "world_size": world, "steps": s.step}
    if cfg.eval:
        metrics = run.evaluate(_test_source(cfg, s.targets), s.targets.recipe, cfg.shards, cfg.workers)
        ema_metrics = metrics.pop("ema", None)
        result["eval"] = {"model": str(out), "data": _data_arg(cfg, s.targets), "split": "test", **metrics}
        if ema_metrics is not None:
            result["eval_ema"] = {
                "model": str(out / "ema"),
                "data": result["eval"]["data"],
                "split": "test",
                **ema_metrics,
            }
        if cfg.keep_best and cfg.keep_best != "loss":
            run.keep_best({"epoch": cfg.epochs - 1, "eval": {**metrics, "ema": ema_metrics or {}}}, s.step, s.extra)
    if accelerator.is_main_process:
        if cfg.eval:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"final_eval": result["eval"]}, allow_nan=False) + "\n")
                if "eval_ema" in result:
                    f.write(json.dumps({"final_eval_ema": result["eval_ema"]}, allow_nan=False) + "\n")
            accelerator.print(json.dumps(result["eval"]))
        save_curves(out)
    if run.best is not None:
        result["best"] = {**run.best, "model": str(out / "best")}
    return result
