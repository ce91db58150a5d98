"""The online stages' reward specification (grpo, rloo): checked before any weights load, and summed as weighted."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rlhf_pipeline.cli import main
from rlhf_pipeline.errors import RecipeError
from rlhf_pipeline.stages import get_stage, load_recipe
from tests.stages.test_policy_training import policy_recipe
from tests.stages.test_ppo_checks import _fake_stage

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
    with pytest.raises(RecipeError, match=rf"reward\.model: {unfinished} is not a finished rm stage"):
        load_recipe(policy_recipe(tmp_path, tiny_model_dir, stage, sft, unfinished))
    with pytest.raises(RecipeError, match=r"reward\.model: .* holds a finished 'sft' stage, not a reward model"):
        load_recipe(policy_recipe(tmp_path, tiny_model_dir, stage, sft, sft))


def test_a_reward_model_with_another_tokenizer_stops_before_weights_load(
        tmp_path: Path, tiny_model_dir: Path, sft_and_rm: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|reward|>"]})
    rm_dir = _fake_stage(tmp_path / "outputs" / "other-rm", "rm", tiny_model_dir, tokenizer)
    recipe = policy_recipe(tmp_path, tiny_model_dir, "grpo", sft_and_rm[0], rm_dir)

    def no_weights(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("weights were loaded before the tokenizer check")

    for model_class in (AutoModelForCausalLM, AutoModelForSequenceClassification):
        monkeypatch.setattr(model_class, "from_pretrained", no_weights)
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
