"""The online stages' reward specification (grpo, rloo): checked before any weights load, and summed as weighted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from rlhf_pipeline.cli import main
from rlhf_pipeline.errors import RecipeError
from rlhf_pipeline.stages import get_stage, load_recipe
from tests.stages.conftest import rm_with_another_tokenizer
from tests.stages.test_policy_training import policy_recipe

ONLINE_STAGES = ("grpo", "rloo")


@pytest.mark.parametrize("stage", ONLINE_STAGES)
@pytest.mark.parametrize(("reward", "training", "message"), [
    ({"functions": ["no_such_module_here:score"]}, {},
     r"reward\.functions\[0\]: 'no_such_module_here:score': cannot import module 'no_such_module_here'"),
    ({"functions": ["tests.stages.judges:no_such_function"]}, {},
     r"reward\.functions\[0\]: 'tests\.stages\.judges:no_such_function': module 'tests\.stages\.judges' has no "
     r"function 'no_such_function'"),
    ({"functions": ["tests.stages.judges.letter_e_share"]}, {},
     r"reward\.functions: 'tests\.stages\.judges\.letter_e_share' is not `module:function`"),
    ({}, {}, r"reward: required: the signals the sampled answers are scored with"),
    ({"functions": ["tests.stages.judges:letter_e_share"]}, {"reward_weights": [1.0, 0.5]},
     r"training\.reward_weights: 2 weight\(s\) for 1 reward signal\(s\) \(letter_e_share\)"),
    ({"signals": {"e": {"function": "tests.stages.judges:letter_e_share"}}}, {"reward_weights": [0.5]},
     r"training\.reward_weights: the signals carry their own weights"),
    ({"signals": {"cake": {"function": "tests.stages.judges:mentions_cake", "use": "veto"}}}, {},
     r"reward\.signals\.cake\.use: .* cannot express a veto; use `use: penalty` here"),
])
def test_a_reward_specification_the_stage_cannot_call_fails_validation(
        stage: str, reward: dict[str, Any], training: dict[str, Any], message: str, tmp_path: Path,
        tiny_model_dir: Path, sft_and_rm: tuple[Path, Path]) -> None:
    path = policy_recipe(tmp_path, tiny_model_dir, stage, *sft_and_rm, training, reward=reward)
    with pytest.raises(RecipeError, match=message):
        load_recipe(path)


@pytest.mark.parametrize("stage", ONLINE_STAGES)
def test_the_reward_model_must_be_a_finished_rm_stage(stage: str, tmp_path: Path, tiny_model_dir: Path,
                                                      sft_and_rm: tuple[Path, Path]) -> None:
    sft, _ = sft_and_rm
    unfinished = tmp_path / "rm-in-progress"
    (unfinished / "checkpoint-4").mkdir(parents=True)
    with pytest.raises(RecipeError, match=rf"reward\.model: {unfinished} is not a finished rm or prm stage"):
        load_recipe(policy_recipe(tmp_path, tiny_model_dir, stage, sft, unfinished))
    with pytest.raises(RecipeError, match=r"reward\.model: .* holds a finished 'sft' stage, not a reward model"):
        load_recipe(policy_recipe(tmp_path, tiny_model_dir, stage, sft, sft))


def test_a_reward_model_with_another_tokenizer_stops_before_weights_load(
        tmp_path: Path, tiny_model_dir: Path, sft_and_rm: tuple[Path, Path], weights_forbidden: None,
        capsys: pytest.CaptureFixture[str]) -> None:
    rm_dir = rm_with_another_tokenizer(tmp_path / "outputs" / "other-rm", tiny_model_dir)
    recipe = policy_recipe(tmp_path, tiny_model_dir, "grpo", sft_and_rm[0], rm_dir)
    assert main(["grpo", str(recipe)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {recipe}: reward.model: the reward model at {rm_dir} uses a "
                                              "different tokenizer")


def test_signals_are_logged_each_and_summed_with_their_weights(tmp_path: Path, tiny_model_dir: Path,
                                                               sft_and_rm: tuple[Path, Path]) -> None:
    sft, rm = sft_and_rm
    reward = {"model": str(rm), "functions": ["tests.stages.judges:letter_e_share"]}
    recipe = load_recipe(policy_recipe(tmp_path, tiny_model_dir, "grpo", sft, rm,
                                       {"max_steps": 2, "reward_weights": [0.5, 2.0]}, reward=reward))
    metrics = get_stage("grpo").run(recipe)
    for entry in (metrics["first"], metrics["final"]):
        by_signal = entry["rewards/reward_model/mean"], entry["rewards/letter_e_share/mean"]
        assert 0 <= by_signal[1] <= 1  # the share of letters that are 'e'
        assert entry["reward"] == pytest.approx(0.5 * by_signal[0] + 2.0 * by_signal[1], abs=1e-5)


def test_named_signals_carry_their_weights_and_a_penalty_is_subtracted(tmp_path: Path, tiny_model_dir: Path,
                                                                      sft_and_rm: tuple[Path, Path]) -> None:
    sft, rm = sft_and_rm
    reward = {"signals": {"warmth": {"model": str(rm), "weight": 0.5},
                          "cake": {"function": "tests.stages.judges:mentions_cake", "use": "penalty", "weight": 2.0}}}
    recipe = load_recipe(policy_recipe(tmp_path, tiny_model_dir, "rloo", sft, rm, {"max_steps": 2}, reward=reward))
    metrics = get_stage("rloo").run(recipe)
    for entry in (metrics["first"], metrics["final"]):
        warmth, cake = entry["rewards/warmth/mean"], entry["rewards/cake/mean"]
        assert 0 <= cake <= 1
        assert entry["reward"] == pytest.approx(0.5 * warmth - 2.0 * cake, abs=1e-5)
