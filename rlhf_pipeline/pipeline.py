"""The whole chain in one command: each stage recipe in order, finished stages skipped, inputs tracked.

    rlhf-pipeline run recipes/smollm2-135m/pipeline.yaml
    rlhf-pipeline run recipes/smollm2-135m/pipeline.yaml --from rm

A pipeline recipe lists stage recipes (paths relative to it) with optional overrides. Stages feed each
other by the paths in their recipes (the RM's `model.name_or_path` is the SFT output folder, the RM's
data card is the label stage's generated card...). Every stage recipe is validated before anything
runs; inputs that an earlier stage will produce are allowed to be missing at that point. A stage is
skipped when its output holds a finished run of the same recipe whose upstream outputs are unchanged.
Under `accelerate launch -m rlhf_pipeline run ...` every rank walks the same chain and the stages run
collectively; ranks wait for each other between stages. A `rounds:` section repeats label → rm → ppo → eval
after the stages, each round on the previous one's policy and reward model (iterated RLHF: rlhf_pipeline/rounds.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf_pipeline.errors import PipelineError, RecipeError
from rlhf_pipeline.recipe import Recipe, override_text
from rlhf_pipeline.rounds import RoundsSpec, check_round, expand_rounds, read_rounds
from rlhf_pipeline.schema import read_yaml, suggest
from rlhf_pipeline.stages import load_recipe


@dataclass
class PipelineStep:
    """One stage of the chain: its recipe file and the overrides the pipeline applies to it."""

    stage: str
    recipe: Path
    overrides: list[str] = field(default_factory=list)
    round: int | None = None  # the round of a pipeline's `rounds:` this stage belongs to
    rounds: RoundsSpec | None = None

    @property
    def key(self) -> str:
        """How results and `--from` name the step: its stage, prefixed with its round (`round-2/ppo`)."""
        return self.stage if self.round is None else f"round-{self.round}/{self.stage}"


def read_pipeline(path: str | Path) -> tuple[str, list[PipelineStep]]:
    """Parse a pipeline recipe: `name`, `stages` as a list of {stage, recipe, overrides}, and optional `rounds`
    (expanded here into every round's stages)."""
    path = Path(path)
    data = read_yaml(path, what="pipeline recipe")
    for key in data:
        if key not in ("name", "stages", "rounds"):
            raise RecipeError(path, str(key), f"unknown key{suggest(str(key), ['name', 'stages', 'rounds'])}")
    rounds = data.get("rounds")
    if rounds is not None and (not isinstance(rounds, dict) or "stages" not in rounds):
        raise RecipeError(path, "rounds", "a mapping with count and stages (label, rm, ppo, eval), e.g. "
                          "{count: 2, stages: [{stage: label, recipe: label.yaml}, ...]}")
    if rounds is None and (not isinstance(data.get("stages"), list) or not data["stages"]):
        raise RecipeError(path, "stages", "list the stages, e.g. - {stage: sft, recipe: sft.yaml}")
    steps = _read_steps(path, data["stages"], "stages") if "stages" in data else []
    if rounds is not None:
        templates = _read_steps(path, rounds["stages"], "rounds.stages")
        steps += expand_rounds(read_rounds(path, rounds, templates), templates, steps)
    return str(data.get("name", path.stem)), steps


def _read_steps(path: Path, items: Any, where: str) -> list[PipelineStep]:
    from rlhf_pipeline.stages import STAGE_NAMES

    if not isinstance(items, list) or not items:
        raise RecipeError(path, where, "list the stages, e.g. - {stage: sft, recipe: sft.yaml}")
    steps = []
    prefix = where
    for index, item in enumerate(items):
        where = f"{prefix}[{index}]"
        if not isinstance(item, dict) or set(item) - {"stage", "recipe", "overrides"} or "recipe" not in item:
            raise RecipeError(path, where, "each stage is a mapping with stage, recipe and optional overrides")
        if item.get("stage") not in STAGE_NAMES:
            raise RecipeError(path, f"{where}.stage",
                              f"unknown stage '{item.get('stage')}'{suggest(str(item.get('stage')), STAGE_NAMES)}")
        overrides = item.get("overrides") or {}
        if not isinstance(overrides, dict):
            raise RecipeError(path, f"{where}.overrides", "a mapping of key paths to values")
        steps.append(PipelineStep(item["stage"], path.parent / item["recipe"],
                                  [f"{key}={override_text(value)}" for key, value in overrides.items()]))
    return steps


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
    validate_pipeline(path)
    names = [step.key for step in steps]
    if start is not None and start not in names:
        raise RecipeError(Path(path), "--from", f"no stage '{start}' in this pipeline; stages: {', '.join(names)}")
    rerun_from = names.index(start) if start else (0 if force else len(names))
    results: dict[str, Any] = {}
    output_dirs: list[Path] = []
    ran: list[bool] = []
    started = time.monotonic()
    stop: PipelineError | None = None
    for index, step in enumerate(steps):
        recipe = load_recipe(step.recipe, step.overrides, stage=step.stage)  # upstream outputs exist now
        output_dirs.append(recipe.output_dir)
        counter = f"[{index + 1}/{len(steps)}] {step.key}"
        if index < rerun_from and finished_run(recipe):
            say(f"{counter}: finished earlier with this recipe and inputs; skipped")
            results[step.key] = "skipped"
            ran.append(False)
        else:
            say(f"{counter}: running {recipe.path}")
            results[step.key] = run_stage(recipe, overwrite=True, force_unlock=force_unlock)
            wait_for_everyone()
            ran.append(True)
        try:
            check_round(step, recipe.output_dir)
        except PipelineError as err:  # the round cannot go on: summarise what finished, then say why
            stop = err
            break
    if is_main_process():
        _summarise(name, path, steps, output_dirs, ran, time.monotonic() - started)
    if stop is not None:
        raise stop
    return results


def _summarise(name: str, path: str | Path, steps: list[PipelineStep], output_dirs: list[Path], ran: list[bool],
               seconds: float) -> None:
    """The chain's console table and its summary report.md (with the rounds' measures when it has rounds)."""
    from rlhf_pipeline.distributed import say
    from rlhf_pipeline.report import (
        console_rounds,
        console_summary,
        report_dir_for,
        write_report_safely,
        write_summary_report,
    )

    say(f"pipeline {'finished' if len(ran) == len(steps) else 'stopped'} in {seconds:.0f} s:")
    for line in console_summary(output_dirs, ran):
        say(line)
    for line in console_rounds(output_dirs):
        say(line)
    report_dir = report_dir_for(output_dirs, Path(path).parent)
    if report := write_report_safely(lambda folder: write_summary_report(output_dirs, folder, f"Pipeline {name}"),
                                     report_dir):
        say(f"pipeline report: {report}")
