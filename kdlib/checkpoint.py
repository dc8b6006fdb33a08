"""A train checkpoint without pickle: safetensors for tensors, JSON for everything else.

`accelerate`'s `save_state`/`load_state` write the optimizer, scheduler and RNG states as
pickles and load them with `weights_only=False`, so a planted file in a run directory runs
code on `--resume` (DESIGN invariant 8). kdlib writes its own checkpoint instead::

    checkpoint/
      model.safetensors       the student's state dict (main process)
      optimizer.safetensors   every tensor of the optimizer state, "state.<param>.<name>"
      state.json              optimizer param groups and scalars, scheduler, grad scaler,
                              the step reached and the run's math config (see `math_config`)
      rng-<rank>.safetensors  torch CPU/CUDA generator states and numpy's key, per process
      rng-<rank>.json         numpy's and Python's remaining RNG state, per process
      ema.safetensors         the EMA of the student's weights (--ema), main process

Reading it parses JSON and safetensors only; any other file (an accelerate `.pkl`, `.bin`
or `.pt`) is never opened. A checkpoint is written into `checkpoint.tmp` and swapped in,
so a kill or a full disk leaves the previous one; on a write error `checkpoint.tmp` is
removed and a `StorageError` names the path.

`check_resume` refuses a resume whose config differs from the checkpoint's in anything that
changes what the run computes, naming each difference; `check_out_dir` refuses to train into
a directory that already holds files unless `--resume` or `--overwrite` says what to do, or
that another live `kdlib train` holds (`lock_run`: a flock on `train.lock`, as a store's
write lock). A run stopped by a non-finite loss is marked by `failed.json` (`mark_failed`,
`read_failed`), so that `--resume` and `kdlib eval` can say what happened.
"""

from __future__ import annotations

import errno
import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ._checks import ENV_ERRNOS, describe_os_error
from .errors import ConfigError, RunBusyError, StorageError
from .losses import loss_settings
from .optim import optimizer_settings
from .rundir import leftover_temps
from .schedule import schedule_settings
from .store.base import FileLock

__all__ = [
    "CHECKPOINT_FORMAT",
    "save_checkpoint",
    "find_checkpoint",
    "read_state",
    "load_checkpoint",
    "has_checkpoint",
    "math_config",
    "check_resume",
    "check_out_dir",
    "clear_run",
    "RUN_FILES",
    "RUN_LOCK",
    "FAILED",
    "lock_run",
    "mark_failed",
    "read_failed",
    "training_settings",
]

CHECKPOINT_FORMAT = 1
STATE = "state.json"
MODEL = "model.safetensors"
OPTIMIZER = "optimizer.safetensors"
EMA = "ema.safetensors"
PICKLE_SUFFIXES = (".pkl", ".pickle", ".bin", ".pt", ".pth")
RUN_LOCK = "train.lock"  # flock held by the one `kdlib train` writing the run dir; names it; never removed
FAILED = "failed.json"  # written when a run stopped at a non-finite loss: step, loss, reason
# what `kdlib train` writes into --out (--overwrite removes these, and only these), the checkpoint first:
# a kill in the middle of --overwrite must not leave a checkpoint that a --resume would continue without its logs
RUN_FILES = (
    "checkpoint",
    "checkpoint.tmp",
    "checkpoint.old",
    FAILED,
    "model.safetensors",
    "config.json",
    "train_config.json",
    "metrics.jsonl",
    "steps.jsonl",
    "curves.png",
    "ema",  # the EMA of the weights as a run dir (--ema)
    "best",  # the best model so far as a run dir (--keep-best)
    "logs",  # experiment trackers' files (--log-with)
)


# -- files ----------------------------------------------------------------------------------
def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return st_load(path.read_bytes())
    except FileNotFoundError:
        raise ConfigError(
            f"checkpoint file {path} is missing; the checkpoint is incomplete: "
            "start again without --resume (or with --overwrite)"
        ) from None
    except Exception as exc:  # a truncated or foreign file: safetensors' own error
        raise ConfigError(f"checkpoint file {path} is corrupt ({exc}); start again with --overwrite") from exc


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"checkpoint file {path} is missing; the checkpoint is incomplete: "
            "start again without --resume (or with --overwrite)"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"checkpoint file {path} is corrupt ({exc}); start again with --overwrite") from exc


def has_checkpoint(ckpt: Path) -> bool:
    """Whether `ckpt` holds a whole checkpoint (its state.json, written last)."""
    return (ckpt / STATE).is_file()


def _refuse_foreign(ckpt: Path) -> None:
    """A directory written by accelerate's save_state (kdlib <= 0.x) is refused, never unpickled."""
    pickles = sorted(p.name for p in ckpt.iterdir() if p.suffix in PICKLE_SUFFIXES) if ckpt.is_dir() else []
    if pickles and not has_checkpoint(ckpt):
        raise ConfigError(
            f"{ckpt} holds a pickled checkpoint ({', '.join(pickles[:3])}; written by an older kdlib "
            f"or by hand) and kdlib never unpickles: start again with --overwrite"
        )


# -- state <-> (tensors, JSON) -------------------------------------------------------------
def _split_optimizer(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{pid}.{name}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[name] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    tuples = sorted({k for g in sd["param_groups"] for k, v in g.items() if isinstance(v, tuple)})
    return tensors, {
        "param_groups": groups,
        "tuples": tuples,
        "scalars": scalars,
        "tensor_params": sorted({int(p) for p in sd["state"]}),
    }


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(p): {} for p in meta["tensor_params"]}
    for key, t in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = t
    for pid, st in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(st)
    groups = [{k: (tuple(v) if k in meta["tuples"] else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy.keys"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64))
    version, py_state, gauss = random.getstate()
    return tensors, {
        "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": version, "state": list(py_state), "gauss": gauss},
    }


def _set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors)) if f"cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    n = meta["numpy"]
    np.random.set_state(
        (n["kind"], tensors["numpy.keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    p = meta["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


# -- save / load ----------------------------------------------------------------------------
def save_checkpoint(
    accelerator, ckpt: Path, step: int, model, optimizer, scheduler, config: dict[str, Any], ema=None
) -> None:
    """Write the state at `step` into `ckpt`.tmp on every process, then swap it in (main process).
    `ema`: the averaged copy of the weights (a module), saved beside them."""
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    failed = None
    accelerator.wait_for_everyone()
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
    except OSError as exc:
        failed = exc
    accelerator.wait_for_everyone()
    try:
        if failed is None:
            rank = accelerator.process_index
            rng_t, rng_j = _rng_state()
            _write(tmp / f"rng-{rank}.safetensors", st_save(rng_t))
            _write(tmp / f"rng-{rank}.json", json.dumps(rng_j).encode())
            if accelerator.is_main_process:
                net = accelerator.unwrap_model(model)
                _write(tmp / MODEL, st_save({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}))
                if ema is not None:
                    _write(tmp / EMA, st_save({k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()}))
                opt_t, opt_j = _split_optimizer(optimizer.state_dict())
                _write(tmp / OPTIMIZER, st_save(opt_t))
                scaler = accelerator.scaler.state_dict() if getattr(accelerator, "scaler", None) is not None else None
                state = {
                    "format": CHECKPOINT_FORMAT,
                    "step": step,
                    "world_size": accelerator.num_processes,
                    "config": config,
                    "optimizer": opt_j,
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler,
                }
                _write(tmp / STATE, json.dumps(state, indent=1).encode())  # last: its presence marks a whole checkpoint
    except OSError as exc:
        failed = exc
    accelerator.wait_for_everyone()
    if failed is not None:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(failed, OSError) and failed.errno in ENV_ERRNOS:
            kept = (
                f"the previous checkpoint {ckpt} is kept" if has_checkpoint(ckpt) else "there is no earlier checkpoint"
            )
            raise StorageError(
                describe_os_error(
                    failed,
                    where=str(tmp),
                    todo=(
                        f"the checkpoint of step {step} was not written and {tmp.name} was removed; {kept}: free some space "
                        f"and rerun with --resume"
                        if failed.errno in (errno.ENOSPC, errno.EDQUOT)
                        else None
                    ),
                )
            ) from failed
        raise failed
    if accelerator.is_main_process:
        old = ckpt.with_name(ckpt.name + ".old")
        if ckpt.exists():  # whole (only ever made by the rename below), so any .old is an earlier leftover:
            shutil.rmtree(old, ignore_errors=True)  # a kill in the rmtree below leaves part of one
            ckpt.rename(old)
        tmp.rename(ckpt)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def find_checkpoint(ckpt: Path) -> Path | None:
    """The checkpoint to resume from: `ckpt`, or `ckpt`.old when a kill fell between the two renames."""
    old = ckpt.with_name(ckpt.name + ".old")
    if not ckpt.exists() and has_checkpoint(old):
        return old
    _refuse_foreign(ckpt)
    return ckpt if has_checkpoint(ckpt) else None


def read_state(ckpt: Path) -> dict[str, Any]:
    """The checkpoint's state.json, refused unless it is a kdlib checkpoint of this format."""
    state = _json(ckpt / STATE)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(
            f"{ckpt / STATE} is not a kdlib checkpoint of format {CHECKPOINT_FORMAT}; start again with --overwrite"
        )
    return state


def load_checkpoint(accelerator, ckpt: Path, model, optimizer, scheduler, ema=None) -> int:
    """Restore model, optimizer, scheduler, grad scaler, RNG (and `ema`, the averaged weights) from
    `ckpt`; return the step reached.

    Only JSON and safetensors are read: a pickle in the directory is never opened."""
    state = read_state(ckpt)
    net = accelerator.unwrap_model(model)
    net.load_state_dict(_tensors(ckpt / MODEL))
    if ema is not None:
        ema.load_state_dict(_tensors(ckpt / EMA))
    optimizer.load_state_dict(_join_optimizer(_tensors(ckpt / OPTIMIZER), state["optimizer"]))
    scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler") is not None and getattr(accelerator, "scaler", None) is not None:
        accelerator.scaler.load_state_dict(state["scaler"])
    rank = accelerator.process_index
    if (ckpt / f"rng-{rank}.safetensors").is_file():
        _set_rng_state(_tensors(ckpt / f"rng-{rank}.safetensors"), _json(ckpt / f"rng-{rank}.json"))
    else:
        accelerator.print(
            f"notice: {ckpt} has no RNG state for process {rank} (written by "
            f"{state.get('world_size')} processes); the generators keep their seeded state"
        )
    return int(state["step"])


# -- what a resume must keep ----------------------------------------------------------------
def math_config(cfg, targets, recipe) -> dict[str, Any]:
    """The fields of a run that decide what it computes (plain JSON): a resume must not change them.

    Left out on purpose: --out, --workers, checkpoint and eval cadence, --cpu, the world size
    (DESIGN invariant 6), the store's path (its identity is compared instead), --compile (the same
    math, compiled) and --log-with (where the numbers are also sent)."""
    c = {
        "student": cfg.student,
        "loss": cfg.loss,
        "ce_weight": cfg.ce_weight,
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "weight_decay": cfg.weight_decay,
        "warmup": schedule_settings(cfg)["warmup"],
        "clip": cfg.clip,
        "mixed_precision": cfg.mixed_precision,
        "seed": cfg.seed,
        "weights": cfg.weights,
        "mean": cfg.mean,
        "std": cfg.std,
        "recipe": recipe.digest_dict(),
        "source fingerprint": targets.source.fingerprint(),
        "training": training_settings(cfg),
    }
    if getattr(targets, "soft_target", "topk") != "topk":  # marginal or sampled targets (issue 21); topk: as before
        c["soft_target"] = targets.soft_target
    settings = loss_settings(cfg.loss, cfg)  # exactly the settings this loss takes (kdlib.losses.LOSS_SETTINGS)
    if cfg.loss == "dih":
        c["dih"] = settings
    else:
        c.update(settings)
    if cfg.attention_student:
        c["attention"] = {
            "student": cfg.attention_student,
            "teacher": cfg.attention_teacher,
            "weight": cfg.attention_weight,
            "grid": cfg.attention_grid,
        }
    if targets.store is not None:
        m = targets.store.meta
        c["store"] = {
            "teacher digest": m.teacher.get("digest"),
            "k": m.k,
            "logit_codec": m.logit_codec,
            "param_packing": m.param_packing,
            "views_per_epoch": m.views_per_epoch,
            "heads": m.heads,
            "attention": m.attention,
        }
        c["stored epochs cycled"] = targets.stored_epochs
    else:
        c["store"] = None
    if targets.teacher is not None:
        t = targets.teacher
        c["online teacher"] = {
            "spec": cfg.teacher,
            "digest": t.digest,
            "precision": t.precision,
            "contract": t.contract.to_dict(),
        }
    else:
        c["online teacher"] = None
    return json.loads(json.dumps(c))  # tuples -> lists, as read back from the checkpoint


# what a checkpoint written before issue 19 trained with (its config has no "training" entry)
LEGACY_TRAINING = {
    "optimizer": "adamw",
    "momentum": None,
    "nesterov": False,
    "decay_norm_bias": True,
    "lr_base_batch": None,
    "schedule": "cosine",
    "warmup_epochs": None,
    "min_lr": 0.0,
    "milestones": None,
    "step_gamma": None,
    "label_smoothing": 0.0,
    "grad_accum": 1,
    "ema": None,
    "keep_best": None,
}


def training_settings(cfg) -> dict[str, Any]:
    """The optimizer, schedule and training options of a run, defaults filled in (`math_config`'s "training")."""
    sched = schedule_settings(cfg)
    return {
        **optimizer_settings(cfg),
        "lr_base_batch": cfg.lr_base_batch,
        **{k: v for k, v in sched.items() if k != "warmup"},  # the fraction stays math_config's own "warmup"
        "label_smoothing": float(cfg.label_smoothing),
        "grad_accum": int(cfg.grad_accum),
        "ema": cfg.ema,
        "keep_best": cfg.keep_best,
    }


def check_resume(saved: dict[str, Any], now: dict[str, Any], ckpt: Path) -> None:
    """Refuse to resume `ckpt` (made with `saved`) under a config `now` that changes the math."""
    if "training" not in saved:  # written before the options existed: it trained with their defaults
        saved = {**saved, "training": LEGACY_TRAINING}
    diffs = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            for sub in sorted(set(a) | set(b)):
                if a.get(sub) != b.get(sub):
                    diffs.append(f"{key}.{sub} {a.get(sub)!r} -> {b.get(sub)!r}")
        else:
            diffs.append(f"{key} {a!r} -> {b!r}")
    if diffs:
        raise ConfigError(
            f"--resume refused: this command differs from the run in {ckpt} in what it computes: "
            + "; ".join(diffs)
            + ". Resume with the run's flags (see train_config.json), "
            "or start a new run with another --out or --overwrite"
        )


def check_out_dir(out: Path, resume: bool, overwrite: bool) -> bool:
    """Refuse to train into a directory that already holds files, unless --resume or --overwrite.

    Returns True when the run files there are to be replaced (`clear_run`, called just before the
    first write, so that a command refused later for another reason has removed nothing)."""
    if resume and overwrite:
        raise ConfigError("give --resume (continue the run in --out) or --overwrite (replace it), not both")
    if not out.exists():
        return False
    if not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory; choose another --out")
    _refuse_busy(out, FileLock.holder(str(out / RUN_LOCK)))
    names = sorted(p.name for p in out.iterdir() if p.name != RUN_LOCK)  # the lock file alone is no run
    if not names or resume:
        return False
    if not overwrite:
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        raise ConfigError(
            f"--out {out} already holds files ({shown}); give --resume to continue that run, "
            "--overwrite to replace it, or a new --out"
        )
    return True


def clear_run(out: Path) -> None:
    """Remove what `kdlib train` writes into `out` (`RUN_FILES`, and the temp files a killed run left of
    them, `.NAME.tmp-PID`: rundir.atomic_write), and nothing else of the user's."""
    for name in RUN_FILES:
        p = out / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
        for tmp in leftover_temps(p):
            tmp.unlink()


# -- one trainer per run dir; a failed run says so ------------------------------------------
def _refuse_busy(out: Path, holder: str | None) -> None:
    if holder is not None:
        raise RunBusyError(
            f"--out {out} is being trained into by {holder} ({out / RUN_LOCK}); wait for that run to "
            "finish or stop it, or give another --out"
        )


def lock_run(out: Path) -> FileLock:
    """Take `out`'s run lock (creating `out`), or refuse naming the live process that holds it.

    Taken by the main process before anything in `out` is removed or written; the kernel drops it
    when the process ends, however it ends (`FileLock.release` drops it earlier)."""
    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(out / RUN_LOCK))
    _refuse_busy(out, lock.acquire())
    return lock


def mark_failed(out: Path, info: dict[str, Any]) -> None:
    """Write `out`/failed.json (strict JSON: no bare NaN) saying where and why the run stopped."""
    tmp = out / (FAILED + ".tmp")
    tmp.write_text(json.dumps(info, indent=1, allow_nan=False) + "\n")
    tmp.replace(out / FAILED)


def read_failed(out: Path) -> dict[str, Any] | None:
    """What `out`/failed.json says (step, loss, reason), or None for a run that did not fail."""
    path = Path(out) / FAILED
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"reason": f"{path} is unreadable"}
    return info if isinstance(info, dict) else {"reason": f"{path} holds no JSON object"}
