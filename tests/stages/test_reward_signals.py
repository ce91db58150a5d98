"""Stages scoring with a reward specification: checked before weights load, every signal used and reported."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from rlhf_pipeline.cli import main
from rlhf_pipeline.errors import RecipeError
from rlhf_pipeline.stages import load_recipe
from tests.stages.conftest import write_card
from tests.stages.test_ppo_checks import _fake_stage

CAKE = "tests.stages.judges:mentions_cake"
LETTER_E = "tests.stages.judges:letter_e_share"


def _ppo_recipe(folder: Path, model_dir: Path, sft: Path, rm: Path, reward: dict[str, Any],
                training: dict[str, Any] | None = None) -> Path:
    write_card(folder, "prompts", [{"prompt": f"Tell me about topic {i}."} for i in range(8)], "prompt_only",
               ["ppo"])
    knobs = {"output_dir": str(folder / "outputs" / "ppo"), "seed": 0, "reward_model_path": str(rm),
             "per_device_train_batch_size": 4, "total_episodes": 8, "response_length": 6, "num_ppo_epochs": 1,
             "save_steps": 10, "num_sample_generations": 0, "disable_tqdm": True}
    path = folder / "ppo.yaml"
    path.write_text(yaml.safe_dump({
        "stage": "ppo", "model": {"name_or_path": str(sft), "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0}},
        "data": {"train": ["prompts"], "eval_split": 0.0, "max_length": 96},
        "training": knobs | (training or {}), "reward": reward}))
    return path


@pytest.mark.parametrize(("reward", "message"), [
    ({"signals": {"rude": {"function": "no_such_module_here:score", "use": "penalty"}}},
     r"reward\.signals\.rude: 'no_such_module_here:score': cannot import module 'no_such_module_here'"),
    ({"signals": {"rude": {"function": CAKE, "wieght": 2}}}, r"reward\.signals\.rude\.wieght: unknown key; did you "
                                                             r"mean weight\?"),
    ({"signals": {"rude": {"function": CAKE, "model": "x"}}}, r"reward\.signals\.rude\.model: give exactly one of"),
    ({"signals": {"rude": {"function": CAKE, "use": "ban"}}}, r"reward\.signals\.rude\.use: must be one of reward, "
                                                             r"penalty, veto"),
    ({"signals": {"x": {"function": CAKE}}, "model": "outputs/rm"}, r"reward\.signals: give the signals, or the "
                                                                    r"short form"),
    ({"signals": {"warmth": {"model": "RM", "use": "penalty"}}}, r"reward\.signals\.warmth\.use: .* is a preference "
                                                                r"reward model .* use it as `use: reward`"),
    ({"signals": {"warmth": {"model": "UNFINISHED"}}}, r"reward\.signals\.warmth\.model: .*rm-in-progress is not a "
                                                      r"finished rm stage"),
])
def test_a_reward_specification_that_cannot_work_fails_validation(
        reward: dict[str, Any], message: str, tmp_path: Path, tiny_model_dir: Path,
        sft_and_rm: tuple[Path, Path]) -> None:
    sft, rm = sft_and_rm
    unfinished = tmp_path / "rm-in-progress"
    (unfinished / "checkpoint-4").mkdir(parents=True)
    text = json.dumps(reward).replace('"RM"', json.dumps(str(rm))).replace('"UNFINISHED"', json.dumps(str(unfinished)))
    path = _ppo_recipe(tmp_path, tiny_model_dir, sft, rm, json.loads(text), {"normalize_reward": False})
    with pytest.raises(RecipeError, match=message):
        load_recipe(path)


def test_ppo_refuses_normalising_the_combined_reward_again(tmp_path: Path, tiny_model_dir: Path,
                                                           sft_and_rm: tuple[Path, Path]) -> None:
    sft, rm = sft_and_rm
    path = _ppo_recipe(tmp_path, tiny_model_dir, sft, rm, {"signals": {"warmth": {"model": str(rm)}}},
                       {"normalize_reward": True})
    with pytest.raises(RecipeError, match=r"training\.normalize_reward: with a reward: section each reward-model "
                                          r"signal is normalised by its own statistics"):
        load_recipe(path)


def test_a_signal_model_with_another_tokenizer_stops_ppo_before_weights_load(
        tmp_path: Path, tiny_model_dir: Path, sft_and_rm: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|reward|>"]})
    other = _fake_stage(tmp_path / "outputs" / "other-rm", "rm", tiny_model_dir, tokenizer)
    sft, rm = sft_and_rm
    path = _ppo_recipe(tmp_path, tiny_model_dir, sft, rm, {"signals": {"warmth": {"model": str(rm)},
                                                                       "other": {"model": str(other)}}})

    def no_weights(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("weights were loaded before the tokenizer check")

    for model_class in (AutoModelForCausalLM, AutoModelForSequenceClassification):
        monkeypatch.setattr(model_class, "from_pretrained", no_weights)
    assert main(["ppo", str(path)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {path}: reward.signals.other: the reward model at {other} "
                                              "uses a different tokenizer")


def test_ppo_scores_with_every_signal_and_logs_each(tmp_path: Path, tiny_model_dir: Path,
                                                    sft_and_rm: tuple[Path, Path]) -> None:
    sft, rm = sft_and_rm
    reward = {"signals": {"warmth": {"model": str(rm)}, "e_share": {"function": LETTER_E, "weight": 2.0},
                          "cake": {"function": CAKE, "use": "penalty", "weight": 0.5}}}
    path = _ppo_recipe(tmp_path, tiny_model_dir, sft, rm, reward)
    assert main(["ppo", str(path)]) == 0
    metrics = json.loads((tmp_path / "outputs" / "ppo" / "metrics.json").read_text())
    steps = [entry for entry in metrics["log_history"] if "objective/scores" in entry]
    assert len(steps) == 2
    for entry in steps:
        assert 0 <= entry["reward/e_share"] <= 1 and 0 <= entry["reward/cake"] <= 1
        combined = entry["reward/warmth"] + 2.0 * entry["reward/e_share"] - 0.5 * entry["reward/cake"]
        assert entry["objective/raw_scores"] == pytest.approx(combined, abs=1e-5)
    resolved = yaml.safe_load((tmp_path / "outputs" / "ppo" / "recipe.yaml").read_text())
    assert resolved["reward"]["signals"]["cake"]["use"] == "penalty"
