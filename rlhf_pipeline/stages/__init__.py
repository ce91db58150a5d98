"""The stage registry: each stage is one module that declares a `STAGE` and a `run(recipe)`.

Stage modules keep torch, transformers and TRL imports inside `run`, so that looking a stage up (for
`validate` and `--help`) stays fast. A new stage (DPO, say) is one module here, one line in
`_STAGE_MODULES`, and a recipe.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf_pipeline.data.cards import DataSpec, check_cards
from rlhf_pipeline.errors import RecipeError
from rlhf_pipeline.recipe import (
    HubSpec,
    ModelSpec,
    Recipe,
    apply_overrides,
    check_config,
    check_secrets,
)
from rlhf_pipeline.schema import build_section, read_yaml, shown_key, suggest
from rlhf_pipeline.trainer_fields import dataclass_fields

_STAGE_MODULES = {
    "sft": "rlhf_pipeline.stages.sft",
    "label": "rlhf_pipeline.stages.label",
    "rm": "rlhf_pipeline.stages.rm",
    "ppo": "rlhf_pipeline.stages.ppo",
    "eval": "rlhf_pipeline.stages.eval",
}
STAGE_NAMES = tuple(_STAGE_MODULES)


@dataclass(frozen=True)
class Stage:
    """What a stage accepts (its config class and section, data formats, extra sections) and how to run it."""

    name: str
    summary: str
    example: str
    config_class: tuple[str, str]
    data_formats: frozenset[str]
    run: Callable[[Recipe], dict[str, Any]]
    config_section: str = "training"
    sections: dict[str, type] = field(default_factory=dict)
    extra_checks: Callable[[Recipe], None] | None = None

    def config_fields(self) -> dict[str, str]:
        """Field name -> annotation of the stage's config class, read from source without importing it."""
        return dataclass_fields(*self.config_class)

    def check(self, recipe: Recipe) -> None:
        """Stage-specific checks that need no weights (run by `validate` and before every run).

        Our own config classes are cheap to import, so they are built here and their value checks run.
        """
        module, name = self.config_class
        if module.startswith("rlhf_pipeline."):
            build_section(getattr(importlib.import_module(module), name), recipe.config, recipe.path,
                          self.config_section)
        if self.extra_checks is not None:
            self.extra_checks(recipe)


def get_stage(name: str) -> Stage:
    """Import a stage module (cheap: heavy imports live inside its `run`) and return its declaration."""
    return importlib.import_module(_STAGE_MODULES[name]).STAGE


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
        cards=check_cards(data_spec, path, name, spec.data_formats, pending_outputs),
    )
    spec.check(recipe)
    return recipe
