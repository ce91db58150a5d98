"""Pre-flight checks of a launch against the recipe, with the launch environment given as a mapping (no launch)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from rlhf_pipeline.distributed import read_launch
from rlhf_pipeline.errors import PipelineError, RecipeError
from rlhf_pipeline.preflight import check_launch
from rlhf_pipeline.stages import load_recipe
from tests.stages.conftest import sft_rows, write_card

DEEPSPEED = {"ACCELERATE_USE_DEEPSPEED": "true", "WORLD_SIZE": "2"}
ZERO2 = {**DEEPSPEED, "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}
ZERO3 = {**DEEPSPEED, "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}
FSDP = {"ACCELERATE_USE_FSDP": "true", "WORLD_SIZE": "8"}
DDP = {"WORLD_SIZE": "2"}


@pytest.fixture
def recipe_for(tmp_path: Path, tiny_model_dir: Path):
    """Write and load a recipe for the tiny model, with `training` and `model` keys merged in."""
    write_card(tmp_path, "chat", sft_rows(8), "messages", ["sft"])
    write_card(tmp_path, "prompts", [{"prompt": f"Say something about {i}."} for i in range(6)], "prompt_only",
               ["ppo"])

    def make(stage: str = "sft", training: dict[str, Any] | None = None, model: dict[str, Any] | None = None):
        base_training = {"output_dir": str(tmp_path / "out" / stage)}
        if stage == "ppo":
            base_training["reward_model_path"] = str(tmp_path / "out" / "rm")
        recipe = {"stage": stage, "model": {"name_or_path": str(tiny_model_dir), "lora": {"r": 8}} | (model or {}),
                  "data": {"train": ["prompts" if stage == "ppo" else "chat"], "eval_split": 0.0},
                  "training": base_training | (training or {})}
        path = tmp_path / f"{stage}.yaml"
        path.write_text(yaml.safe_dump(recipe))
        return load_recipe(path)
    return make


def test_read_launch_from_accelerate_environment(tmp_path: Path) -> None:
    assert read_launch({}).backend == "a single process"
    assert read_launch(DDP).world_size == 2 and read_launch(DDP).backend == "DDP"
    zero3 = read_launch(ZERO3)
    assert zero3.deepspeed and zero3.zero_stage == 3 and zero3.shards_parameters and zero3.backend == "DeepSpeed ZeRO-3"
    assert not read_launch(ZERO2).shards_parameters
    assert read_launch(FSDP).shards_parameters
    ds_file = tmp_path / "ds.json"
    ds_file.write_text(json.dumps({"zero_optimization": {"stage": 3}, "gradient_accumulation_steps": 4,
                                   "gradient_clipping": "auto", "train_batch_size": "auto"}))
    from_file = read_launch({**DEEPSPEED, "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ds_file)})
    assert from_file.zero_stage == 3 and from_file.deepspeed_values == {"gradient_accumulation_steps": 4.0}


def test_single_process_and_ddp_pass(recipe_for) -> None:
    recipe = recipe_for("sft", {"gradient_accumulation_steps": 4})
    assert check_launch(recipe, {}).world_size == 1
    assert check_launch(recipe, DDP).world_size == 2
    assert check_launch(recipe, ZERO3).zero_stage == 3  # accumulation left to the recipe ("auto")


def test_deepspeed_accumulation_must_match_the_recipe(recipe_for) -> None:
    env = {**ZERO2, "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"}
    with pytest.raises(RecipeError, match=r"training\.gradient_accumulation_steps: the recipe says 1 but the "
                                          r"DeepSpeed config fixes gradient_accumulation_steps = 4 "
                                          r"\(ACCELERATE_GRADIENT_ACCUMULATION_STEPS=4"):
        check_launch(recipe_for("sft"), env)
    check_launch(recipe_for("sft", {"gradient_accumulation_steps": 4}), env)
    with pytest.raises(RecipeError, match=r"training\.max_grad_norm: the recipe says 0\.5 .* gradient_clipping = 1"):
        check_launch(recipe_for("sft", {"max_grad_norm": 0.5}), {**ZERO2, "ACCELERATE_GRADIENT_CLIPPING": "1.0"})


def test_deepspeed_config_file_values_must_match_the_recipe(recipe_for, tmp_path: Path) -> None:
    ds_file = tmp_path / "ds.json"
    env = {**DEEPSPEED, "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(ds_file)}
    ds_file.write_text(json.dumps({"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 2}))
    with pytest.raises(RecipeError, match=rf"gradient_accumulation_steps: 2 in {ds_file}"):
        check_launch(recipe_for("sft"), env)
    ds_file.write_text(json.dumps({"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": "auto",
                                   "train_batch_size": 32}))
    with pytest.raises(RecipeError, match=r"4 x gradient_accumulation_steps 2 x 2 processes = 16, but the DeepSpeed "
                                          r"config fixes train_batch_size = 32"):
        check_launch(recipe_for("sft", {"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2}), env)
    check_launch(recipe_for("sft", {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 2}), env)
    ds_file.write_text("{not json")
    with pytest.raises(PipelineError, match="deepspeed_config_file: cannot read"):
        check_launch(recipe_for("sft"), env)


@pytest.mark.parametrize("env", [ZERO3, FSDP], ids=["zero3", "fsdp"])
def test_sharded_4bit_needs_quant_storage_in_the_compute_dtype(recipe_for, env: dict[str, str]) -> None:
    qlora = {"dtype": "bfloat16", "quantization": {"load_in_4bit": True}}
    with pytest.raises(RecipeError, match=r"model\.quantization\.bnb_4bit_quant_storage: .* set "
                                          r"bnb_4bit_quant_storage: bfloat16 \(now: uint8, the default\)"):
        check_launch(recipe_for("sft", model=qlora), env)
    wrong = {"dtype": "bfloat16", "quantization": {"load_in_4bit": True, "bnb_4bit_quant_storage": "float16"}}
    with pytest.raises(RecipeError, match=r"set bnb_4bit_quant_storage: bfloat16 \(now: float16\)"):
        check_launch(recipe_for("sft", model=wrong), env)
    compute = {"quantization": {"load_in_4bit": True, "bnb_4bit_compute_dtype": "float16",
                                "bnb_4bit_quant_storage": "float16"}}
    check_launch(recipe_for("sft", model=compute), env)


def test_4bit_without_sharding_needs_no_storage_dtype(recipe_for) -> None:
    qlora = {"dtype": "bfloat16", "quantization": {"load_in_4bit": True}}
    for env in ({}, DDP, ZERO2):
        check_launch(recipe_for("sft", model=qlora), env)


def test_ppo_clipping_fixed_by_deepspeed_must_match_the_recipe(recipe_for) -> None:
    """PPO fills DeepSpeed's "auto" clipping from max_grad_norm; a fixed different value is refused, naming both."""
    env = {**ZERO2, "ACCELERATE_GRADIENT_CLIPPING": "0.5"}
    with pytest.raises(RecipeError, match=r"training\.max_grad_norm: the recipe says 1\.0 but the DeepSpeed config "
                                          r"fixes gradient_clipping = 0\.5 \(ACCELERATE_GRADIENT_CLIPPING=0\.5"):
        check_launch(recipe_for("ppo", {"per_device_train_batch_size": 2, "total_episodes": 4}), env)
    check_launch(recipe_for("ppo", {"per_device_train_batch_size": 2, "total_episodes": 4, "max_grad_norm": 0.5}),
                 env)


def test_ppo_runs_under_ddp_and_deepspeed_and_refuses_fsdp(recipe_for) -> None:
    recipe = recipe_for("ppo", {"per_device_train_batch_size": 1, "total_episodes": 4})
    with pytest.raises(PipelineError, match=r"this launch uses FSDP, which the ppo stage does not support; it lacks "
                                            r"the four roles' shared base prepared .* silently left unsharded.* "
                                            r"generate\(\).* gradient reduction .* optimizer state; launch PPO with "
                                            r"accelerate_configs/multi_gpu\.yaml \(DDP\), deepspeed_zero2\.yaml or "
                                            r"deepspeed_zero3\.yaml"):
        check_launch(recipe, FSDP)
    for env in (DDP, ZERO2, ZERO3):
        check_launch(recipe, env)


def test_ppo_episodes_must_fill_whole_global_batches(recipe_for) -> None:
    recipe = recipe_for("ppo", {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 2,
                                "total_episodes": 6})
    check_launch(recipe, {})  # one process: 3 steps of 2
    with pytest.raises(RecipeError, match=r"training\.total_episodes: 6 episodes do not divide into the global "
                                          r"rollout batch of 4 \(2 prompts per process x 2 process\(es\)\): the run "
                                          r"would train 8; set total_episodes to a multiple of 4"):
        check_launch(recipe, DDP)


def test_ppo_needs_a_global_batch_of_prompts(recipe_for) -> None:
    recipe = recipe_for("ppo", {"per_device_train_batch_size": 4})  # 6 prompts in the card
    check_launch(recipe, {})
    with pytest.raises(RecipeError, match=r"data\.train: at most 6 prompts, fewer than one global rollout batch of "
                                          r"8 \(4 prompts per process x 2 process\(es\)\)"):
        check_launch(recipe, DDP)


def test_load_for_training_runs_the_checks_before_any_weights(recipe_for, monkeypatch) -> None:
    from rlhf_pipeline.stages import common

    def no_weights(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("weights were loaded before the pre-flight check")

    monkeypatch.setattr(common, "quiet_unless_main", lambda: None)  # no process group from this environment
    monkeypatch.setattr(common, "load_base", no_weights)
    monkeypatch.setattr(common, "resolve_source", no_weights)
    for name, value in {**ZERO3, "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "8"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(RecipeError, match="gradient_accumulation_steps"):
        common.load_for_training(recipe_for("sft"))


def test_quantized_device_map_per_rank_except_when_sharded(monkeypatch) -> None:
    import torch

    from rlhf_pipeline.models import _device_map

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert _device_map(quantized=False) is None
    assert _device_map(quantized=True) == {"": torch.device("cuda", 1)}  # DDP / single GPU: each rank its own
    for env in (ZERO3, FSDP):
        with monkeypatch.context() as patch:
            for name, value in env.items():
                patch.setenv(name, value)
            assert _device_map(quantized=True) is None  # ZeRO-3 / FSDP place the shards themselves
