"""KTO's data: labelled single answers, and preference pairs only when the recipe asks to split them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf_pipeline.errors import RecipeError
from rlhf_pipeline.stages import get_stage, load_recipe
from tests.stages.conftest import preference_rows, write_card, write_recipe
from tests.stages.test_policy_training import policy_recipe


def test_kto_refuses_pairs_unless_told_to_split_them(tmp_path: Path, tiny_model_dir: Path,
                                                     sft_and_rm: tuple[Path, Path]) -> None:
    path = policy_recipe(tmp_path, tiny_model_dir, "kto", *sft_and_rm, data={"train": ["pairs"], "unpair": False})
    with pytest.raises(RecipeError, match=r"data\.train\[0\]: card 'pairs' holds preference pairs; KTO trains on "
                                          r"single answers .* set data\.unpair: true"):
        load_recipe(path)


def test_unpair_is_refused_where_no_stage_reads_it(tmp_path: Path, tiny_model_dir: Path,
                                                   sft_and_rm: tuple[Path, Path]) -> None:
    path = policy_recipe(tmp_path, tiny_model_dir, "dpo", *sft_and_rm, data={"train": ["pairs"], "unpair": True})
    with pytest.raises(RecipeError, match=r"data\.unpair: the dpo stage does not train on labelled single answers"):
        load_recipe(path)


def test_kto_trains_on_labelled_answers_and_split_pairs_together(tmp_path: Path, tiny_model_dir: Path,
                                                                  sft_and_rm: tuple[Path, Path]) -> None:
    labelled = [{"prompt": f"How was day {i}?", "completion": "Lovely, thanks!" if i % 2 else "Whatever.",
                 "label": bool(i % 2)} for i in range(6)] + [{"prompt": "Hi", "completion": "Hey", "label": "perhaps"}]
    write_card(tmp_path, "labelled", labelled, "prompt_completion_label", ["kto"])
    write_card(tmp_path, "pairs", preference_rows(5), "prompt_chosen_rejected", ["kto"])
    recipe = load_recipe(write_recipe(tmp_path, tiny_model_dir, "kto", ["labelled", "pairs"], {"max_steps": 1},
                                      model={"name_or_path": str(sft_and_rm[0])},
                                      data={"train": ["labelled", "pairs"], "unpair": True, "eval_split": 0.0}))
    metrics = get_stage("kto").run(recipe)
    data = metrics["data"]
    assert data["rows_kept"] == 6 + 2 * 5  # every pair gave one desirable and one undesirable answer
    assert data["rows_dropped"] == {"bad_label": 1}
    assert data["first_dropped"]["bad_label"] == ["labelled:line 7"]
    assert json.loads((recipe.output_dir / "stage.json").read_text())["stage"] == "kto"
