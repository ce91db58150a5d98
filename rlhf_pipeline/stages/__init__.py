"""The stage registry: each stage is one module that declares a `STAGE` and a `run(recipe)`.

Stage modules keep torch, transformers and TRL imports inside `run`, so that looking a stage up (for
`validate` and `--help`) stays fast. A new stage (DPO, say) is one module here, one line in
`_STAGE_MODULES`, and a recipe.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rlhf_pipeline.trainer_fields import dataclass_fields

if TYPE_CHECKING:
    from rlhf_pipeline.recipe import Recipe

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
        from rlhf_pipeline.recipe import build_section

        module, name = self.config_class
        if module.startswith("rlhf_pipeline."):
            build_section(getattr(importlib.import_module(module), name), recipe.config, recipe.path,
                          self.config_section)
        if self.extra_checks is not None:
            self.extra_checks(recipe)


def get_stage(name: str) -> Stage:
    """Import a stage module (cheap: heavy imports live inside its `run`) and return its declaration."""
    return importlib.import_module(_STAGE_MODULES[name]).STAGE
