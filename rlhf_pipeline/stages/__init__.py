"""The stage registry: each stage is one module that declares a `STAGE` and a `run(recipe)`.

A `Stage` says everything the rest of the package needs to know about it, so nothing else branches on
stage names: what a recipe may contain (config class and section, data formats, extra sections, checks),
how a finished run is presented (`Presentation`: report title, headline and section, notes for the chain's
summary), whether its output is a model (`ModelOutput`: model card, push, merge), how `estimate` models its
memory (`MemoryModel`), and what it checks about a multi-process launch. Stage modules keep torch,
transformers and TRL imports inside `run`, so that looking a stage up (for `validate` and `--help`) stays
fast. A new stage (DPO, say) is one module, one line in `_STAGE_MODULES`, and a recipe.

`load_recipe` lives here because validating a recipe means checking it against its stage's declaration.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf_pipeline.data.cards import DataSpec, check_cards
from rlhf_pipeline.data.formats import LABELLED_FORMATS
from rlhf_pipeline.distributed import Launch
from rlhf_pipeline.errors import PipelineError, RecipeError
from rlhf_pipeline.outputs import MARKER, StageManifest, read_manifest
from rlhf_pipeline.recipe import (
    HubSpec,
    ModelSpec,
    Recipe,
    apply_overrides,
    check_config,
    check_secrets,
)
from rlhf_pipeline.schema import build_section, read_yaml, shown_key, suggest
from rlhf_pipeline.trainer_fields import ConfigField, config_fields, slow_to_import

_STAGE_MODULES = {
    "sft": "rlhf_pipeline.stages.sft",
    "label": "rlhf_pipeline.stages.label",
    "rm": "rlhf_pipeline.stages.rm",
    "prm": "rlhf_pipeline.stages.prm",
    "ppo": "rlhf_pipeline.stages.ppo",
    "dpo": "rlhf_pipeline.stages.dpo",
    "kto": "rlhf_pipeline.stages.kto",
    "grpo": "rlhf_pipeline.stages.grpo",
    "rloo": "rlhf_pipeline.stages.rloo",
    "eval": "rlhf_pipeline.stages.eval",
    "best-of-n": "rlhf_pipeline.stages.best_of_n",
}
STAGE_NAMES = tuple(_STAGE_MODULES)

Metrics = dict[str, Any]


@dataclass(frozen=True)
class Presentation:
    """How a finished run is shown: its report.md title, headline and section, and notes for the chain's summary.

    `section(folder, metrics, plots)` returns markdown lines (`plots` is report.plots.Plots, which writes
    PNGs beside the report); `summary_note(folder, metrics)` a line for the summary's warnings, if any;
    `summary_figure` a PNG of the stage folder and its caption, shown in the summary; `answers` the JSONL file
    of every sampled answer with its scores and what one row holds, linked from the report.
    """

    title: str
    headline: Callable[[Metrics], str]
    section: Callable[[Path, Metrics, Any], list[str]]
    summary_note: Callable[[Path, Metrics], str | None] | None = None
    summary_figure: tuple[str, str] | None = None
    answers: tuple[str, str] | None = None


@dataclass(frozen=True)
class ModelOutput:
    """A stage whose output is a model (what the card, push and merge take): its Hub tag and what it is."""

    tag: str
    what: str


@dataclass(frozen=True)
class MemoryModel:
    """How `rlhf-pipeline estimate` models the stage's peak memory per device.

    `kind`: "train" (one base, the stage's trainable weights, a micro-batch of sequences), "ppo" (four roles
    on one base and a rollout) or "sample" (frozen models generating). `head`: "lm" or "score" (a reward
    model). `rows_per_example`: sequences a training example forwards at once (a preference pair: 2).
    `fused_loss`: the trainer never builds the full-vocabulary logits (TRL's SFT).
    """

    kind: str = "train"
    head: str = "lm"
    rows_per_example: int = 1
    fused_loss: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("train", "ppo", "sample") or self.head not in ("lm", "score"):
            raise ValueError(f"MemoryModel: unknown kind {self.kind!r} or head {self.head!r}")


@dataclass(frozen=True)
class Stage:
    """What a stage accepts and does, and how the rest of the package treats it (see the module docstring)."""

    name: str
    summary: str
    example: str
    config_class: tuple[str, str]
    data_formats: frozenset[str]
    run: Callable[[Recipe], Metrics]
    presentation: Presentation
    config_section: str = "training"
    sections: dict[str, type] = field(default_factory=dict)
    extra_checks: Callable[[Recipe], None] | None = None
    model: ModelOutput | None = None
    memory: MemoryModel = field(default_factory=MemoryModel)
    launch_checks: Callable[[Recipe, Launch], None] | None = None
    extra_data: dict[str, frozenset[str]] = field(default_factory=dict)  # further card lists and their formats
    streams: bool = False  # its trainer takes an IterableDataset, so `data.streaming` may feed it

    def config_fields(self) -> dict[str, str]:
        """Field name -> annotation of the stage's config class (trainer_fields: cached, no torch import)."""
        return {name: spec.annotation for name, spec in config_fields(*self.config_class).items()}

    def config_default(self, name: str) -> Any:
        """A field's default in the stage's config class (None when it has none a recipe could spell)."""
        return config_fields(*self.config_class).get(name, ConfigField("Any")).default

    def settings(self, recipe: Recipe) -> Any:
        """The stage's typed config, unless it is TRL's (whose import costs seconds; its trainer builds that one).

        Building it runs its value checks; the recipe carries the result, so nothing builds it again.
        """
        module, name = self.config_class
        if slow_to_import(module):
            return None
        return build_section(getattr(importlib.import_module(module), name), recipe.config, recipe.path,
                             self.config_section)


def get_stage(name: str) -> Stage:
    """Import a stage module (cheap: heavy imports live inside its `run`) and return its declaration."""
    if name not in _STAGE_MODULES:
        raise PipelineError(f"unknown stage '{name}'{suggest(name, STAGE_NAMES)}; stages: {', '.join(STAGE_NAMES)}")
    return importlib.import_module(_STAGE_MODULES[name]).STAGE


def require_model_stage(output_dir: Path) -> StageManifest:
    """The manifest of a finished stage whose output is a model (sft, rm, ppo): what push, merge and cards take."""
    manifest = read_manifest(output_dir)
    if manifest is None:
        raise PipelineError(f"{output_dir}: no finished stage here (no {MARKER}); run the stage, or let it "
                            "finish, before pushing or merging it")
    model_stages = [name for name in STAGE_NAMES if get_stage(name).model is not None]
    if manifest.stage not in model_stages:
        raise PipelineError(f"{output_dir}: holds a finished '{manifest.stage}' stage, which has no model; "
                            f"push or merge an output of {', '.join(model_stages)}")
    return manifest


def cache_config_fields() -> list[str]:
    """Read every stage's config fields now (seconds for TRL's), so later `validate` runs stay fast."""
    classes = sorted({get_stage(name).config_class for name in STAGE_NAMES})
    return [f"{module}.{name}: {len(config_fields(module, name))} fields" for module, name in classes]


def _positive(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def load_recipe(path: str | Path, overrides: list[str] | None = None, stage: str | None = None,
                pending_outputs: list[Path] | None = None) -> Recipe:
    """Read, override and validate a recipe; raises RecipeError naming the file and the key.

    `pending_outputs` are folders earlier pipeline stages will write: data cards inside them may not
    exist yet when the whole chain is validated up front.
    """
    path = Path(path)
    data = apply_overrides(read_yaml(path), overrides or [], path)
    check_secrets(data, path)
    name = data.get("stage", stage)
    if name is None:
        raise RecipeError(path, "stage", f"required key is missing; one of: {', '.join(STAGE_NAMES)}")
    if name not in STAGE_NAMES:
        raise RecipeError(path, "stage", f"unknown stage '{name}'{suggest(str(name), STAGE_NAMES)}")
    if stage is not None and name != stage:
        raise RecipeError(path, "stage", f"this is a '{name}' recipe; run it with `rlhf-pipeline {name}`")
    spec = get_stage(name)
    known = {"stage", "model", "data", spec.config_section, "hub", *spec.sections}
    for key in data:
        if key not in known:
            raise RecipeError(path, shown_key(key), f"unknown section{suggest(str(key), known)}")
    for required in ("model", "data", spec.config_section):
        if required not in data:
            raise RecipeError(path, required, "required section is missing")
    data_spec = build_section(DataSpec, data["data"], path, "data")
    if data_spec.streaming and not spec.streams:
        raise RecipeError(path, "data.streaming", f"the {name} stage needs its whole dataset before training (only "
                          f"{', '.join(n for n in STAGE_NAMES if get_stage(n).streams)} can stream); remove the key")
    section = data[spec.config_section]
    if data_spec.streaming and not (isinstance(section, dict) and _positive(section.get("max_steps"))):
        raise RecipeError(path, f"{spec.config_section}.max_steps", "a streamed dataset has no length to count "
                          "epochs in; set max_steps (the optimizer steps to train)")
    if data_spec.streaming and section.get("dataloader_num_workers"):
        raise RecipeError(path, f"{spec.config_section}.dataloader_num_workers", "a stream's rows are counted for the "
                          "data report where they are read, in the training process; remove the key (0 workers)")
    if data_spec.unpair and not spec.data_formats & LABELLED_FORMATS:
        raise RecipeError(path, "data.unpair", f"the {name} stage does not train on labelled single answers, so "
                          "it has no use for unpaired pairs; remove the key (it is for kto)")
    recipe = Recipe(
        path=path,
        stage=name,
        model=build_section(ModelSpec, data["model"], path, "model"),
        data=data_spec,
        config=check_config(data[spec.config_section], spec.config_fields(), path, spec.config_section),
        config_section=spec.config_section,
        hub=build_section(HubSpec, data.get("hub", {}), path, "hub"),
        sections={key: build_section(cls, data.get(key, {}), path, key) for key, cls in spec.sections.items()},
        pending_outputs=list(pending_outputs or []),
        cards=check_cards(data_spec, path, name, spec.data_formats, pending_outputs, spec.extra_data),
    )
    recipe.settings = spec.settings(recipe)
    if spec.extra_checks is not None:
        spec.extra_checks(recipe)
    return recipe
