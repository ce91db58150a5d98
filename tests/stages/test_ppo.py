"""The ppo stage end to end on the tiny model with the knobs PPO users reach for: PPO-ptx demonstrations,
an adaptive KL coefficient, an entropy bonus, a critic learning rate and warm-up, epoch early stopping."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from rlhf_pipeline.cli import main
from rlhf_pipeline.ppo.formulas import adaptive_kl_coef
from rlhf_pipeline.stages import load_recipe
from tests.stages.conftest import RecipeFactory, preference_rows, sft_rows, write_card


def test_ppo_stage_with_ptx_and_the_knobs(tmp_path: Path, tiny_model_dir: Path, make_recipe: RecipeFactory) -> None:
    from rlhf_pipeline.stages import rm

    write_card(tmp_path, "pairs", preference_rows(16), "prompt_chosen_rejected", ["rm"])
    write_card(tmp_path, "demos", sft_rows(12), "messages", ["sft"])
    write_card(tmp_path, "prompts", [{"prompt": f"Tell me about topic {i}."} for i in range(16)], "prompt_only",
               ["ppo"])
    rm.run(load_recipe(make_recipe("rm", ["pairs"], {"max_steps": 1}, data={"train": ["pairs"], "eval_split": 0.0})))
    knobs = {"reward_model_path": str(tmp_path / "outputs" / "rm"), "per_device_train_batch_size": 4,
             "total_episodes": 12, "response_length": 6, "num_ppo_epochs": 2, "learning_rate": 1e-3,
             "ptx_coef": 0.5, "adap_kl_ctrl": True, "kl_coef": 0.1, "target": 0.5, "horizon": 40,
             "entropy_coef": 0.01, "critic_learning_rate": 2e-3, "critic_warmup_steps": 1, "early_stopping": True,
             "target_kl": 0.05, "save_steps": 10, "num_sample_generations": 0, "disable_tqdm": True}
    recipe = tmp_path / "ppo.yaml"
    recipe.write_text(yaml.safe_dump({
        "stage": "ppo", "model": {"name_or_path": str(tiny_model_dir), "lora": {"r": 8, "lora_alpha": 16}},
        "data": {"train": ["prompts"], "ptx": ["demos"], "eval_split": 0.0, "max_length": 96},
        "training": {"output_dir": str(tmp_path / "outputs" / "ppo"), "seed": 0, **knobs}}))
    assert main(["ppo", str(recipe)]) == 0
    metrics = json.loads((tmp_path / "outputs" / "ppo" / "metrics.json").read_text())
    steps = [entry for entry in metrics["log_history"] if "objective/scores" in entry]
    assert [entry["step"] for entry in steps] == [1, 2, 3]
    assert "loss/policy" not in steps[0] and "loss/ptx" not in steps[0]  # step 1 trains the critic only
    assert all(entry["loss/ptx"] > 0 and "policy/entropy_bonus" in entry for entry in steps[1:])
    coef = 0.1
    for entry in steps:
        assert entry["objective/kl_coef"] == coef
        coef = adaptive_kl_coef(coef, entry["objective/kl"], 0.5, 40, 4)
    assert metrics["data"]["rows_kept"] == 16 + 12  # the demonstrations are counted in the data report
