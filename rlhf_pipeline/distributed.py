"""Several processes: one process group, rank 0 speaks and writes, the others wait.

accelerate's state is a singleton and its first creation wins: a bare `PartialState()` on a CPU machine
pins every rank to a world of one, and `Accelerator(cpu=True)` switches DeepSpeed off. Creating the
state as `PartialState(cpu=True)` first (NOTES-CPU) keeps DDP and DeepSpeed working on CPU, so every
stage calls `process_state()` before building anything else.
"""

from __future__ import annotations

from typing import Any


def process_state() -> Any:
    """The process group, created for CPU when there is no GPU."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def is_main_process() -> bool:
    """Rank 0 (or a single process) writes files and prints summaries; other ranks stay quiet."""
    return process_state().is_main_process


def wait_for_everyone() -> None:
    """A barrier, so no rank reads an output before rank 0 has finished writing it."""
    process_state().wait_for_everyone()


def quiet_unless_main() -> None:
    """Progress bars on rank 0 only: datasets' map/filter bars would otherwise print once per process."""
    if not is_main_process():
        import datasets

        datasets.disable_progress_bars()


def say(message: str) -> None:
    """Print a progress line on the main process only."""
    if is_main_process():
        print(message, flush=True)
