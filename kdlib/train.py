"""Train a student: from a store (distillation, no teacher), online (teacher in memory), or on labels.

One readable loop, three sources of targets for the same views:

- `--shards S`: views and soft labels replayed from the store; the teacher is never loaded.
- `--teacher T`: the same plan rendered on the fly and the teacher run on it (the baseline
  users would otherwise run; per-step losses match the cached run up to fp16 storage).
- neither: plain supervised training on (mixed) ground-truth labels, `--loss ce`.

Steps: 1. prepare (source, recipe, epochs of params, student, optimizer; the test split is checked
now, not after the schedule), 2. loop over epochs of global batches (each rank renders only its
slice of each batch), 3. save (model, config, metrics), then evaluate on the test split.
Multi-process with `accelerate launch -m kdlib train`.

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
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
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
)
from .errors import ConfigError, NonFiniteLossError, SourceError
from .evaluate import evaluate_model
from .losses import loss_settings, target_error, target_loss, training_loss
from .plots import save_curves
from .replay import Replay
from .resolve import load_student
from .rundir import save_model
from .runtime import check_world
from .schedule import warmup_cosine
from .softlabel import reconstruct
from .source import open_source
from .store import Store
from .store.base import LOCK
from .store.codecs import decode_chunk
from .targets import Targets, attention_term, choose_targets

__all__ = ["TrainConfig", "resolve_config", "train"]


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
    warmup: float = 0.05  # fraction of all steps
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

    def __post_init__(self) -> None:
        check_numbers(vars(self), TRAIN_NUMBERS, "train config")


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
        values.update({k: v for k, v in data.items() if k not in given})
    if values.get("loss") is None:
        values["loss"] = "kl" if (values.get("shards") or values.get("teacher")) else "ce"
    return TrainConfig(**values)


# -- 1. prepare ----------------------------------------------------------------------------
TARGET_KL_WARN = 0.02  # nats (in the loss's units): above this the top-k tail visibly changes the target


def _warn_target_error(store: Store, cfg: TrainConfig, accelerator: Accelerator, chunks: int = 8) -> None:
    """Say so when the stored top-k target is far from the full one at this loss's temperature/gamma."""
    meta = store.meta
    if meta.k >= meta.num_classes:
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
    return hashlib.sha256(np.int64(start).tobytes() + np.asarray(image_ids, np.int64).tobytes()).hexdigest()[:16]


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


# -- 2. loop, 3. save ----------------------------------------------------------------------
def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train a student as `cfg` says: 1. prepare, 2. loop over this rank's share of every global batch,
    3. save and evaluate; -> a summary (run dir, world size, steps, evaluation)."""
    with ExitStack() as held:  # the run dir's lock, once taken, is dropped however training ends
        return _train(cfg, held)


def _train(cfg: TrainConfig, held: ExitStack) -> dict[str, Any]:
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cfg.cpu)
    check_world(accelerator.num_processes)
    out = Path(cfg.out)
    replace_run = check_out_dir(out, cfg.resume, cfg.overwrite)  # before anything is built or written
    set_seed(cfg.seed)  # nothing in the loop draws; views never come from here
    targets = choose_targets(cfg, accelerator.device)  # a store, an online teacher, or labels: chosen once
    source, recipe = targets.source, targets.recipe
    world = accelerator.num_processes
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
    steps_per_epoch, total_steps = replay.steps_per_epoch, replay.total_steps
    if targets.stored_epochs is not None and cfg.epochs > targets.stored_epochs:
        accelerator.print(
            f"notice: training {cfg.epochs} epochs from {targets.stored_epochs} stored epoch(s) "
            f"(the store holds {targets.store.meta.epochs_done}); "
            f"stored epochs are cycled (epoch e replays stored epoch e mod {targets.stored_epochs})"
        )

    student = load_student(
        cfg.student,
        source,
        targets.num_classes,
        seed=cfg.seed,
        weights=cfg.weights,
        mean=cfg.mean,
        std=cfg.std,
        trust_code=cfg.trust_code,
    )
    if world > 1:  # BatchNorm over the global batch, so N processes compute what one would
        student = convert_batchnorm(student, accelerator.device)
    at_term = attention_term(cfg, targets, student)  # 0.0 without --attention-student
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, cfg.warmup))
    # The scheduler is not prepared: accelerate would step it once per process per step, and the
    # schedule must not depend on the world size. It is still saved and restored with the state.
    if accelerator.device.type == "cuda":
        student = student.to(memory_format=torch.channels_last)
    model, optimizer = accelerator.prepare(student, optimizer)
    loss_fn = training_loss(cfg.loss, loss_settings(cfg.loss, cfg), targets.num_classes, cfg.ce_weight)
    if targets.store is not None and cfg.loss != "ce" and accelerator.is_main_process:
        _warn_target_error(targets.store, cfg, accelerator)

    ckpt = out / "checkpoint"
    start_step = 0
    run_math = math_config(cfg, targets, recipe)  # what a resume must not change
    run_math["mixed_precision"] = accelerator.mixed_precision  # as resolved (the flag may defer to a config)

    last_ckpt: int | None = None  # the step of the last checkpoint written or resumed from

    def _stop(step: int, epoch: int, loss: float | None, reason: str, what: str) -> NoReturn:
        """Mark the run dir failed and raise: one line naming the step and the student."""
        kept = (
            f"its last finite checkpoint (step {last_ckpt}) is kept in {ckpt}"
            if last_ckpt is not None
            else "no checkpoint was written before it"
        )
        info = {
            "step": step,
            "epoch": epoch,
            "loss": None if loss is None else repr(loss),  # "nan", "inf": strict JSON
            "reason": reason,
            "student": cfg.student,
            "teacher": cfg.teacher,
            "last_checkpoint": last_ckpt,
        }
        if accelerator.is_main_process:
            try:
                mark_failed(out, info)
            except OSError:  # a full disk must not hide why the run stopped: the line below says it
                pass
        raise NonFiniteLossError(
            f"{what} at step {step} (epoch {epoch}) of student {cfg.student} (--lr {cfg.lr}, --loss {cfg.loss}): "
            f"training stopped, {kept} and {out / FAILED} says so; {_advice(reason)}"
        )

    def _flush() -> float | None:
        last = log.flush()
        if log.bad is not None:
            rec, loss = log.bad["rec"], log.bad["loss"]
            if log.bad["teacher"]:  # the loss is then not the student's fault
                what = f"the online teacher {cfg.teacher} gave non-finite logits"
                _stop(rec["step"], rec["epoch"], None, "teacher", what)
            _stop(rec["step"], rec["epoch"], loss, "loss", f"the training loss is {loss}")
        return last

    def _save_checkpoint(accelerator: Accelerator, ckpt: Path, step: int, epoch: int) -> None:
        """safetensors + JSON, no pickle; never of non-finite weights (the losses up to `step` were flushed)."""
        nonlocal last_ckpt
        bad = _nonfinite_weights(accelerator.unwrap_model(model))
        if bad:
            _stop(step, epoch, None, "weights", f"the student's weights are not finite ({', '.join(bad[:3])})")
        save_checkpoint(accelerator, ckpt, step, model, optimizer, scheduler, run_math)
        last_ckpt = step

    failed = read_failed(out) if cfg.resume else None
    if cfg.resume:
        found = find_checkpoint(ckpt)  # never opens a pickle; a pickled (old) checkpoint is refused
        if failed is not None:
            accelerator.print(
                f"notice: the run in {out} stopped at step {failed.get('step')}: {_describe_failure(failed)} "
                f"({out / FAILED}); it goes on from its last finite checkpoint, and with the same flags it may "
                "stop there again"
            )
        if found is not None:
            check_resume(read_state(found)["config"], run_math, found)
            start_step = last_ckpt = load_checkpoint(accelerator, found, model, optimizer, scheduler)
            accelerator.print(f"resumed from {found} at step {start_step} of {total_steps}")
        else:
            accelerator.print(f"notice: --resume given but {ckpt} holds no checkpoint; starting from step 0")
    if accelerator.is_main_process:
        held.callback(lock_run(out).release)  # one trainer per run dir: before anything in it is removed or written
        if replace_run:
            clear_run(out)
        (out / FAILED).unlink(missing_ok=True)  # a resumed run is no longer the failed one
        (out / "train_config.json").write_text(
            json.dumps({**asdict(cfg), "recipe": recipe.to_dict(), "world_size": world}, indent=1)
        )
        _truncate_logs(out, start_step)  # forget steps logged after the checkpoint we resume from

    replay.start_step = start_step
    if targets.store is not None:  # roi_align-1 on another kind of device: within 1 LSB on a few pixels; say so, once
        here, there = replay.render_device, targets.store.meta.rendered["device"]
        if here != there and targets.store.meta.rendered["renderer"] == "roi_align-1":
            accelerator.print(
                f"notice: the store's views were rendered on {there}, this run renders them on {here}: "
                "a few pixels may differ by 1 (roi_align); `kdlib verify --device` measures it"
            )
    batches = iter(replay)  # one feed for every remaining step: its workers live from the first batch to the last
    log = _StepLog(out / "steps.jsonl", accelerator, cfg.log_every)
    channels_last = accelerator.device.type == "cuda"

    step = start_step
    for epoch in range(start_step // steps_per_epoch, cfg.epochs):
        model.train()
        n = steps_per_epoch * (epoch + 1) - step
        t0 = time.time()
        log.epoch_losses = []
        bar = tqdm(total=n, unit="step", desc=f"train epoch {epoch}", disable=not accelerator.is_local_main_process)
        for _ in range(n):
            item = next(batches).item
            views = item["views"].contiguous(memory_format=torch.channels_last) if channels_last else item["views"]
            teacher = targets.logits(item, accelerator.device)
            with accelerator.autocast():
                logits = model(views)
            loss = loss_fn(logits, teacher, item)
            loss = loss + at_term(item, accelerator.device)  # attention transfer (issue 13)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            if cfg.clip:
                accelerator.clip_grad_norm_(model.parameters(), cfg.clip)
            optimizer.step()
            scheduler.step()
            step += 1
            rec = {"step": step, "epoch": epoch, "lr": scheduler.get_last_lr()[0], "world_size": world}
            bar.update(1)
            if log.add(rec, loss, item["image_cpu"], item["start"], targets.logits_finite):
                bar.set_postfix(loss=f"{_flush():.4f}")
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step % steps_per_epoch:
                _flush()  # a checkpoint comes after the check of every loss before it
                _save_checkpoint(accelerator, ckpt, step, epoch)
        _flush()
        bar.close()
        dt = time.time() - t0
        _save_checkpoint(accelerator, ckpt, step, epoch)
        rec = {
            "epoch": epoch,
            "stored_epoch": epoch % targets.stored_epochs if targets.stored_epochs else None,
            "steps": n,
            "loss": sum(log.epoch_losses) / max(len(log.epoch_losses), 1),
            "lr": scheduler.get_last_lr()[0],
            "seconds": round(dt, 3),
            "views_per_s": round(n * cfg.batch_size / max(dt, 1e-9), 1),
            "world_size": world,
        }
        if cfg.eval_every and (epoch + 1) % cfg.eval_every == 0 and epoch + 1 < cfg.epochs:
            # every rank predicts its share of the test split on its device; the bare module, so that
            # a DDP wrapper does not wait for the other ranks in forward
            rec["eval"] = evaluate_model(
                accelerator.unwrap_model(model),
                _test_source(cfg, targets),
                recipe.size,
                recipe.center_fraction,
                cfg.shards,
                cfg.workers,
                accelerator=accelerator,
            )
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
        accelerator.print(
            f"epoch {epoch}: loss {rec['loss']:.4f}, {rec['views_per_s']:.0f} views/s"
            + (f", test top-1 {rec['eval']['top1']:.4f}" if "eval" in rec else "")
        )

    accelerator.wait_for_everyone()
    result: dict[str, Any] = {"out": str(out), "world_size": world, "steps": step}
    if accelerator.is_main_process:  # saved before the evaluation: a failing one never loses the model
        final = accelerator.unwrap_model(model)
        if world > 1:  # revert_batchnorm swaps modules in place: the evaluated model keeps its own
            final = revert_batchnorm(copy.deepcopy(final))
        extra = {
            "recipe": recipe.to_dict(),
            "input_size": recipe.size,
            "classes": list(source.classes),
            "trained_from": {
                "shards": os.path.abspath(cfg.shards) if cfg.shards else None,
                "teacher": cfg.teacher,
                "loss": cfg.loss,
                "data": cfg.data or (targets.store.meta.source.get("data") if targets.store else None),
            },
        }
        save_model(final, out, extra=extra)
    if cfg.eval:  # every rank evaluates its share of the test split on its device
        try:
            metrics = evaluate_model(
                accelerator.unwrap_model(model),
                _test_source(cfg, targets),
                recipe.size,
                recipe.center_fraction,
                cfg.shards,
                cfg.workers,
                accelerator=accelerator,
            )
        except Exception:  # an image only its decoding finds bad: the error line follows this note
            accelerator.print(
                f"note: the final evaluation failed; the trained model is saved in {out} (model.safetensors, "
                f"config.json): once the test split is fixed, `kdlib eval --model {out}` evaluates it"
            )
            raise
        result["eval"] = {"model": str(out), "data": _data_arg(cfg, targets), "split": "test", **metrics}
    if accelerator.is_main_process:
        if cfg.eval:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"final_eval": result["eval"]}, allow_nan=False) + "\n")
            accelerator.print(json.dumps(result["eval"]))
        save_curves(out)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


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


def _truncate_logs(out: Path, step: int) -> None:
    steps, metrics = out / "steps.jsonl", out / "metrics.jsonl"
    if step == 0:
        steps.unlink(missing_ok=True)
        metrics.unlink(missing_ok=True)
        return
    for path, key in ((steps, "step"), (metrics, None)):
        if not path.exists():
            continue
        keep = []
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if key and rec[key] > step:
                continue
            if key is None and "final_eval" in rec:
                continue
            keep.append(line)
        path.write_text("".join(k + "\n" for k in keep))
