"""KTO: the SFT policy trained on single answers labelled desirable or undesirable, no pairs needed.

    rlhf-pipeline kto recipes/smollm2-135m/kto.yaml

TRL's KTOTrainer with KTOConfig's own key names. Data: cards of format `prompt_completion_label`, or
preference cards with `data.unpair: true` (each pair's chosen answer desirable, its rejected one not).
The reference is the SFT policy (stages/policy_training.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from rlhf_pipeline.data.formats import LABELLED_FORMATS, PREFERENCE_FORMATS
from rlhf_pipeline.errors import RecipeError
from rlhf_pipeline.stages import MemoryModel
from rlhf_pipeline.stages.policy_training import check_starts_from_sft, trl_stage

if TYPE_CHECKING:
    from rlhf_pipeline.recipe import Recipe

PANELS = (("rewards/margins", "implicit-reward margin"), ("kl", "KL estimate (batch)"), ("loss", "KTO loss"),
          ("rewards/chosen", "reward of desirable"), ("rewards/rejected", "reward of undesirable"),
          ("logps/chosen", "log π(desirable)"))


def _check(recipe: Recipe) -> None:
    check_starts_from_sft(recipe)
    for split in ("train", "eval"):
        for index, ref in enumerate(recipe.data.refs(split)):
            card = next((c for c in recipe.cards if Path(ref).stem in (c.name, c.file.stem)), None)
            if card is not None and card.format in PREFERENCE_FORMATS and not recipe.data.unpair:
                raise RecipeError(recipe.path, f"data.{split}[{index}]", f"card '{ref}' holds preference pairs; KTO "
                                  "trains on single answers labelled desirable or undesirable: set data.unpair: "
                                  "true to split each pair into its chosen (desirable) and rejected (undesirable) "
                                  "answer, or give a card of format prompt_completion_label")



STAGE = trl_stage(
    "kto", "KTO",
    summary="KTO of the SFT policy on answers labelled desirable/undesirable (pairs split with data.unpair)",
    example="rlhf-pipeline kto recipes/smollm2-135m/kto.yaml",
    what="KTO policy, trained on labelled answers against the SFT policy as reference",
    panels=PANELS,
    data_formats=frozenset(LABELLED_FORMATS | PREFERENCE_FORMATS),
    extra_checks=_check,
    memory=MemoryModel(rows_per_example=2),  # each answer and a mismatched one for the KL estimate
)
