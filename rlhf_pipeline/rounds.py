"""Iterated RLHF: a pipeline's `rounds:` repeat label → rm → ppo (→ eval), each round on the last one's policy and RM.

    rlhf-pipeline run recipes/smollm2-135m/iterated.yaml

    stages: [{stage: sft, recipe: sft.yaml}]     # run once, before the rounds
    rounds:
      count: 2
      reference: sft            # or previous: PPO anchors to the previous round's policy
      rm_data: accumulated      # or new: the refresh trains on this round's pairs only
      held_out: 0.2             # share of each round's prompts whose pairs measure the RM before/after
      min_new_pairs: 20         # stop when the judge's gap filter leaves fewer new pairs
      min_rm_accuracy: 0.6      # stop when the refreshed RM is below this on the new held-out pairs
      stages: [{stage: label, recipe: label.yaml}, {stage: rm, recipe: rm.yaml}, {stage: ppo, recipe: ppo.yaml},
               {stage: eval, recipe: eval.yaml}]

A round is its template recipes with overrides, so the pipeline's own machinery (validation up front, skipping
finished stages, resuming, locks, the summary) runs it. In round k:
- every template output folder `<parent>/<name>` becomes `<parent>/round-k/<name>`, and any path inside one
  follows it (eval's policy and reward_model, ppo's reward_model_path, the rm's data card);
- label samples from the previous policy and holds out `held_out` of its prompts' pairs (labelling.eval_split);
- rm continues the previous reward model (adapter and score head) on the new pairs or on every label stage's pairs
  so far (plus any other cards its recipe trains on), held out on the new held-out pairs, on which it also
  measures the previous RM first (rm's `before`). Every round holds out the same prompts (same prompt set and
  seed), and the refresh drops from its training cards any pair on a held-out prompt (`data.eval_overlap: drop`:
  a label stage before the rounds held out none), so no refreshed RM trains on a held-out prompt. The RM the
  rounds start from may have (the demo's trained on every prompt but its own eval split): round 1's `before`
  is measured on prompts it may have seen, with other answers;
- ppo uses the refreshed RM; with `reference: previous` it starts from and is anchored to the previous policy
  (`model.name_or_path`), with `reference: sft` it keeps its recipe's reference and starts the policy from the
  previous one (`training.policy_init`).
The previous policy and RM of round 1 are the last ppo and rm of the pipeline's `stages:`, if any (else the
recipes' own starting points). A round that cannot go on stops the pipeline with an error naming the round and the
number; the stages already finished stay finished, and a re-run after a fix skips them.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from rlhf_pipeline.errors import PipelineError, RecipeError
from rlhf_pipeline.outputs import round_dir
from rlhf_pipeline.recipe import apply_overrides, override_text
from rlhf_pipeline.schema import build_section, read_yaml

ROUND_STAGES = ("label", "rm", "ppo", "eval")  # a round's stages, in this order; eval is optional


class PipelineStep(Protocol):
    """What rounds read of a pipeline step (pipeline.PipelineStep, a dataclass this module copies with changes)."""

    stage: str
    recipe: Path
    overrides: list[str]
    round: int | None
    rounds: RoundsSpec | None


@dataclass
class RoundsSpec:
    """How a pipeline's rounds feed each other, and when a round must stop."""

    count: int
    reference: str = "sft"
    rm_data: str = "accumulated"
    held_out: float = 0.2
    min_new_pairs: int = 1
    min_rm_accuracy: float | None = None

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError("count: at least 1 round")
        if self.reference not in ("sft", "previous"):
            raise ValueError("reference: sft (PPO stays anchored to its recipe's policy) or previous (to the "
                             "previous round's policy)")
        if self.rm_data not in ("accumulated", "new"):
            raise ValueError("rm_data: accumulated (every round's pairs so far) or new (this round's pairs only)")
        if not 0 < self.held_out < 1:
            raise ValueError("held_out: a share of each round's prompts in (0, 1); the RM is measured on their pairs")
        if self.min_new_pairs < 1:
            raise ValueError("min_new_pairs: at least 1")
        if self.min_rm_accuracy is not None and not 0 <= self.min_rm_accuracy <= 1:
            raise ValueError("min_rm_accuracy: an accuracy in [0, 1], or null for no check")


def read_rounds(path: Path, data: Any, templates: list[PipelineStep]) -> RoundsSpec:
    """The `rounds:` settings (its `stages` already parsed into `templates`), checked against the round's shape."""
    spec = build_section(RoundsSpec, {k: v for k, v in data.items() if k != "stages"}, path, "rounds")
    stages = [step.stage for step in templates]
    if stages not in (list(ROUND_STAGES), list(ROUND_STAGES[:3])):
        raise RecipeError(path, "rounds.stages", f"a round runs label, rm, ppo and optionally eval, in this order; "
                          f"got {', '.join(stages)}")
    label = _raw(templates[0])
    if label.get("labelling", {}).get("writes", "pairs") != "pairs":
        raise RecipeError(templates[0].recipe, "labelling.writes", "a round's label stage writes preference pairs "
                          "for the RM refresh; remove writes: classification")
    return spec


def _raw(step: PipelineStep) -> dict[str, Any]:
    """A step's recipe as a mapping, with its pipeline overrides (not validated: load_recipe does that)."""
    return apply_overrides(read_yaml(step.recipe), step.overrides, step.recipe)


def _card_ref(entry: Any) -> str:
    """The card a `data.train` entry names: the entry itself, or a mixture entry's `card`."""
    return str(entry.get("card", "")) if isinstance(entry, dict) else str(entry)


def _output_dir(step: PipelineStep) -> Path:
    from rlhf_pipeline.stages import get_stage

    section = _raw(step).get(get_stage(step.stage).config_section) or {}
    if not section.get("output_dir"):
        raise RecipeError(step.recipe, "output_dir", "required key is missing (where the stage writes)")
    return Path(section["output_dir"])


def _moved(value: Any, folders: dict[Path, Path]) -> Any:
    """`value` with every path inside a template output folder moved to that folder's round copy."""
    if isinstance(value, dict):
        return {key: _moved(item, folders) for key, item in value.items()}
    if isinstance(value, list):
        return [_moved(item, folders) for item in value]
    if isinstance(value, str) and value:
        resolved = Path(value).expanduser().resolve()
        for old, new in folders.items():
            if resolved == old or resolved.is_relative_to(old):
                return str(new / resolved.relative_to(old))
    return value


def _path_overrides(data: dict[str, Any], folders: dict[Path, Path], prefix: str = "") -> dict[str, Any]:
    """Key path -> new value for every value (a list as a whole) that names a path inside a moved folder."""
    found: dict[str, Any] = {}
    for key, value in data.items():
        where = f"{prefix}{key}"
        if isinstance(value, dict):
            found |= _path_overrides(value, folders, f"{where}.")
        elif (moved := _moved(value, folders)) != value:
            found[where] = moved
    return found


def expand_rounds(spec: RoundsSpec, templates: list[PipelineStep], before: list[PipelineStep]) -> list[PipelineStep]:
    """The concrete stages of every round (see the module docstring), in order."""
    def last(stage: str) -> str | None:
        found = [str(_output_dir(step)) for step in before if step.stage == stage]
        return found[-1] if found else None

    policy, reward_model = last("ppo"), last("rm")
    cards = [str(_output_dir(step) / "data_card.yaml") for step in before
             if step.stage == "label" and _raw(step).get("labelling", {}).get("writes", "pairs") == "pairs"]
    outputs = [_output_dir(step) for step in templates]
    label_out = outputs[0].resolve()
    kept = [entry for entry in _raw(templates[1]).get("data", {}).get("train", [])  # the RM's other cards stay
            if not Path(_card_ref(entry)).expanduser().resolve().is_relative_to(label_out)]
    steps: list[PipelineStep] = []
    for number in range(1, spec.count + 1):
        folders = {out.resolve(): round_dir(out, number) for out in outputs}
        label_dir, rm_dir, ppo_dir = (folders[out.resolve()] for out in outputs[:3])
        cards.append(str(label_dir / "data_card.yaml"))
        inputs: dict[str, dict[str, Any]] = {
            "label": {"labelling.eval_split": spec.held_out} | ({"model.name_or_path": policy} if policy else {}),
            "rm": {"data.train": kept + (cards if spec.rm_data == "accumulated" else cards[-1:]),
                   "data.eval": [str(label_dir / "data_card_eval.yaml")], "data.eval_overlap": "drop"}
                  | ({"model.name_or_path": reward_model} if reward_model else {}),
            "ppo": ({"model.name_or_path" if spec.reference == "previous" else "training.policy_init": policy}
                    if policy else {}),
            "eval": {},
        }
        for step in templates:
            changes = _path_overrides(_raw(step), folders) | inputs[step.stage]
            steps.append(dataclasses.replace(step, overrides=[*step.overrides, *(
                f"{key}={override_text(value)}" for key, value in changes.items())], round=number, rounds=spec))
        policy, reward_model = str(ppo_dir), str(rm_dir)
    return steps


def check_round(step: PipelineStep, output_dir: Path) -> None:
    """Stop the pipeline when round `step.round` cannot go on after this finished stage (the module docstring)."""
    spec = step.rounds
    if spec is None or step.round is None:
        return
    metrics = _metrics(output_dir)
    later = "its later stages and rounds do not run; the stages finished so far stay finished, and a re-run skips them"
    if step.stage == "label":
        counts = metrics.get("counts", {})
        if counts.get("pairs", 0) < spec.min_new_pairs:
            raise PipelineError(
                f"round {step.round}: the label stage ({output_dir}) kept {counts.get('pairs', 0)} new pairs after "
                f"the judge's gap filter ({counts.get('dropped_below_min_gap', 0)} dropped below "
                f"labelling.min_gap), fewer than rounds.min_new_pairs {spec.min_new_pairs}; {later}. Lower "
                "labelling.min_gap, sample more answers or prompts, or lower rounds.min_new_pairs")
        if not counts.get("held_out_pairs"):
            raise PipelineError(
                f"round {step.round}: none of the label stage's {counts.get('pairs', 0)} new pairs ({output_dir}) "
                f"comes from one of its {counts.get('held_out_prompts', 0)} held-out prompts, so the reward model "
                f"cannot be measured before and after its refresh; {later}. Raise rounds.held_out, or lower "
                "labelling.min_gap")
    if step.stage == "rm" and spec.min_rm_accuracy is not None:
        accuracy = metrics.get("eval_accuracy")
        if accuracy is None or accuracy < spec.min_rm_accuracy:
            before = (metrics.get("before") or {}).get("eval_accuracy")
            was = f" (the previous reward model's: {before:.3f})" if before is not None else ""
            raise PipelineError(
                f"round {step.round}: the refreshed reward model ({output_dir}) has held-out accuracy "
                f"{_number(accuracy)} on {metrics.get('eval', {}).get('pairs', 0)} new pairs{was}, below "
                f"rounds.min_rm_accuracy {spec.min_rm_accuracy}; {later}. Label more pairs, train the RM longer, "
                "or lower rounds.min_rm_accuracy")


def _number(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.3f}"


def _metrics(folder: Path) -> dict[str, Any]:
    path = folder / "metrics.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
