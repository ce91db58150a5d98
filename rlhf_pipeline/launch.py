"""`rlhf-pipeline launch`: run a stage under `accelerate launch` with a shipped accelerate profile, by name.

    rlhf-pipeline launch --config deepspeed_zero2 sft recipes/smollm2-135m/sft.yaml
    rlhf-pipeline launch --config multi_gpu --num-processes 4 rm recipe.yaml training.learning_rate=1e-4
    rlhf-pipeline launch --list

The first line runs exactly `accelerate launch --config_file <package>/accelerate_configs/deepspeed_zero2.yaml
-m rlhf_pipeline sft recipes/smollm2-135m/sft.yaml` (with this Python's accelerate); `--dry-run` prints that
command instead. The profiles are package data (`rlhf_pipeline/accelerate_configs/`, as TRL ships
`trl/accelerate_configs/`), so a name works after a plain `pip install` as well as in a checkout, whose
top-level `accelerate_configs/` is a symlink to the same folder. `--config` also takes any config file path.
Multi-node flags (`--machine_rank`, `--main_process_ip`, ...) are for `accelerate launch` itself.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from rlhf_pipeline.errors import PipelineError

CONFIGS_DIR = Path(__file__).resolve().parent / "accelerate_configs"


def shipped_configs() -> dict[str, Path]:
    """Profile name (file stem) -> absolute path, read from the package data so every install has them."""
    return {path.stem: path for path in sorted(CONFIGS_DIR.glob("*.yaml"))}


def resolve_config(name_or_path: str) -> Path:
    """An existing config file path, or a shipped profile name with or without `.yaml`."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path.resolve()
    shipped = shipped_configs()
    name = path.name.removesuffix(".yaml").removesuffix(".yml")
    if name in shipped and len(path.parts) == 1:
        return shipped[name]
    raise PipelineError(f"--config: '{name_or_path}' is neither a file nor a shipped profile; profiles: "
                        f"{', '.join(shipped)}")


def launch_command(config: Path, stage: str, recipe: str, overrides: list[str] | tuple[str, ...] = (),
                   num_processes: int | None = None, main_process_port: int | None = None) -> list[str]:
    """The `accelerate launch` command line (this interpreter's accelerate) that runs one stage."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    if num_processes is not None:
        command += ["--num_processes", str(num_processes)]
    if main_process_port is not None:
        command += ["--main_process_port", str(main_process_port)]
    return [*command, "-m", "rlhf_pipeline", stage, recipe, *overrides]


def check_environment(config: Path, env: Mapping[str, str] | None = None) -> None:
    """ACCELERATE_USE_CPU=true makes accelerate drop DeepSpeed silently (accelerate_configs/README.md)."""
    env = os.environ if env is None else env
    raw = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    use_cpu = env.get("ACCELERATE_USE_CPU", "").strip().lower() in ("1", "true", "yes")
    if use_cpu and isinstance(raw, dict) and raw.get("distributed_type") == "DEEPSPEED":
        raise PipelineError(f"ACCELERATE_USE_CPU is set, which makes accelerate run {config.name} as plain DDP "
                            "without DeepSpeed; unset it (the stages select the CPU themselves)")


def add_commands(subparsers: Any) -> None:
    """`launch`."""
    from rlhf_pipeline.stages import STAGE_NAMES

    sub = subparsers.add_parser(
        "launch", help="run a stage under `accelerate launch` with a shipped accelerate profile",
        description="Run `accelerate launch --config_file <profile> -m rlhf_pipeline STAGE RECIPE ...` with a "
                    "profile shipped in the package (rlhf_pipeline/accelerate_configs/, the checkout's "
                    "accelerate_configs/) named by its file name, or with any config file path.",
        epilog="example: rlhf-pipeline launch --config deepspeed_zero2 sft recipes/smollm2-135m/sft.yaml\n"
               "         rlhf-pipeline launch --list",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub.add_argument("--config", help="profile name (e.g. multi_gpu, deepspeed_zero3) or config file path")
    sub.add_argument("--list", action="store_true", help="print the shipped profiles and their paths, then exit")
    sub.add_argument("--num-processes", type=int, help="override the profile's process count")
    sub.add_argument("--main-process-port", type=int, help="rendezvous port (0: pick a free one)")
    sub.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    sub.add_argument("stage", nargs="?", choices=[*STAGE_NAMES, "run"], help="stage to run (or run: a pipeline)")
    sub.add_argument("recipe", nargs="?", help="the stage's (or pipeline's) recipe")
    sub.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, as for the stage command")
    sub.set_defaults(handler=_launch)


def _launch(args: argparse.Namespace) -> int:
    if args.list:
        for name, path in shipped_configs().items():
            print(f"{name:32} {path}")
        return 0
    if not (args.config and args.stage and args.recipe):
        raise PipelineError("launch: give --config NAME_OR_PATH, a STAGE and a RECIPE (or --list)")
    config = resolve_config(args.config)
    command = launch_command(config, args.stage, args.recipe, args.overrides, args.num_processes,
                             args.main_process_port)
    check_environment(config)
    if args.dry_run:
        print(shlex.join(command))
        return 0
    sys.stdout.flush()
    os.execv(sys.executable, command)
    return 0  # not reached: execv replaces this process
