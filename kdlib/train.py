"""Train a student: from a store (distillation, no teacher), online (teacher in memory), or on labels.

One readable loop, three sources of targets for the same views:

- `--shards S`: views and soft labels replayed from the store; the teacher is never loaded.
- `--teacher T`: the same plan rendered on the fly and the teacher run on it (the baseline
  users would otherwise run; per-step losses match the cached run up to fp16 storage).
- neither: plain supervised training on (mixed) ground-truth labels, `--loss ce`.

Steps: 1. prepare (source, recipe, epochs of params, the student's state: model, optimizer,
schedule, EMA, loss; the test split is checked now, not after the schedule), 2. loop over epochs of
optimizer steps, each of `--grad-accum` global batches (each rank renders only its slice of each
batch), 3. save (model, EMA, config, metrics), then evaluate on the test split.
Multi-process with `accelerate launch -m kdlib train`.

The student's state is one `StudentRun` (model, optimizer, schedule, EMA, loss, run dir, checkpoint):
the loop feeds it the views and targets of each step.

`--grad-accum N` multiplies the batch, as in accelerate and timm: an optimizer step sums the
gradients of N consecutive global batches of `--batch-size` views, so it sees B x N views (the
`--lr-base-batch` scaling counts those). Global batch j of a step is the same views on any number
of processes (DESIGN invariant 6). An epoch whose global batches are not a multiple of N ends
with one shorter step, whose loss is the mean over its batches (as timm does).

One `kdlib train` per run dir (a flock on --out/train.lock, held by the main process). Training
stops at the first non-finite loss (or online teacher logit, or weight before a checkpoint) with a
`NonFiniteLossError`; the last finite checkpoint is kept and --out/failed.json says what happened.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from tqdm import tqdm  # not tqdm.auto: its asyncio tqdm iterates a DataLoader twice (tqdm#1598)

from ._checks import TRAIN_NUMBERS, check_numbers
from .batchnorm import convert_batchnorm, revert_batchnorm
from .checkpoint import (
    FAILED,
    check_out_dir,
    check_resume,
    clear_run,
    find_checkpoint,
    load_checkpoint,
    lock_run,
    mark_failed,
    math_config,
    read_failed,
    read_state,
    save_checkpoint,
    training_settings,
)
from .ema import WeightsEma
from .errors import ConfigError, NonFiniteLossError, SourceError
from .evaluate import evaluate_model
from .losses import loss_settings, target_error, target_loss, training_loss
from .optim import OPTIMIZERS, build_optimizer, optimizer_settings
from .plots import save_curves
from .replay import Replay
from .resolve import load_student
from .rundir import CONFIG_NAME, atomic_write, save_model
from .runtime import check_world, end_trackers
from .schedule import SCHEDULES, lr_schedule, schedule_settings, warmup_steps
from .softlabel import reconstruct
from .source import open_source
from .source_base import using_storage_options
from .store import Store
from .store.base import LOCK
from .store.codecs import decode_chunk, sampled_temperature
from .targets import Targets, attention_term, choose_targets

__all__ = ["TrainConfig", "StudentRun", "KEEP_BEST", "resolve_config", "train"]


@dataclass
class TrainConfig:
    """Everything `kdlib train` takes (the CLI's flags, a train/*.yaml config's keys); see `kdlib train -h`."""

    out: str
    student: str = "resnet8"
    shards: str | None = None
    data: str | None = None
    teacher: str | None = None
    recipe: str | None = None
    loss: str = "kl"
    temperature: float = 1.0
    gamma: float = 0.5
    ce_weight: float = 0.0
    epochs: int = 1
    batch_size: int = 128  # global, in views, over all processes
    lr: float = 2e-3
    weight_decay: float = 5e-4
    warmup: float | None = None  # fraction of all steps (0.05 unless warmup_epochs says otherwise)
    clip: float = 1.0
    mixed_precision: str | None = None  # None: what accelerate's config (or ACCELERATE_MIXED_PRECISION) says
    precision: str | None = None  # online teacher's forward (fp32, tf32, bf16); None: bf16 on CUDA, fp32 on CPU
    render: str = "auto"  # where views are rendered: device, workers, auto (see kdlib.feed)
    log_every: int = 50  # steps between host reads of the loss (steps.jsonl keeps every step)
    workers: int = 2
    limit: int | None = None
    seed: int = 0  # student init (the views' seed is the recipe's)
    weights: str | None = None
    resume: bool = False
    stored_epochs: int | None = None  # use only the first N stored epochs (cycled); default: all
    checkpoint_every: int = 100  # steps; a checkpoint is also written at every epoch end
    eval: bool = True
    eval_every: int = 0  # epochs between test-split evaluations during training (0: at the end only)
    cpu: bool = False
    # issue 13: DIH (--loss dih, the reference's defaults) and attention transfer (added to any loss)
    dih_alpha: float = 0.1
    dih_temperature: float = 5.0
    attention_student: str | None = None  # student layers, comma-separated (stageN or net paths)
    attention_teacher: str | None = None  # online only: the teacher's layers (default: the student's names)
    attention_weight: float = 1e3  # beta of the reference
    attention_grid: int | None = None  # online only (default 8); a store's maps say their own grid
    mean: str | None = None  # the student's input contract when --weights do not define one
    std: str | None = None
    # the online teacher (--teacher), as precompute takes it
    teacher_weights: str | None = None
    teacher_mean: str | None = None
    teacher_std: str | None = None
    class_map: str | None = None
    trust_code: bool = False
    overwrite: bool = False  # replace the run files in an existing --out (else a used --out is refused)
    soft_target: str | None = None  # a store's labels as: topk, marginal (FKD), sampled; None: the store's kind
    # issue 19: the optimizer, its schedule, and what users expect of a trainer
    optimizer: str = "adamw"  # sgd, adamw, lamb
    momentum: float | None = None  # sgd only (default 0.9)
    nesterov: bool = False  # sgd only
    decay_norm_bias: bool | None = None  # None: False for sgd and lamb (no decay on norm/bias), True for adamw
    lr_base_batch: int | None = None  # --lr is the rate for this many views per optimizer step (scaled linearly)
    schedule: str = "cosine"  # cosine, step, constant
    warmup_epochs: float | None = None  # warmup in epochs instead of --warmup's fraction of all steps
    min_lr: float | None = None  # cosine only: the lr it ends at (default 0)
    milestones: list[int] | None = None  # step only: epochs at which the lr is multiplied by step_gamma
    step_gamma: float | None = None  # step only (default 0.1)
    label_smoothing: float = 0.0  # of the label target of every CE term
    grad_accum: int = 1  # global batches per optimizer step
    ema: float | None = None  # decay of an EMA of the weights, evaluated and saved beside them
    compile: bool = False  # torch.compile the student
    log_with: str | None = None  # accelerate trackers, comma-separated (tensorboard, wandb, ...)
    keep_best: str | None = None  # keep the best model by this metric in --out/best (KEEP_BEST)
    # fsspec's options for an s3://... store and data (`--storage-options`; default: $KDLIB_STORAGE_OPTIONS and
    # the AWS_* variables); not recorded in the run dir (they may hold credentials)
    storage_options: dict[str, Any] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        check_numbers(vars(self), TRAIN_NUMBERS, "train config")
        _check_options(self)


# --keep-best metrics: of the test-split evaluations during training (--eval-every), of the EMA's, or
# the epoch's training loss (lower is better)
KEEP_BEST = ("top1", "top5", "agreement", "ema_top1", "ema_top5", "ema_agreement", "loss")


def _check_options(cfg: TrainConfig) -> None:
    """Refuse, before anything is built, a setting the chosen optimizer or schedule does not take."""

    def bad(what: str) -> None:
        raise ConfigError(f"train config: {what}")

    if isinstance(cfg.milestones, str):  # the command line's spelling, "30,60,90"
        try:
            cfg.milestones = [int(m) for m in cfg.milestones.split(",") if m.strip()]
        except ValueError:
            bad(f"--milestones {cfg.milestones!r} must be whole epochs separated by commas, e.g. 30,60,90")

    for name in ("nesterov", "compile"):
        if not isinstance(getattr(cfg, name), bool):
            bad(f"{name}={getattr(cfg, name)!r} must be true or false")
    if cfg.decay_norm_bias is not None and not isinstance(cfg.decay_norm_bias, bool):
        bad(f"decay_norm_bias={cfg.decay_norm_bias!r} must be true or false")
    for name, v in (
        ("grad_accum", cfg.grad_accum),
        ("lr_base_batch", 1 if cfg.lr_base_batch is None else cfg.lr_base_batch),
    ):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            bad(f"{name}={v!r} must be a whole number >= 1")
    if not isinstance(cfg.label_smoothing, (int, float)) or isinstance(cfg.label_smoothing, bool):
        bad(f"label_smoothing={cfg.label_smoothing!r} must be a number in [0, 1)")
    if cfg.optimizer not in OPTIMIZERS:
        bad(f"--optimizer {cfg.optimizer!r} is unknown; choose one of {', '.join(OPTIMIZERS)}")
    if cfg.schedule not in SCHEDULES:
        bad(f"--schedule {cfg.schedule!r} is unknown; choose one of {', '.join(SCHEDULES)}")
    if cfg.optimizer != "sgd":
        for flag, given in (("--momentum", cfg.momentum is not None), ("--nesterov", cfg.nesterov)):
            if given:
                bad(f"{flag} applies to --optimizer sgd only, and this run uses {cfg.optimizer}: drop {flag}")
    elif cfg.nesterov and cfg.momentum == 0:
        bad("--nesterov needs momentum: give --momentum above 0 (default 0.9) or drop --nesterov")
    if cfg.schedule != "step":
        for flag, given in (("--milestones", cfg.milestones is not None), ("--step-gamma", cfg.step_gamma is not None)):
            if given:
                bad(f"{flag} applies to --schedule step only, and this run uses {cfg.schedule}: drop {flag}")
    else:
        ms = cfg.milestones
        if not ms or not isinstance(ms, (list, tuple)):
            bad("--schedule step needs --milestones: the epochs at which the lr drops, e.g. 30,60,90")
        if any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in ms) or list(ms) != sorted(set(ms)):
            bad(f"milestones={list(ms)!r} must be increasing whole epochs >= 1, e.g. 30,60,90")
        if ms[-1] >= cfg.epochs:
            bad(f"milestone epoch {ms[-1]} is not before --epochs {cfg.epochs}: it would never apply")
    if cfg.min_lr is not None:
        if cfg.schedule != "cosine":
            bad(f"--min-lr applies to --schedule cosine only, and this run uses {cfg.schedule}: drop --min-lr")
        if cfg.min_lr > run_lr(cfg):
            bad(f"--min-lr {cfg.min_lr:g} is above the run's lr {run_lr(cfg):g}: the cosine would rise")
    if cfg.warmup is not None and cfg.warmup_epochs is not None:
        bad("give --warmup (a fraction of all steps) or --warmup-epochs, not both")
    if cfg.warmup_epochs is not None and cfg.warmup_epochs > cfg.epochs:
        bad(f"--warmup-epochs {cfg.warmup_epochs:g} is longer than the run's --epochs {cfg.epochs}")
    if cfg.label_smoothing >= 1:
        bad(f"--label-smoothing {cfg.label_smoothing:g} must be below 1 (e.g. 0.1)")
    if cfg.label_smoothing and cfg.loss != "ce" and cfg.loss != "dih" and not cfg.ce_weight:
        bad(
            f"--label-smoothing smooths the labels of CE terms, and --loss {cfg.loss} with --ce-weight 0 has none: "
            "drop it, or add CE with --ce-weight"
        )
    if cfg.ema is not None and not 0 < cfg.ema < 1:
        bad(f"--ema {cfg.ema:g} must be in (0, 1): the decay of the average, e.g. 0.9999")
    if cfg.keep_best is not None:
        if cfg.keep_best not in KEEP_BEST:
            bad(f"--keep-best {cfg.keep_best!r} is unknown; choose one of {', '.join(KEEP_BEST)}")
        if cfg.keep_best.startswith("ema_") and cfg.ema is None:
            bad(f"--keep-best {cfg.keep_best} ranks the EMA's evaluations: give --ema DECAY")
        if cfg.keep_best != "loss" and not cfg.eval_every:
            bad(f"--keep-best {cfg.keep_best} compares evaluations during training: give --eval-every N")


def run_lr(cfg: TrainConfig) -> float:
    """The run's base lr: --lr, scaled by (views per optimizer step) / --lr-base-batch when that is given."""
    if cfg.lr_base_batch is None:
        return cfg.lr
    return cfg.lr * cfg.batch_size * cfg.grad_accum / cfg.lr_base_batch


def resolve_config(flags: dict[str, Any], given: set[str], config_file: str | None) -> TrainConfig:
    """Flags override the config file, the file overrides defaults; unknown keys are errors."""
    values = dict(flags)
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"train config not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"train config {path} must hold a mapping")
        known = {f.name for f in fields(TrainConfig)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"train config {path}: unknown key(s) {unknown}; known keys: {sorted(known)}")
        # the two spellings of warmup: the one given on the command line replaces the file's other one
        spelled = {"warmup": "warmup_epochs", "warmup_epochs": "warmup"}
        dropped = {spelled[k] for k in spelled if k in given}
        values.update({k: v for k, v in data.items() if k not in given and k not in dropped})
    if values.get("loss") is None:
        values["loss"] = "kl" if (values.get("shards") or values.get("teacher")) else "ce"
    return TrainConfig(**values)


# -- 1. prepare ----------------------------------------------------------------------------
TARGET_KL_WARN = 0.02  # nats (in the loss's units): above this the top-k tail visibly changes the target


def _warn_target_error(store: Store, cfg: TrainConfig, accelerator: Accelerator, chunks: int = 8) -> None:
    """Say so when the stored top-k target is far from the full one at this loss's temperature/gamma."""
    meta = store.meta
    if meta.k >= meta.num_classes or sampled_temperature(meta) is not None:  # sampled: unbiased; inspect measures it
        return
    if not meta.sample_views:
        accelerator.print(
            f"note: store keeps top-{meta.k} of {meta.num_classes} classes and no full-logit sample; "
            "the error of the stored target at this temperature is unmeasured"
        )
        return
    full, rec = [], []
    for chunk in range(min(chunks, meta.chunks_per_epoch)):
        cols = decode_chunk(store.read_chunk(0, chunk), meta)
        n = len(cols["full"])
        full.append(torch.from_numpy(cols["full"]).float())
        rec.append(
            reconstruct(
                torch.from_numpy(cols["ids"][:n].astype(np.int64)),
                torch.from_numpy(cols["logits"][:n]),
                torch.from_numpy(cols["lse"][:n]),
                meta.num_classes,
            )
        )
    loss, params = target_loss(cfg.loss, loss_settings(cfg.loss, cfg))
    err = target_error(torch.cat(full), torch.cat(rec), loss, **params)
    if err["kl_mean_scaled"] > TARGET_KL_WARN:
        accelerator.print(
            f"warning: at {cfg.loss} {params} the top-{meta.k} target differs from the full teacher by "
            f"KL {err['kl_mean_scaled']:.4f} (measured on {sum(len(f) for f in full)} stored full-logit views); "
            f"the invented tail matters here: precompute with a larger --k (or --k {meta.num_classes}: full logits)"
        )


def _views_digest(image_ids: np.ndarray, start: int) -> str:
    ids = np.asarray(image_ids, np.int64)
    ids = ids[ids >= 0]  # -1: the padding of a short last --grad-accum step
    return hashlib.sha256(np.int64(start).tobytes() + ids.tobytes()).hexdigest()[:16]


class _StepLog:
    """steps.jsonl without a host sync per step: losses (and an online teacher's "all logits finite"
    flags) stay on the device and image ids on the host until `flush` (every `every` steps, at epoch
    ends and before checkpoints), which reduces the losses and gathers the ids of all ranks in one
    collective each. Every rank flushes at the same steps; rank 0 writes.

    A flush also checks what it reads: at the first non-finite loss (or teacher logits) it writes the
    steps up to that one (its loss as null: the file stays strict JSON) and sets `bad`."""

    def __init__(self, path: Path, accelerator: Accelerator, every: int) -> None:
        self.path, self.accelerator, self.every = path, accelerator, max(1, every)
        self.rows: list[tuple[dict[str, Any], torch.Tensor, torch.Tensor, int, torch.Tensor | None]] = []
        self.epoch_losses: list[float] = []
        self.bad: dict[str, Any] | None = None  # the first non-finite step: its rec, loss, whose fault
        self.track: Callable[[dict[str, Any], float], None] | None = None  # each written row to the trackers too

    def add(
        self,
        rec: dict[str, Any],
        loss: torch.Tensor,
        image: torch.Tensor,
        start: int,
        teacher_finite: torch.Tensor | None = None,
    ) -> bool:
        """Buffer one step; True when a flush is due."""
        self.rows.append((rec, loss.detach().float(), image, start, teacher_finite))
        return len(self.rows) >= self.every

    def flush(self) -> float | None:
        """Write the buffered steps; the last step's loss (mean over ranks), or None if none."""
        if not self.rows:
            return None
        acc = self.accelerator
        cols = [torch.stack([r[1] for r in self.rows])]
        if self.rows[0][4] is not None:  # the same on every rank: the same kind of targets
            cols.append(torch.stack([r[4] for r in self.rows]).to(cols[0].device).float())
        read = acc.reduce(torch.stack(cols, 1), reduction="mean").cpu()  # one collective, one host read
        losses = read[:, 0].tolist()
        teacher_ok = read[:, 1].tolist() if read.shape[1] > 1 else [1.0] * len(losses)
        ids = acc.gather(torch.stack([r[2] for r in self.rows]).to(acc.device)).cpu().numpy()
        ids = ids.reshape(acc.num_processes, len(self.rows), -1)  # gather stacks rank after rank
        n = len(self.rows)
        for j, (loss, ok) in enumerate(zip(losses, teacher_ok)):
            if not math.isfinite(loss) or ok < 1:  # mean over ranks: below 1 when any rank saw one
                self.bad = {"rec": self.rows[j][0], "loss": loss, "teacher": ok < 1}
                n = j + 1
                break
        if acc.is_main_process:
            with open(self.path, "a") as f:
                for j, ((rec, _, _, start, _), loss) in enumerate(zip(self.rows[:n], losses)):
                    digest = _views_digest(ids[:, j].reshape(-1), start)
                    row = {**rec, "loss": loss if math.isfinite(loss) else None, "views": digest}
                    f.write(json.dumps(row, allow_nan=False) + "\n")
                    if self.track is not None and math.isfinite(loss):
                        self.track(rec, loss)
        self.epoch_losses += [x for x in losses[:n] if math.isfinite(x)]
        self.rows = []
        return losses[n - 1]


def _nonfinite_weights(net: torch.nn.Module) -> list[str]:
    """Names of the floating tensors of `net`'s state that hold a NaN or an inf (one host sync when none)."""
    floats = {k: v for k, v in net.state_dict().items() if v.is_floating_point()}
    if not floats or bool(torch.stack([torch.isfinite(v).all() for v in floats.values()]).all()):
        return []
    return [k for k, v in floats.items() if not bool(torch.isfinite(v).all())]


def _check_test_split(cfg: TrainConfig, targets: Targets) -> None:
    """Refuse before the first step a test split the run's evaluation would fail on at the end: a
    missing split, class names other than the train split's, an image header that does not read."""
    data = _data_arg(cfg, targets)
    todo = "fix it, or give --no-eval to train without the evaluation"
    try:
        test = _test_source(cfg, targets)
        test.sizes()  # every header (an ImageFolder reads them here, not when it opens)
    except (SourceError, FileNotFoundError) as exc:
        raise SourceError(f"{exc} (the test split this run evaluates on, checked before training: {todo})") from exc
    train_classes = list(targets.source.classes)
    if list(test.classes) != train_classes:
        extra = sorted(set(test.classes) - set(train_classes))
        missing = sorted(set(train_classes) - set(test.classes))
        what = f"classes {extra[:5]} the train split lacks" if extra else f"no classes {missing[:5]}"
        raise SourceError(
            f"the test split of {data} ({test.root}) has {what} ({len(test.classes)} classes, the train split "
            f"{len(train_classes)}): its labels would not mean the student's classes; {todo}"
        )


# -- the student's state ---------------------------------------------------------------------
class StudentRun:
    """One student's state in a run: its model (prepared), optimizer, schedule, EMA, loss, run dir and
    checkpoint. The loop feeds it each step's views and targets (`backward`, then `step`); everything
    that is the student's own lives here, so that a loop could hold several."""

    def __init__(
        self,
        cfg: TrainConfig,
        accelerator: Accelerator,
        targets: Targets,
        steps_per_epoch: int,
        total_steps: int,
    ) -> None:
        self.cfg, self.accelerator = cfg, accelerator
        self.out = Path(cfg.out)
        self.ckpt = self.out / "checkpoint"
        world = accelerator.num_processes
        student = load_student(
            cfg.student,
            targets.source,
            targets.num_classes,
            seed=cfg.seed,
            weights=cfg.weights,
            mean=cfg.mean,
            std=cfg.std,
            trust_code=cfg.trust_code,
            size=targets.recipe.size,
        )
        if world > 1:  # BatchNorm over the global batch, so N processes compute what one would
            student = convert_batchnorm(student, accelerator.device)
        self.at_term = attention_term(cfg, targets, student)  # 0.0 without --attention-student
        opt = optimizer_settings(cfg)
        self.lr = run_lr(cfg)
        optimizer = build_optimizer(
            cfg.optimizer,
            student,
            lr=self.lr,
            weight_decay=cfg.weight_decay,
            decay_norm_bias=opt["decay_norm_bias"],
            momentum=opt["momentum"] or 0.0,
            nesterov=opt["nesterov"],
        )
        sched = schedule_settings(cfg)
        warmup = warmup_steps(total_steps, sched["warmup"], sched["warmup_epochs"], steps_per_epoch)
        factor = lr_schedule(
            cfg.schedule,
            total_steps,
            warmup,
            min_factor=sched["min_lr"] / self.lr,
            milestones=[m * steps_per_epoch for m in sched["milestones"] or ()],
            gamma=sched["step_gamma"] or 0.0,
        )
        # The scheduler is not prepared: accelerate would step it once per process per step, and the
        # schedule must not depend on the world size. It is still saved and restored with the state.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        self.channels_last = accelerator.device.type == "cuda"
        if self.channels_last:
            student = student.to(memory_format=torch.channels_last)
        self.ema = WeightsEma(student, cfg.ema) if cfg.ema is not None else None  # before compile: a plain copy
        if cfg.compile:
            student.compile()  # in place: the state dict keeps its names
        self.model, self.optimizer = accelerator.prepare(student, optimizer)
        self.loss_fn = training_loss(
            cfg.loss, loss_settings(cfg.loss, cfg), targets.num_classes, cfg.ce_weight, cfg.label_smoothing
        )
        self.math = math_config(cfg, targets, targets.recipe)  # what a resume must not change
        self.math["mixed_precision"] = accelerator.mixed_precision  # as resolved (the flag may defer to a config)
        self.last_ckpt: int | None = None  # the step of the last checkpoint written or resumed from
        self.best: dict[str, Any] | None = None  # --keep-best: the metric's best value so far, and where
        self.log = _StepLog(self.out / "steps.jsonl", accelerator, cfg.log_every)  # written from the first flush

    @property
    def net(self) -> torch.nn.Module:
        """The bare student (no DDP wrapper)."""
        return self.accelerator.unwrap_model(self.model)

    def backward(self, item: dict[str, Any], teacher: Any, device: torch.device, scale: int) -> torch.Tensor:
        """Forward this rank's views, add the gradient of loss / `scale` (the step's global batches); -> the loss."""
        views = item["views"].contiguous(memory_format=torch.channels_last) if self.channels_last else item["views"]
        with self.accelerator.autocast():
            logits = self.model(views)
        loss = self.loss_fn(logits, teacher, item)
        loss = loss + self.at_term(item, device)  # attention transfer (issue 13)
        self.accelerator.backward(loss / scale if scale > 1 else loss)
        return loss

    def step(self) -> None:
        """Clip, step the optimizer and the schedule, move the EMA."""
        if self.cfg.clip:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.clip)
        self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.net)

    def flush(self) -> float | None:
        """Write the logged steps; stop at the first non-finite one (its loss, or the online teacher's logits)."""
        log = self.log
        last = log.flush()
        if log.bad is not None:
            rec, loss = log.bad["rec"], log.bad["loss"]
            if log.bad["teacher"]:  # the loss is then not the student's fault
                what = f"the online teacher {self.cfg.teacher} gave non-finite logits"
                self.stop(rec["step"], rec["epoch"], None, "teacher", what)
            self.stop(rec["step"], rec["epoch"], loss, "loss", f"the training loss is {loss}")
        return last

    def stop(self, step: int, epoch: int, loss: float | None, reason: str, what: str) -> NoReturn:
        """Mark the run dir failed and raise: one line naming the step and the student."""
        cfg = self.cfg
        kept = (
            f"its last finite checkpoint (step {self.last_ckpt}) is kept in {self.ckpt}"
            if self.last_ckpt is not None
            else "no checkpoint was written before it"
        )
        info = {
            "step": step,
            "epoch": epoch,
            "loss": None if loss is None else repr(loss),  # "nan", "inf": strict JSON
            "reason": reason,
            "student": cfg.student,
            "teacher": cfg.teacher,
            "last_checkpoint": self.last_ckpt,
        }
        if self.accelerator.is_main_process:
            try:
                mark_failed(self.out, info)
            except OSError:  # a full disk must not hide why the run stopped: the line below says it
                pass
        raise NonFiniteLossError(
            f"{what} at step {step} (epoch {epoch}) of student {cfg.student} (--lr {cfg.lr}, --loss {cfg.loss}): "
            f"training stopped, {kept} and {self.out / FAILED} says so; {_advice(reason)}"
        )

    def check_weights(self, step: int, epoch: int) -> None:
        """Stop (failed.json, one line) if the weights are not finite: before anything saves or evaluates them."""
        bad = _nonfinite_weights(self.net)
        if bad:
            self.stop(step, epoch, None, "weights", f"the student's weights are not finite ({', '.join(bad[:3])})")

    def save_checkpoint(self, step: int, epoch: int) -> None:
        """safetensors + JSON, no pickle; never of non-finite weights (the losses up to `step` were flushed)."""
        self.check_weights(step, epoch)
        ema = self.ema.module if self.ema is not None else None
        save_checkpoint(self.accelerator, self.ckpt, step, self.model, self.optimizer, self.scheduler, self.math, ema)
        self.last_ckpt = step

    def resume(self, total_steps: int) -> int:
        """Restore the state of --out/checkpoint (refused if the math differs); -> the step to go on from."""
        found = find_checkpoint(self.ckpt)  # never opens a pickle; a pickled (old) checkpoint is refused
        if found is None:
            self.accelerator.print(f"notice: --resume given but {self.ckpt} holds no checkpoint; starting from step 0")
            return 0
        check_resume(read_state(found)["config"], self.math, found)
        self.last_ckpt = load_checkpoint(self.accelerator, found, self.model, self.optimizer, self.scheduler, self.ema)
        self.best = _read_best(self.out)
        self.accelerator.print(f"resumed from {found} at step {self.last_ckpt} of {total_steps}")
        return self.last_ckpt

    def evaluate(self, source: Any, recipe: Any, shards: str | None, workers: int) -> dict[str, Any]:
        """The student's test-split metrics, and its EMA's as `ema` (every rank predicts its share)."""
        # the bare modules, so that a DDP wrapper does not wait for the other ranks in forward
        args = (source, recipe.size, recipe.center_fraction, shards, workers)
        metrics = evaluate_model(self.net, *args, accelerator=self.accelerator)
        if self.ema is not None:
            metrics["ema"] = evaluate_model(self.ema.module, *args, accelerator=self.accelerator)
        return metrics

    def final_modules(self) -> dict[str, torch.nn.Module]:
        """The modules to save as run dirs: "" (--out itself) and "ema", with plain BatchNorm again."""
        found = {"": self.net}
        if self.ema is not None:
            found["ema"] = self.ema.module
        if self.accelerator.num_processes > 1:  # revert_batchnorm swaps modules in place: copies keep the trained ones
            found = {k: revert_batchnorm(copy.deepcopy(m)) for k, m in found.items()}
        return found

    def keep_best(self, rec: dict[str, Any], step: int, extra: dict[str, Any]) -> None:
        """--keep-best: save the model `rec` ranks best so far into --out/best (main process writes)."""
        metric = self.cfg.keep_best
        if metric is None:
            return
        ema = metric.startswith("ema_")
        if metric == "loss":
            value = rec.get("loss")
        else:
            evaluated = rec.get("eval") or {}
            value = (evaluated.get("ema") or {}) if ema else evaluated
            value = value.get(metric.removeprefix("ema_"))
        if value is None:
            self.accelerator.print(f"notice: --keep-best {metric}: this evaluation has no {metric}; best unchanged")
            return
        lower = metric == "loss"
        if self.best is not None and not (value < self.best["value"] if lower else value > self.best["value"]):
            return
        self.best = {"metric": metric, "value": value, "epoch": rec.get("epoch"), "step": step}
        if self.accelerator.is_main_process:
            module = self.ema.module if ema else self.net
            if self.accelerator.num_processes > 1:
                module = revert_batchnorm(copy.deepcopy(module))
            save_model(module, self.out / "best", extra={**extra, "best": self.best})


def _read_best(out: Path) -> dict[str, Any] | None:
    """The best so far of a resumed run (--out/best/config.json's "best"), or None."""
    try:
        best = json.loads((out / "best" / CONFIG_NAME).read_text()).get("best")
    except (OSError, ValueError, AttributeError):
        return None
    return best if isinstance(best, dict) and isinstance(best.get("value"), (int, float)) else None


def _check_compile(device: torch.device) -> None:
    """Refuse --compile, with one line, where torch.compile cannot run."""
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        raise ConfigError(
            "--compile cannot run here: torch.compile does not support this Python or platform; drop --compile"
        )
    if device.type == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX"), "g++", "c++", "clang++") if c):
        raise ConfigError(
            "--compile cannot run here: torch.compile builds C++ kernels for the CPU and no C++ compiler "
            "(g++, clang++, or $CXX) is on PATH; install one or drop --compile"
        )
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise ConfigError(
                "--compile cannot run here: torch.compile on CUDA needs triton; install it or drop --compile"
            )


def _trackers(cfg: TrainConfig) -> list[str] | None:
    """--log-with as accelerate's tracker names, each one installed; else one line saying which is not."""
    if not cfg.log_with:
        return None
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    names = [n.strip() for n in str(cfg.log_with).split(",") if n.strip()]
    known = [t.value for t in LoggerType if t.value != "all"]
    available = {str(getattr(t, "value", t)) for t in get_available_trackers()}
    for name in names:
        if name not in known:
            raise ConfigError(f"--log-with {name!r} is not a tracker accelerate knows; choose from {', '.join(known)}")
        if name not in available:
            raise ConfigError(f"--log-with {name}: {name} is not installed here; pip install {name} (or drop it)")
    return names


def recorded(cfg: TrainConfig) -> dict[str, Any]:
    """The config as a run dir (and a tracker) records it: everything but the storage options."""
    out = asdict(cfg)
    out.pop("storage_options")
    return out


def _tracker_config(cfg: TrainConfig) -> dict[str, Any]:
    """The run's config as trackers take it: scalars only (lists and None as text)."""
    flat = {}
    for key, value in {**recorded(cfg), **training_settings(cfg), "run_lr": run_lr(cfg)}.items():
        flat[key] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


# -- 2. loop, 3. save ----------------------------------------------------------------------
def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train a student as `cfg` says: 1. prepare, 2. loop over this rank's share of every global batch,
    3. save and evaluate; -> a summary (run dir, world size, steps, evaluation)."""
    with ExitStack() as held:  # the run dir's lock, once taken, is dropped however training ends
        held.enter_context(using_storage_options(cfg.storage_options))
        return _train(cfg, held)


def _train(cfg: TrainConfig, held: ExitStack) -> dict[str, Any]:
    out = Path(cfg.out)
    trackers = _trackers(cfg)  # before anything starts
    project = ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")) if trackers else None
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision, cpu=cfg.cpu, log_with=trackers, project_config=project
    )
    check_world(accelerator.num_processes)
    if cfg.compile:
        _check_compile(accelerator.device)
    replace_run = check_out_dir(out, cfg.resume, cfg.overwrite)  # before anything is built or written
    set_seed(cfg.seed)  # nothing in the loop draws; views never come from here
    targets = choose_targets(cfg, accelerator.device)  # a store, an online teacher, or labels: chosen once
    recipe = targets.recipe
    world = accelerator.num_processes
    if (
        cfg.keep_best
        and cfg.keep_best.endswith("agreement")
        and (targets.store is None or targets.store.meta.test is None)
    ):
        raise ConfigError(
            f"--keep-best {cfg.keep_best} needs the teacher's test predictions in a store (--shards, precomputed "
            "with its test split); rank by top1 instead"
        )
    if cfg.eval or cfg.eval_every:  # now, not after the whole schedule
        _check_test_split(cfg, targets)
    if targets.store is not None and accelerator.is_main_process:
        writer = targets.store.writer()  # a precompute still writing it: later epochs are not seen here
        if writer is not None:
            accelerator.print(
                f"notice: store {targets.store.url} is being written by {writer} ({LOCK}); "
                f"{targets.store.meta.epochs_done} of its epochs are committed and only those are used "
                "(training goes on; epochs committed later are not seen by this run)"
            )
    # This rank's share of every global batch, from a step set below (the same batches a user's loop replays)
    replay = Replay(
        targets,
        batch_size=cfg.batch_size,
        epochs=cfg.epochs,
        device=accelerator.device,
        rank=accelerator.process_index,
        world=world,
        workers=cfg.workers,
        render=cfg.render,
    )
    # optimizer steps: --grad-accum global batches each, the last of an epoch possibly fewer
    batches_per_epoch, accum = replay.steps_per_epoch, cfg.grad_accum
    steps_per_epoch = -(-batches_per_epoch // accum)
    total_steps = steps_per_epoch * cfg.epochs

    def batches_of(step: int) -> int:
        return min(accum, batches_per_epoch - (step % steps_per_epoch) * accum)

    def first_batch(step: int) -> int:
        return (step // steps_per_epoch) * batches_per_epoch + (step % steps_per_epoch) * accum

    if targets.stored_epochs is not None and cfg.epochs > targets.stored_epochs:
        accelerator.print(
            f"notice: training {cfg.epochs} epochs from {targets.stored_epochs} stored epoch(s) "
            f"(the store holds {targets.store.meta.epochs_done}); "
            f"stored epochs are cycled (epoch e replays stored epoch e mod {targets.stored_epochs})"
        )

    run = StudentRun(cfg, accelerator, targets, steps_per_epoch, total_steps)
    if targets.store is not None and cfg.loss != "ce" and accelerator.is_main_process:
        _warn_target_error(targets.store, cfg, accelerator)

    start_step = 0
    failed = read_failed(out) if cfg.resume else None
    if cfg.resume:
        if failed is not None:
            accelerator.print(
                f"notice: the run in {out} stopped at step {failed.get('step')}: {_describe_failure(failed)} "
                f"({out / FAILED}); it goes on from its last finite checkpoint, and with the same flags it may "
                "stop there again"
            )
        start_step = run.resume(total_steps)
    if accelerator.is_main_process:
        held.callback(lock_run(out).release)  # one trainer per run dir: before anything in it is removed or written
        if replace_run:
            clear_run(out)
        (out / FAILED).unlink(missing_ok=True)  # a resumed run is no longer the failed one
        (out / "train_config.json").write_text(
            json.dumps(
                {
                    **recorded(cfg),
                    "recipe": recipe.to_dict(),
                    "world_size": world,
                    "training": training_settings(cfg),
                    "run_lr": run_lr(cfg),
                    "views_per_step": cfg.batch_size * cfg.grad_accum,
                },
                indent=1,
            )
        )
        _truncate_logs(out, start_step, steps_per_epoch)  # forget what was logged after the checkpoint
    if trackers:
        accelerator.init_trackers("kdlib", config=_tracker_config(cfg))

    replay.start_step = first_batch(start_step)
    if targets.store is not None:  # roi_align-1 on another kind of device: within 1 LSB on a few pixels; say so, once
        here, there = replay.render_device, targets.store.meta.rendered["device"]
        if here != there and targets.store.meta.rendered["renderer"] == "roi_align-1":
            accelerator.print(
                f"notice: the store's views were rendered on {there}, this run renders them on {here}: "
                "a few pixels may differ by 1 (roi_align); `kdlib verify --device` measures it"
            )
    batches = iter(replay)  # one feed for every remaining step: its workers live from the first batch to the last
    log = run.log
    if trackers:
        log.track = lambda rec, loss: accelerator.log({"train/loss": loss, "train/lr": rec["lr"]}, step=rec["step"])
    extra = _run_extra(cfg, targets)

    step = start_step
    for epoch in range(start_step // steps_per_epoch, cfg.epochs):
        run.model.train()
        n = steps_per_epoch * (epoch + 1) - step
        t0 = time.time()
        log.epoch_losses = []
        views_seen = 0
        bar = tqdm(total=n, unit="step", desc=f"train epoch {epoch}", disable=not accelerator.is_local_main_process)
        for _ in range(n):
            k = batches_of(step)
            losses, images, finite = [], [], []
            for j in range(k):
                item = next(batches).item
                teacher = targets.logits(item, accelerator.device)
                if j == 0:
                    run.optimizer.zero_grad(set_to_none=True)
                # the gradients of a step's batches meet in one all-reduce, at its last one
                with accelerator.no_sync(run.model) if j < k - 1 else nullcontext():
                    losses.append(run.backward(item, teacher, accelerator.device, k))
                images.append(item["image_cpu"])
                finite.append(targets.logits_finite)
                if j == 0:
                    start = item["start"]
            run.step()
            step += 1
            views_seen += k * cfg.batch_size
            rec = {"step": step, "epoch": epoch, "lr": run.scheduler.get_last_lr()[0], "world_size": world}
            if k == 1 and accum == 1:  # exactly as before --grad-accum existed
                loss, image, teacher_ok = losses[0], images[0], finite[0]
            else:
                loss = torch.stack([x.detach().float() for x in losses]).mean()
                image = _padded(torch.cat(images), accum * len(images[0]))
                teacher_ok = None if finite[0] is None else torch.stack(finite).all()
            bar.update(1)
            if log.add(rec, loss, image, start, teacher_ok):
                bar.set_postfix(loss=f"{run.flush():.4f}")
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step % steps_per_epoch:
                run.flush()  # a checkpoint comes after the check of every loss before it
                run.save_checkpoint(step, epoch)
        run.flush()
        run.check_weights(step, epoch)  # before the evaluation and --keep-best see them
        bar.close()
        dt = time.time() - t0
        rec = {
            "epoch": epoch,
            "stored_epoch": epoch % targets.stored_epochs if targets.stored_epochs else None,
            "steps": n,
            "loss": sum(log.epoch_losses) / max(len(log.epoch_losses), 1),
            "lr": run.scheduler.get_last_lr()[0],
            "seconds": round(dt, 3),
            "views_per_s": round(views_seen / max(dt, 1e-9), 1),
            "world_size": world,
        }
        if cfg.eval_every and (epoch + 1) % cfg.eval_every == 0 and epoch + 1 < cfg.epochs:
            rec["eval"] = run.evaluate(_test_source(cfg, targets), recipe, cfg.shards, cfg.workers)
        if accelerator.is_main_process:
            if n < steps_per_epoch:  # resumed mid-epoch: the epoch's loss is over all its steps, as logged
                losses = [
                    r["loss"]
                    for r in map(json.loads, (out / "steps.jsonl").read_text().splitlines())
                    if r["epoch"] == epoch and r["loss"] is not None
                ]
                rec["loss"] = sum(losses) / max(len(losses), 1)
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec, allow_nan=False) + "\n")
        if cfg.keep_best == "loss":  # every rank the same value: the loss is reduced over ranks
            rec["loss"] = _broadcast_float(accelerator, rec["loss"])
        if cfg.keep_best == "loss" or "eval" in rec:
            run.keep_best(rec, step, extra)
        if trackers:
            accelerator.log(_epoch_scalars(rec), step=step)
        # after the epoch's evaluation, metrics row and --keep-best: a resume from it has them (and the RNG
        # state past the evaluation's draws); a kill before it redoes the epoch's end (its row cut on resume)
        run.save_checkpoint(step, epoch)
        accelerator.print(
            f"epoch {epoch}: loss {rec['loss']:.4f}, {rec['views_per_s']:.0f} views/s"
            + (f", test top-1 {rec['eval']['top1']:.4f}" if "eval" in rec else "")
            + (f", EMA {rec['eval']['ema']['top1']:.4f}" if "ema" in rec.get("eval", {}) else "")
        )

    accelerator.wait_for_everyone()
    result: dict[str, Any] = {"out": str(out), "world_size": world, "steps": step}
    if accelerator.is_main_process:  # saved before the evaluation: a failing one never loses the model
        for sub, module in run.final_modules().items():
            save_model(module, out / sub, extra=extra)
    if cfg.eval:  # every rank evaluates its share of the test split on its device
        try:
            metrics = run.evaluate(_test_source(cfg, targets), recipe, cfg.shards, cfg.workers)
        except Exception:  # an image only its decoding finds bad: the error line follows this note
            accelerator.print(
                f"note: the final evaluation failed; the trained model is saved in {out} (model.safetensors, "
                f"config.json): once the test split is fixed, `kdlib eval --model {out}` evaluates it"
            )
            raise
        ema_metrics = metrics.pop("ema", None)
        result["eval"] = {"model": str(out), "data": _data_arg(cfg, targets), "split": "test", **metrics}
        if ema_metrics is not None:
            result["eval_ema"] = {
                "model": str(out / "ema"),
                "data": result["eval"]["data"],
                "split": "test",
                **ema_metrics,
            }
        if cfg.keep_best and cfg.keep_best != "loss":  # the final model competes too
            run.keep_best({"epoch": cfg.epochs - 1, "eval": {**metrics, "ema": ema_metrics or {}}}, step, extra)
        if trackers:
            accelerator.log(_epoch_scalars({"eval": {**metrics, "ema": ema_metrics or {}}}, "final"), step=step)
    if accelerator.is_main_process:
        if cfg.eval:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"final_eval": result["eval"]}, allow_nan=False) + "\n")
                if "eval_ema" in result:
                    f.write(json.dumps({"final_eval_ema": result["eval_ema"]}, allow_nan=False) + "\n")
            accelerator.print(json.dumps(result["eval"]))
            if "eval_ema" in result:
                accelerator.print(json.dumps(result["eval_ema"]))
        save_curves(out)
    if run.best is not None:
        result["best"] = {**run.best, "model": str(out / "best")}
    accelerator.wait_for_everyone()
    end_trackers(accelerator)  # not end_training(): it destroys the process group, which a script's next command needs
    return result


def _run_extra(cfg: TrainConfig, targets: Targets) -> dict[str, Any]:
    """What config.json says beside the model: the recipe, classes, and how it was trained."""
    return {
        "recipe": targets.recipe.to_dict(),
        "input_size": targets.recipe.size,
        "classes": list(targets.source.classes),
        "trained_from": {
            "shards": os.path.abspath(cfg.shards) if cfg.shards else None,
            "teacher": cfg.teacher,
            "loss": cfg.loss,
            "data": cfg.data or (targets.store.meta.source.get("data") if targets.store else None),
        },
        "training": {**training_settings(cfg), "lr": cfg.lr, "run_lr": run_lr(cfg), "weight_decay": cfg.weight_decay},
    }


def _padded(image: torch.Tensor, length: int) -> torch.Tensor:
    """A step's image ids padded with -1 to `length` (a short last step), so that every logged row gathers alike."""
    if len(image) >= length:
        return image
    return torch.cat([image, image.new_full((length - len(image),), -1)])


def _broadcast_float(accelerator: Accelerator, value: float) -> float:
    """The main process's `value` on every process."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value])[0]


def _epoch_scalars(rec: dict[str, Any], prefix: str = "epoch") -> dict[str, float]:
    """An epoch record's numbers for the trackers: loss, lr, views/s, test top-1/top-5/agreement (and the EMA's)."""
    out = {f"{prefix}/{k}": rec[k] for k in ("loss", "lr", "views_per_s") if isinstance(rec.get(k), (int, float))}
    evaluated = rec.get("eval") or {}
    for name, metrics in (("test", evaluated), ("test_ema", evaluated.get("ema") or {})):
        for k in ("top1", "top5", "agreement"):
            if isinstance(metrics.get(k), (int, float)):
                out[f"{name}/{k}"] = metrics[k]
    return out


_ADVICE = {
    "loss": "lower --lr, check the student's outputs and the targets, then start again with --overwrite",
    "weights": "lower --lr (or keep --clip on), check the student, then start again with --overwrite",
    "teacher": "check the teacher's weights and --teacher-mean/--teacher-std (precompute refuses such a teacher "
    "too), then start again with --overwrite",
}


def _advice(reason: str) -> str:
    return _ADVICE.get(reason, _ADVICE["loss"])


def _describe_failure(failed: dict[str, Any]) -> str:
    reason = failed.get("reason")
    if reason == "teacher":
        return "the online teacher gave non-finite logits"
    if reason == "weights":
        return "the student's weights became non-finite"
    if reason == "loss":
        return f"the training loss was {failed.get('loss')}"
    return str(reason)


def _test_source(cfg: TrainConfig, targets: Targets):
    if not hasattr(targets, "_test"):
        limit = cfg.limit if cfg.limit is not None else _store_limit(targets)
        targets._test = open_source(_data_arg(cfg, targets), "test", limit)
    return targets._test


def _data_arg(cfg: TrainConfig, targets: Targets) -> str:
    return cfg.data or targets.store.meta.source.get("data")


def _store_limit(targets: Targets) -> int | None:
    return targets.store.meta.source.get("limit") if targets.store else None


def _truncate_logs(out: Path, step: int, steps_per_epoch: int) -> None:
    """On resume from `step`: drop the steps after it, and the metrics rows of the epochs it has not ended
    (an epoch's row is written just before its end's checkpoint) and of the final evaluation."""
    steps, metrics = out / "steps.jsonl", out / "metrics.jsonl"
    epoch = step // steps_per_epoch  # the epoch the resumed run is in
    if step == 0:
        steps.unlink(missing_ok=True)
        metrics.unlink(missing_ok=True)
        return
    for path, key in ((steps, "step"), (metrics, None)):
        if not path.exists():
            continue
        keep = []
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line torn by the kill (or a full disk): logged again after the resume
                continue
            if key and rec[key] > step:
                continue
            if key is None and rec.get("epoch", epoch) >= epoch:  # (final_eval and final_eval_ema have none)
                continue
            keep.append(line)
        atomic_write(path, lambda p: p.write_text("".join(k + "\n" for k in keep)))  # a kill now keeps them all
