"""The one decision of device and processes, for every command that runs a model.

accelerate's process state decides it (one process, or the N that `accelerate launch` started),
with `--cpu` (or ACCELERATE_USE_CPU=1) forcing the CPU; `Accelerator(cpu=...)` in train shares
the same state. Only the main process prints (`main_print`).
"""

from __future__ import annotations

import os

from accelerate import PartialState
from accelerate.utils import parse_flag_from_env

from .errors import ConfigError

__all__ = ["process_state", "check_world", "main_print"]


def process_state(cpu: bool = False) -> PartialState:
    """accelerate's process state; honours ACCELERATE_USE_CPU like `Accelerator` does (PartialState alone does not).

    The state is made once per process: the first command's choice holds for the process's life."""
    state = PartialState(cpu=cpu or parse_flag_from_env("ACCELERATE_USE_CPU"))
    check_world(state.num_processes)
    return state


def check_world(num_processes: int) -> None:
    """Refuse to run as N unsynchronised copies when a launcher started N processes but no group formed."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != num_processes:
        raise ConfigError(
            f"launched as {launched} processes (WORLD_SIZE) but accelerate formed a group of {num_processes}; "
            "on CPU set ACCELERATE_USE_CPU=1 with `accelerate launch --multi_gpu --num_processes N`"
        )


def main_print(*args: object, **kwargs: object) -> None:
    """`print` on the main process only (every process of a launched run calls it)."""
    if PartialState().is_main_process:
        print(*args, **kwargs)
