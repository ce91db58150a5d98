"""The whole chain in one command: each stage recipe in order, finished stages skipped, inputs tracked.

    rlhf-pipeline run recipes/smollm2-135m/pipeline.yaml
    rlhf-pipeline run recipes/smollm2-135m/pipeline.yaml --from rm

A pipeline recipe lists stage recipes (paths relative to it) with optional overrides. Stages feed each
other by the paths in their recipes (the RM's `model.name_or_path` is the SFT output folder, the RM's
data card is the label stage's generated card...). Every stage recipe is validated before anything
runs; inputs that an earlier stage will produce are allowed to be missing at that point. A stage is
skipped when its output holds a finished run of the same recipe whose upstream outputs are unchanged.
Under `accelerate launch -m rlhf_pipeline run ...` every rank walks the same chain and the stages run
collectively; ranks wait for each other between stages.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf_pipeline.errors import RecipeError
from rlhf_pipeline.recipe import Recipe
from rlhf_pipeline.schema import read_yaml, suggest
from rlhf_pipeline.stages import load_recipe


@dataclass
class PipelineStep:
    """One stage of the chain: its recipe file and the overrides the pipeline applies to it."""

    stage: str
    recipe: Path
    overrides: list[str] = field(default_factory=list)


def read_pipeline(path: str | Path) -> tuple[str, list[PipelineStep]]:
    """Parse a pipeline recipe: `name`, and `stages` as a list of {stage, recipe, overrides}."""
    from rlhf_pipeline.stages import STAGE_NAMES

    path = Path(path)
    data = read_yaml(path, what="pipeline recipe")
    for key in data:
        if key not in ("name", "stages"):
            raise RecipeError(path, str(key), f"unknown key{suggest(str(key), ['name', 'stages'])}")
    if not isinstance(data.get("stages"), list) or not data["stages"]:
        raise RecipeError(path, "stages", "list the stages, e.g. - {stage: sft, recipe: sft.yaml}")
    steps = []
    for index, item in enumerate(data["stages"]):
        where = f"stages[{index}]"
        if not isinstance(item, dict) or set(item) - {"stage", "recipe", "overrides"} or "recipe" not in item:
            raise RecipeError(path, where, "each stage is a mapping with stage, recipe and optional overrides")
        if item.get("stage") not in STAGE_NAMES:
            raise RecipeError(path, f"{where}.stage",
                              f"unknown stage '{item.get('stage')}'{suggest(str(item.get('stage')), STAGE_NAMES)}")
        overrides = item.get("overrides") or {}
        if not isinstance(overrides, dict):
            raise RecipeError(path, f"{where}.overrides", "a mapping of key paths to values")
        steps.append(PipelineStep(item["stage"], path.parent / item["recipe"],
                                  [f"{key}={_yaml_scalar(value)}" for key, value in overrides.items()]))
    return str(data.get("name", path.stem)), steps


def _yaml_scalar(value: Any) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def validate_pipeline(path: str | Path) -> list[Recipe]:
    """Validate every stage recipe up front; outputs of earlier stages may not exist yet."""
    _, steps = read_pipeline(path)
    recipes: list[Recipe] = []
    for step in steps:
        pending = [r.output_dir for r in recipes]
        recipes.append(load_recipe(step.recipe, step.overrides, stage=step.stage, pending_outputs=pending))
    return recipes


def run_stage(recipe: Recipe, overwrite: bool, force_unlock: bool = False) -> Any:
    """Run one stage in its output folder, which it holds locked for the whole run (rlhf_pipeline/locks.py).

    A finished run of another recipe there is replaced only with `overwrite`; this recipe's checkpoints stay,
    so the stage resumes from them. Its wall time and peak memory are measured here (rlhf_pipeline/resources.py)
    and recorded in its manifest.
    """
    from rlhf_pipeline.distributed import process_state
    from rlhf_pipeline.locks import output_lock
    from rlhf_pipeline.outputs import check_writable
    from rlhf_pipeline.resources import measure_stage
    from rlhf_pipeline.stages import get_stage
    from rlhf_pipeline.stages.common import claim_output_dir

    with output_lock(recipe.output_dir, f"{recipe.stage} stage of {recipe.path}", force_unlock), measure_stage():
        process_state(recipe.config.get("ddp_timeout"))  # after the lock: a refusal needs no torch, so it is quick
        claim_output_dir(recipe, overwrite)
        try:
            check_writable(recipe.output_dir)  # a full or read-only disk fails now, not after loading the model
            return get_stage(recipe.stage).run(recipe)
        except OSError as err:
            if not err.filename:  # a failed write() names no file; the stage's folder is where to look
                err.filename = str(recipe.output_dir)
            raise


def run_pipeline(path: str | Path, start: str | None = None, force: bool = False,
                 force_unlock: bool = False) -> dict[str, Any]:
    """Run the chain; `start` re-runs from that stage on, `force` re-runs everything."""
    from rlhf_pipeline.distributed import is_main_process, say, wait_for_everyone
    from rlhf_pipeline.stages.common import finished_run

    name, steps = read_pipeline(path)
    names = [r.stage for r in validate_pipeline(path)]
    if start is not None and start not in names:
        raise RecipeError(Path(path), "--from", f"no stage '{start}' in this pipeline; stages: {', '.join(names)}")
    rerun_from = names.index(start) if start else (0 if force else len(names))
    results: dict[str, Any] = {}
    output_dirs: list[Path] = []
    ran: list[bool] = []
    started = time.monotonic()
    for index, step in enumerate(steps):
        recipe = load_recipe(step.recipe, step.overrides, stage=step.stage)  # upstream outputs exist now
        output_dirs.append(recipe.output_dir)
        counter = f"[{index + 1}/{len(steps)}] {recipe.stage}"
        if index < rerun_from and finished_run(recipe):
            say(f"{counter}: finished earlier with this recipe and inputs; skipped")
            results[recipe.stage] = "skipped"
            ran.append(False)
            continue
        say(f"{counter}: running {recipe.path}")
        results[recipe.stage] = run_stage(recipe, overwrite=True, force_unlock=force_unlock)
        wait_for_everyone()
        ran.append(True)
    if is_main_process():
        from rlhf_pipeline.report import console_summary, report_dir_for, write_report_safely, write_summary_report

        say(f"pipeline finished in {time.monotonic() - started:.0f} s:")
        for line in console_summary(output_dirs, ran):
            say(line)
        report_dir = report_dir_for(output_dirs, Path(path).parent)
        if report := write_report_safely(lambda folder: write_summary_report(output_dirs, folder, f"Pipeline {name}"),
                                         report_dir):
            say(f"pipeline report: {report}")
    return results
