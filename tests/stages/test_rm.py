"""The RM stage on the tiny model: it starts from the SFT output and learns a trivially learnable preference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.reward import RewardModel
from rlhf_pipeline.stages import load_recipe, rm, sft
from tests.stages.conftest import preference_rows, sft_rows, write_card


@pytest.fixture
def sft_output(make_recipe, tmp_path: Path) -> Path:
    write_card(tmp_path, "chat", sft_rows(16), "messages", ["sft"])
    recipe = load_recipe(make_recipe("sft", ["chat"], training={"max_steps": 2}))
    sft.run(recipe)
    return recipe.output_dir


def test_rm_learns_marker_preference_from_sft_model(make_recipe, tmp_path: Path, sft_output: Path) -> None:
    write_card(tmp_path, "pairs", preference_rows(96), "prompt_chosen_rejected", ["rm"])
    recipe = load_recipe(make_recipe("rm", ["pairs"], model={"name_or_path": str(sft_output)},
                                     training={"num_train_epochs": 3, "learning_rate": 1e-2}))
    metrics = rm.run(recipe)
    assert metrics["eval_accuracy"] >= 0.9
    assert metrics["eval_mean_margin"] > 0
    assert metrics["eval"]["chosen_reward_mean"] > metrics["eval"]["rejected_reward_mean"]
    assert metrics["reward_stats"]["std"] > 0

    manifest = json.loads((recipe.output_dir / "stage.json").read_text())
    assert manifest["task"] == "reward"
    assert manifest["lineage"] == [str(sft_output.resolve())]  # a copy of the SFT adapter, not a new one on the base

    scorer = RewardModel.from_stage(recipe.output_dir)
    prompts = [[{"role": "user", "content": "How was the park?"}]] * 2
    chosen, rejected = scorer.score(prompts, ["It was great, the park was great.", "It was noted. the park"])
    assert chosen > rejected
    assert scorer.mean == pytest.approx(metrics["reward_stats"]["mean"])


def test_rm_refuses_an_unfinished_sft_output(make_recipe, tmp_path: Path, sft_output: Path) -> None:
    from rlhf_pipeline.stages.common import load_for_training

    (sft_output / "stage.json").unlink()
    write_card(tmp_path, "pairs", preference_rows(8), "prompt_chosen_rejected", ["rm"])
    recipe = load_recipe(make_recipe("rm", ["pairs"], model={"name_or_path": str(sft_output)}))
    with pytest.raises(PipelineError, match="holds no finished stage"):
        load_for_training(recipe)
