"""The rm stage as a rule reward model (Sparrow): a classifier of "the answer breaks the rule" on the tiny model."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path
from typing import Any

import pytest
import yaml

from rlhf_pipeline.errors import RecipeError
from rlhf_pipeline.outputs import last_checkpoint, read_manifest
from rlhf_pipeline.reward import RewardModel
from rlhf_pipeline.stages import load_recipe, rm
from tests.stages.conftest import FLAT, TOPICS, WARM, preference_rows, write_card, write_recipe


def rule_rows(n: int) -> list[dict[str, Any]]:
    """Answers that break the rule exactly when they call someone stupid (trivially learnable), labelled the
    way BeaverTails labels them (`is_safe`, the opposite of our convention), so the card must flip them. Every
    prompt has rude and polite answers: with a prompt-level split the rule must be read off the answer."""
    rows = []
    for i in range(n):
        opening = (WARM + FLAT)[i % 10]
        rude = (i // len(TOPICS)) % 3 == 0
        rows.append({"prompt": f"Tell me about {TOPICS[i % len(TOPICS)]}.",
                     "response": f"{opening} {'You are stupid.' if rude else 'Have a nice day.'}", "is_safe": not rude})
    return rows


def write_rule_card(folder: Path, rows: list[dict[str, Any]]) -> None:
    card_path = write_card(folder, "rules", rows, "classification", ["rm"])
    card = yaml.safe_load(card_path.read_text())
    card_path.write_text(yaml.safe_dump(card | {"columns": {"answer": "response", "label": "is_safe"},
                                                "violation_when": False}))


def test_a_rule_reward_model_learns_a_rule_and_reports_its_calibration(make_recipe, tmp_path: Path,
                                                                        tiny_model_dir: Path) -> None:
    write_rule_card(tmp_path, [*rule_rows(96), {"prompt": "Hi", "response": "Hello.", "is_safe": "perhaps"}])
    recipe = load_recipe(make_recipe("rm", ["rules"], training={"num_train_epochs": 3, "learning_rate": 1e-2}))
    metrics = rm.run(recipe)

    assert metrics["objective"] == "classification"
    held_out = metrics["eval"]
    assert held_out["answers"] == 24  # a quarter of the 96 usable rows
    assert metrics["eval_accuracy"] >= 0.9
    assert metrics["eval_auroc"] >= 0.9
    assert metrics["data"]["rows_dropped"] == {"bad_label": 1}
    assert held_out["violation_score_mean"] > held_out["kept_score_mean"]
    assert 0.0 <= held_out["ece"] <= 1.0 and 0.0 <= held_out["brier"] <= 0.25  # better than always saying 1/2
    assert metrics["reward_stats"]["std"] > 0

    manifest = json.loads((recipe.output_dir / "stage.json").read_text())
    assert manifest["task"] == "reward"
    assert manifest["extra"]["objective"] == "classification"
    assert manifest["extra"]["reward_stats"] == metrics["reward_stats"]
    recorded = manifest["metrics"]
    for key in ("eval_accuracy", "eval_auroc", "eval_ece", "eval_brier", "eval_base_rate"):
        assert math.isfinite(recorded[key]), key
    assert recorded["eval_base_rate"] == pytest.approx(held_out["base_rate"])
    assert 0 < recorded["eval_base_rate"] < 1  # both kinds of answer are held out

    # What a reward specification reads: σ of the stage's score is P(the answer breaks the rule).
    scorer = RewardModel.from_stage(recipe.output_dir)
    prompts = [[{"role": "user", "content": "Tell me about the park."}]] * 2
    rude, kind = scorer.score(prompts, ["Noted. You are stupid.", "Noted. Have a nice day."])
    assert 1 / (1 + math.exp(-rude)) > 0.5 > 1 / (1 + math.exp(-kind))

    report = (recipe.output_dir / "report.md").read_text()
    assert "rule classifier: held-out accuracy" in report and "AUROC" in report
    assert "pairwise accuracy" not in report


def test_validate_refuses_rule_cards_mixed_with_preference_cards(make_recipe, tmp_path: Path) -> None:
    write_rule_card(tmp_path, rule_rows(8))
    write_card(tmp_path, "pairs", preference_rows(8), "prompt_chosen_rejected", ["rm"])
    path = make_recipe("rm", ["rules", "pairs"], data={"train": ["rules", "pairs"]})
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert str(info.value).startswith(f"{path}: data.train[1]: card 'pairs' holds preference pairs, but "
                                      "data.train[0] ('rules') is a classification card")
    assert "give the rule reward model's cards a recipe and output_dir of their own" in str(info.value)

    path = make_recipe("rm", ["pairs"], data={"train": ["pairs"], "eval": ["rules"]})
    with pytest.raises(RecipeError, match=r"data\.eval\[0\]: card 'rules' is a classification card"):
        load_recipe(path)

    path = make_recipe("rm", ["rules"], training={"center_rewards_coefficient": 0.01})
    with pytest.raises(RecipeError, match=r"training\.center_rewards_coefficient: centres pairwise rewards"):
        load_recipe(path)
    assert rm.objective(load_recipe(make_recipe("rm", ["rules"]))) == "classification"


def test_sigterm_saves_the_step_and_the_rerun_resumes_there(tmp_path: Path, tiny_model_dir: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """The classifier trains through the shared resume and pre-emption code, like the pairwise RM."""
    from rlhf_pipeline.cli import main
    from tests.test_interruption import LORA, STEPS, TRAINER, _command, _signal_after_first_checkpoint, _trained_steps

    write_rule_card(tmp_path, rule_rows(32))
    recipe_path = write_recipe(tmp_path, tiny_model_dir, "rm", ["rules"], {"max_steps": STEPS} | TRAINER,
                               model={"lora": LORA}, data={"train": ["rules"], "eval_split": 0.0, "max_length": 96})
    out = load_recipe(recipe_path).output_dir
    status, _ = _signal_after_first_checkpoint("rm", recipe_path, out, tmp_path / "stopped.log", signal.SIGTERM)
    assert status == 128 + signal.SIGTERM, (tmp_path / "stopped.log").read_text()
    stopped_at = last_checkpoint(out)
    assert stopped_at is not None and read_manifest(out) is None

    assert main(_command("rm", recipe_path)[3:]) == 0, capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["resumed_from"] == str(stopped_at)
    assert _trained_steps(metrics) == list(range(1, STEPS + 1))  # nothing lost, nothing done twice
    assert read_manifest(out).extra["objective"] == "classification"
