"""The `rlhf-pipeline` command: one subcommand per stage, plus `validate` and `run` for the whole chain.

Nothing heavy is imported until a stage actually runs, so `--help` and `validate` answer at once.
Problems the user can fix print as one line naming the file and key, and exit with status 2.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from rlhf_pipeline.distributed import launched_as_rank_zero
from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.stopping import Stopped, stop_signals_handled

# Modules that add tool commands (push, merge, report, estimate...): each defines
# `add_commands(subparsers)` and gives every command a `handler(args) -> int` via set_defaults.
_TOOL_MODULES: tuple[str, ...] = ("rlhf_pipeline.hub", "rlhf_pipeline.merge", "rlhf_pipeline.report",
                                   "rlhf_pipeline.launch", "rlhf_pipeline.estimate", "rlhf_pipeline.human")
_OVERRIDES_HELP = "overrides of any recipe key, e.g. training.learning_rate=1e-4 model.lora.r=8"


def _add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="path to the stage's YAML recipe")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=_OVERRIDES_HELP)


def _add_stop_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force-unlock", action="store_true",
                        help="take over an output folder whose lock is held by a run that is gone for good "
                             "(e.g. on a host that was shut down); a lock of a dead process on this host is "
                             "taken over without it")
    parser.add_argument("--grace-period", type=float, metavar="SECONDS",
                        help="after SIGTERM/SIGINT, exit at once if the current step and its checkpoint are not "
                             "done within SECONDS (default: wait for them); set it below your scheduler's grace "
                             "period")


def make_parser() -> argparse.ArgumentParser:
    from rlhf_pipeline.stages import STAGE_NAMES, get_stage

    parser = argparse.ArgumentParser(
        prog="rlhf-pipeline",
        description="InstructGPT's RLHF chain (SFT, reward model, PPO) as YAML recipes.",
        epilog="example: rlhf-pipeline run recipes/smollm2-135m/pipeline.yaml",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    validate = commands.add_parser(
        "validate", help="check a recipe completely without loading any weights",
        description="Check a stage or pipeline recipe (keys, types, values, data cards) in about a second.",
        epilog="example: rlhf-pipeline validate recipes/smollm2-135m/sft.yaml",
    )
    _add_recipe_arguments(validate)
    run = commands.add_parser(
        "run", help="run a pipeline recipe: every stage in order, finished ones skipped",
        description="Run the whole chain (e.g. sft, label, rm, ppo, eval); a stage whose recipe and inputs are "
                    "unchanged since it finished is skipped.",
        epilog="example: rlhf-pipeline run recipes/smollm2-135m/pipeline.yaml --from rm",
    )
    run.add_argument("recipe", help="path to the pipeline recipe")
    run.add_argument("--from", dest="start", metavar="STAGE",
                     help="re-run from this stage of the pipeline on (e.g. rm; in a pipeline with rounds, round-2/ppo)")
    run.add_argument("--force", action="store_true", help="re-run every stage")
    _add_stop_arguments(run)
    for name in STAGE_NAMES:
        stage = get_stage(name)
        sub = commands.add_parser(name, help=stage.summary, description=stage.summary,
                                  epilog=f"example: {stage.example}\n  under accelerate: accelerate launch "
                                         f"-m rlhf_pipeline {name} RECIPE",
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_recipe_arguments(sub)
        sub.add_argument("--overwrite", action="store_true",
                         help="replace a finished run of a different recipe in the output directory")
        _add_stop_arguments(sub)
    for module in _TOOL_MODULES:
        importlib.import_module(module).add_commands(commands)
    return parser


def _validate(recipe_path: str, overrides: list[str]) -> None:
    from rlhf_pipeline.schema import read_yaml
    from rlhf_pipeline.stages import load_recipe

    if {"stages", "rounds"} & read_yaml(Path(recipe_path)).keys():
        from rlhf_pipeline.pipeline import read_pipeline, validate_pipeline

        validate_pipeline(recipe_path)
        names = [step.key for step in read_pipeline(recipe_path)[1]]
        print(f"{recipe_path}: valid pipeline ({' -> '.join(names)})")
        return
    recipe = load_recipe(recipe_path, overrides)
    print(f"{recipe_path}: valid {recipe.stage} recipe (output: {recipe.output_dir})")


def _run_stage(name: str, recipe_path: str, overrides: list[str], overwrite: bool, force_unlock: bool) -> None:
    from rlhf_pipeline.distributed import say
    from rlhf_pipeline.pipeline import run_stage
    from rlhf_pipeline.stages import load_recipe
    from rlhf_pipeline.stages.common import finished_run

    recipe = load_recipe(recipe_path, overrides, stage=name)
    if finished_run(recipe):
        say(f"{name}: already finished with this recipe in {recipe.output_dir}; nothing to do")
        return
    run_stage(recipe, overwrite, force_unlock)


# Disk and permission failures a user can fix: said in one line with the path, not as a traceback.
_FREE_SPACE = ("free space (or choose another output_dir), then re-run the same command: it resumes from the last "
               "complete checkpoint")
_FILE_PROBLEMS = {
    errno.ENOSPC: _FREE_SPACE,
    errno.EDQUOT: _FREE_SPACE,
    errno.EACCES: "fix the folder's permissions or choose another output_dir",
    errno.EPERM: "fix the folder's permissions or choose another output_dir",
    errno.EROFS: "choose an output_dir on a writable disk",
    errno.ENOTDIR: "part of the path is a file, not a folder; choose another output_dir or move that file",
}


def _file_problem(err: OSError) -> str | None:
    """One line for a fixable disk or permission error, or None for anything else (a bug: keep the traceback)."""
    hint = _FILE_PROBLEMS.get(err.errno) if err.errno is not None else None
    if hint is None:
        return None
    return f"{err.filename or 'writing the outputs'}: {err.strerror or os.strerror(err.errno)}; {hint}"


def _quiet_known_noise() -> None:
    """Hide messages the stack prints on every run that are harmless here (NOTES-CPU), so real ones show."""
    for message in (".*is_gradient_checkpointing.*", ".*degrees of freedom.*",
                    ".*Passing `generation_config` together with generation-related arguments.*"):
        warnings.filterwarnings("ignore", message=message)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    _quiet_known_noise()
    try:
        if hasattr(args, "handler"):
            return args.handler(args)
        if args.command == "validate":
            _validate(args.recipe, args.overrides)
            return 0
        with stop_signals_handled(args.grace_period):
            if args.command == "run":
                from rlhf_pipeline.pipeline import run_pipeline

                run_pipeline(args.recipe, start=args.start, force=args.force, force_unlock=args.force_unlock)
            else:
                _run_stage(args.command, args.recipe, args.overrides, args.overwrite, args.force_unlock)
    except Stopped as stop:
        if launched_as_rank_zero():
            print(stop.message, file=sys.stderr)
        return stop.exit_status
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        problem = _file_problem(err)
        if problem is None:
            raise
        print(f"error: {problem}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    except Exception as err:
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            raise
        from rlhf_pipeline.distributed import report_rank_failure

        return report_rank_failure(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
