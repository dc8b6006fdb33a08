"""The one decision of device and processes, for every command that runs a model.

accelerate's process state decides it (one process, or the N that `accelerate launch` started),
with `--cpu` (or ACCELERATE_USE_CPU=1) forcing the CPU; `Accelerator(cpu=...)` in train shares
the same state. Only the main process prints (`main_print`).
"""

from __future__ import annotations

import atexit
import os
import sys

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import parse_flag_from_env

from .errors import ConfigError

__all__ = ["process_state", "check_world", "exit_failed", "end_trackers", "main_print"]


def process_state(cpu: bool = False) -> PartialState:
    """accelerate's process state; honours ACCELERATE_USE_CPU like `Accelerator` does (PartialState alone does not).

    The state is made once per process: the first command's choice holds for the process's life."""
    state = PartialState(cpu=cpu or parse_flag_from_env("ACCELERATE_USE_CPU"))
    check_world(state.num_processes)
    return state


_exit_hook = {"registered": False, "failed": False}


def exit_failed() -> None:
    """Say that the process is ending on an error (the CLI's one-line errors): the group is then left to
    the interpreter's teardown, as before, and not destroyed gracefully (see `_end_process_group`)."""
    _exit_hook["failed"] = True


def _end_process_group() -> None:
    """Destroy the process group at a clean exit while the interpreter is still whole. Left to the
    interpreter's teardown, gloo's threads are destroyed still joinable and the process aborts ("terminate
    called without an active exception", SIGABRT: a run that had finished fails, by chance; pytorch#190489).
    Not at an exit on an error: a graceful destroy flushes the collectives in flight, and one a failed rank
    left (or one whose peer is gone) could hold the exit. Not at the end of each command either: a script
    may run several (kdlib.precompute, then kdlib.train)."""
    if _exit_hook["failed"] or getattr(sys, "last_value", None) is not None:  # last_value: an uncaught exception
        return
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        try:
            torch.distributed.destroy_process_group()
        except Exception:  # the work is done and saved: a failed clean-up must not print a traceback at exit
            pass


def check_world(num_processes: int) -> None:
    """Refuse to run as N unsynchronised copies when a launcher started N processes but no group formed;
    a group that did form is destroyed at the process's exit."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != num_processes:
        raise ConfigError(
            f"launched as {launched} processes (WORLD_SIZE) but accelerate formed a group of {num_processes}; "
            "on CPU set ACCELERATE_USE_CPU=1 with `accelerate launch --multi_gpu --num_processes N`"
        )
    if num_processes > 1 and not _exit_hook["registered"]:  # in a group: destroyed at exit (once; hooks
        # registered later, e.g. an object store's lease release, run before it)
        _exit_hook["registered"] = True
        atexit.register(_end_process_group)


def end_trackers(accelerator: Accelerator) -> None:
    """Flush and close the run's trackers (`--log-with`): what `Accelerator.end_training` does, less
    destroying the process group, which the process's exit does (`check_world`)."""
    for tracker in accelerator.trackers:
        tracker.finish()


def main_print(*args: object, **kwargs: object) -> None:
    """`print` on the main process only (every process of a launched run calls it)."""
    if PartialState().is_main_process:
        print(*args, **kwargs)
