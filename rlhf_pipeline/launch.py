"""`rlhf-pipeline launch`: run a stage under `accelerate launch` with a shipped accelerate profile, by name.

    rlhf-pipeline launch --config deepspeed_zero2 sft recipes/smollm2-135m/sft.yaml
    rlhf-pipeline launch --config multi_gpu --num-processes 4 rm recipe.yaml training.learning_rate=1e-4
    rlhf-pipeline launch --list

The first line runs exactly `accelerate launch --config_file <repo>/accelerate_configs/deepspeed_zero2.yaml
-m rlhf_pipeline sft recipes/smollm2-135m/sft.yaml` (with this Python's accelerate); `--dry-run` prints that
command instead. The profiles live in the repository's `accelerate_configs/`, found next to the package
source, which is where a source checkout or an editable install (`pip install -e .`, what `make` does) runs
from. They are not inside the wheel: after a plain `pip install`, give `--config` the path of a config file.
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

CONFIGS_FOLDER = "accelerate_configs"


def configs_dir() -> Path | None:
    """The repository's accelerate_configs/ next to the package source, if this install has one."""
    folder = Path(__file__).resolve().parent.parent / CONFIGS_FOLDER
    return folder if folder.is_dir() else None


def shipped_configs() -> dict[str, Path]:
    """Profile name (file stem) -> absolute path; empty when the profiles are not next to the package."""
    folder = configs_dir()
    return {path.stem: path for path in sorted(folder.glob("*.yaml"))} if folder else {}


def resolve_config(name_or_path: str) -> Path:
    """An existing config file path, or a shipped profile name with or without `.yaml`."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path.resolve()
    shipped = shipped_configs()
    name = path.name.removesuffix(".yaml").removesuffix(".yml")
    if name in shipped and len(path.parts) == 1:
        return shipped[name]
    if not shipped:
        raise PipelineError(f"--config: '{name_or_path}' is not a file, and no shipped profiles were found: they "
                            f"are in the repository's {CONFIGS_FOLDER}/ (not in the wheel); pass the path of an "
                            "accelerate config file")
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
                    f"profile from the repository's {CONFIGS_FOLDER}/ named by its file name (or any config "
                    "file path). The profiles are not part of the wheel: after a plain pip install, pass a path.",
        epilog="example: rlhf-pipeline launch --config deepspeed_zero2 sft recipes/smollm2-135m/sft.yaml",
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
        shipped = shipped_configs()
        if not shipped:
            raise PipelineError(f"no shipped profiles next to this install (the repository's {CONFIGS_FOLDER}/ is "
                                "not in the wheel); pass --config a config file path")
        for name, path in shipped.items():
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
