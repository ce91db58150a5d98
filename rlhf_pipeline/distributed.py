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
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf_pipeline.errors import PipelineError

# DeepSpeed config values a launch can fix (instead of "auto") that the recipe also sets.
_DEEPSPEED_FIXED_KEYS = ("gradient_accumulation_steps", "gradient_clipping", "train_micro_batch_size_per_gpu",
                         "train_batch_size")


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
