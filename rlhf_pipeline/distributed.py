"""Several processes: one process group, rank 0 speaks and writes, the others wait; how they were launched.

accelerate's state is a singleton and its first creation wins: a bare `PartialState()` on a CPU machine
pins every rank to a world of one, and `Accelerator(cpu=True)` switches DeepSpeed off. Creating the
state as `PartialState(cpu=True)` first (NOTES-CPU) keeps DDP and DeepSpeed working on CPU, so every
stage calls `process_state()` before building anything else.

`read_launch` reads how `accelerate launch` started this process (world size, DeepSpeed and its ZeRO stage,
FSDP, values a DeepSpeed config fixes) from its environment variables, without importing accelerate.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from rlhf_pipeline.errors import PipelineError

# DeepSpeed config values a launch can fix (instead of "auto") that the recipe also sets.
_DEEPSPEED_FIXED_KEYS = ("gradient_accumulation_steps", "gradient_clipping", "train_micro_batch_size_per_gpu",
                         "train_batch_size")


def process_state(timeout_seconds: float | None = None) -> Any:
    """The process group, created for CPU when there is no GPU.

    `timeout_seconds` (the recipe's `ddp_timeout`) bounds how long a collective waits for a rank that
    hangs; it applies when this call creates the group, which the CLI's is, before the trainer's arguments.
    """
    import torch
    from accelerate import PartialState

    if timeout_seconds is None:
        return PartialState(cpu=not torch.cuda.is_available())
    return PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(seconds=timeout_seconds))


def is_main_process() -> bool:
    """Rank 0 (or a single process) writes files and prints summaries; other ranks stay quiet."""
    return process_state().is_main_process


def launched_as_rank_zero() -> bool:
    """Rank 0 (or a single process), read from the launcher's environment: usable before the process group
    exists (the output lock) and inside a signal handler."""
    return os.environ.get("RANK", "0") == "0"


def wait_for_everyone() -> None:
    """A barrier, so no rank reads an output before rank 0 has finished writing it."""
    process_state().wait_for_everyone()


@contextmanager
def node_main_process_first() -> Iterator[None]:
    """The main process of each node runs the block first (it builds a cache), the node's others after it (they
    read what it built): one conversion per node, not one per process."""
    with process_state().local_main_process_first():
        yield


def max_over_processes(value: float) -> float:
    """The largest of every process's `value` (a collective: all ranks call it at the same point)."""
    state = process_state()
    if state.num_processes == 1:
        return value
    import torch

    tensor = torch.tensor([value], dtype=torch.float32, device=state.device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return float(tensor.item())


def quiet_unless_main() -> None:
    """Progress bars on rank 0 only: datasets' map/filter bars would otherwise print once per process."""
    if not is_main_process():
        import datasets

        datasets.disable_progress_bars()


def say(message: str) -> None:
    """Print a progress line on the main process only."""
    if is_main_process():
        print(message, flush=True)


# What a collective raises (gloo, NCCL) when another rank has exited: the cause is in that rank's output.
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "remote process exited",
              "NCCL communicator was aborted")


def report_rank_failure(err: Exception) -> int:
    """Say once which rank failed and why (call it in the `except` block); the exit status to return.

    A rank whose collective broke because another rank is gone says so in one line instead of a second
    traceback. The failing rank prints a summary line and records the error with its traceback where
    `accelerate launch`'s agent reads it, so the agent's closing summary names that rank and the error as
    the root cause (launched otherwise, the rank prints the traceback itself). The agent then stops the
    other ranks within seconds (SIGTERM; SIGKILL after TORCH_ELASTIC_SHUTDOWN_TIMEOUT, 30 s by default),
    and the newest complete checkpoint stays valid.
    """
    import traceback

    rank, world = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    first_line = next(iter(str(err).splitlines()), "")
    if any(marker in str(err) for marker in _PEER_GONE):
        print(f"rank {rank}: stopped because another process exited ({type(err).__name__}: {first_line}); "
              "its error is the root cause", file=sys.stderr, flush=True)
        return 1
    if os.environ.get("TORCHELASTIC_ERROR_FILE"):  # the agent prints this traceback in its summary
        from torch.distributed.elastic.multiprocessing.errors import get_error_handler

        get_error_handler().record_exception(err)
    else:
        traceback.print_exc()
    print(f"rank {rank} of {world} failed: {type(err).__name__}: {first_line}", file=sys.stderr, flush=True)
    return 1


@dataclass(frozen=True)
class Launch:
    """How this process was launched, as far as the environment tells."""

    world_size: int = 1
    deepspeed: bool = False
    zero_stage: int | None = None
    fsdp: bool = False
    # Values the DeepSpeed config fixes (not "auto"), and where each came from.
    deepspeed_values: dict[str, float] = field(default_factory=dict)
    deepspeed_sources: dict[str, str] = field(default_factory=dict)

    @property
    def shards_parameters(self) -> bool:
        """ZeRO-3 and FSDP split every parameter over the processes."""
        return self.fsdp or (self.deepspeed and self.zero_stage == 3)

    @property
    def backend(self) -> str:
        if self.deepspeed:
            return f"DeepSpeed ZeRO-{self.zero_stage}" if self.zero_stage is not None else "DeepSpeed"
        return "FSDP" if self.fsdp else ("DDP" if self.world_size > 1 else "a single process")


def _true(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes")


def _number(value: Any) -> float | None:
    """A fixed numeric config value; None for "auto", missing or anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(str(value))
    except (TypeError, ValueError):
        return None


def read_launch(env: Mapping[str, str] | None = None) -> Launch:
    """Read the launch from `accelerate launch`'s environment variables (and its DeepSpeed config file)."""
    env = os.environ if env is None else env
    deepspeed = _true(env.get("ACCELERATE_USE_DEEPSPEED"))
    stage = _number(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE"))
    values: dict[str, float] = {}
    sources: dict[str, str] = {}
    if deepspeed:
        for key, variable in (("gradient_accumulation_steps", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS"),
                              ("gradient_clipping", "ACCELERATE_GRADIENT_CLIPPING")):
            number = _number(env.get(variable))
            if number is not None:
                values[key], sources[key] = number, f"{variable}={env[variable]}, from the accelerate config"
        config_file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        if config_file and config_file.lower() != "none":
            config = _read_deepspeed_file(Path(config_file))
            stage = _number(config.get("zero_optimization", {}).get("stage", stage))
            for key in _DEEPSPEED_FIXED_KEYS:
                number = _number(config.get(key))
                if number is not None:
                    values[key], sources[key] = number, f"{key}: {config[key]} in {config_file}"
    return Launch(world_size=int(env.get("WORLD_SIZE", "1") or 1), deepspeed=deepspeed,
                  zero_stage=int(stage) if stage is not None else None, fsdp=_true(env.get("ACCELERATE_USE_FSDP")),
                  deepspeed_values=values, deepspeed_sources=sources)


def _read_deepspeed_file(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise PipelineError(f"deepspeed_config_file: cannot read {path} ({err}); fix the path in the accelerate "
                            "config") from err
    if not isinstance(config, dict):
        raise PipelineError(f"deepspeed_config_file: {path} is not a JSON object")
    return config
