"""The colocated vLLM engine against Hugging Face `generate`, greedy in fp32, on PPO's roles (tiny base).

Each engine is started once per module (start-up is the cost: ~20-60 s on two cores); every test builds its
own roles on the same base folder, which the engine serves.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.engines.conftest import PROMPTS, greedy, hf_greedy, ppo_roles

pytestmark = pytest.mark.vllm


def start(model_dir: Path, adapters: dict[str, Path], sync: str, quantized: bool = False) -> Any:
    from rlhf_pipeline.engines.spec import GenerationSpec
    from rlhf_pipeline.generation import open_engine

    shared, tokenizer, _ = ppo_roles(model_dir, adapters, quantized)
    spec = GenerationSpec(engine="vllm", sync=sync, dtype="float32", enforce_eager=True, kv_cache_gib=1)
    return open_engine(spec, shared, tokenizer, 32, model_dir)


@pytest.fixture(scope="module")
def merged_engine(engine_model_dir: Path, adapters: dict[str, Path]) -> Iterator[Any]:
    engine = start(engine_model_dir, adapters, "merged")
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def lora_engine(engine_model_dir: Path, adapters: dict[str, Path]) -> Iterator[Any]:
    engine = start(engine_model_dir, adapters, "lora")
    yield engine
    engine.close()


def test_greedy_answers_equal_hf_token_for_token(merged_engine: Any, engine_model_dir: Path,
                                                 adapters: dict[str, Path]) -> None:
    from rlhf_pipeline.ppo.roles import POLICY, REFERENCE

    shared, tokenizer, _ = ppo_roles(engine_model_dir, adapters)
    for role in (REFERENCE, POLICY):
        expected = hf_greedy(shared, role, tokenizer)
        assert len(expected) >= 16 and all(len(answer) > 2 for answer in expected)
        assert greedy(merged_engine, shared, role, tokenizer, version=0) == expected
    assert merged_engine.stats.as_dict()["engine"] == "vllm" and merged_engine.stats.tokens > 0


def ppo_config(output_dir: Path) -> Any:
    from rlhf_pipeline.ppo.config import PPOConfig

    return PPOConfig(output_dir=str(output_dir), per_device_train_batch_size=8, total_episodes=8, num_ppo_epochs=1,
                     response_length=12, temperature=1.0, learning_rate=0.05, save_steps=1, num_sample_generations=0,
                     disable_tqdm=True, seed=0, kl_coef=0.0)


def length_reward(input_ids: Any, attention_mask: Any, prompt_lengths: Any) -> Any:
    """Longer answers score higher: any reward moves the policy; this one needs no reward model."""
    return attention_mask.sum(dim=1).float() - prompt_lengths.float()


def test_after_a_ppo_step_and_after_resuming_the_engine_samples_the_new_policy(
        merged_engine: Any, engine_model_dir: Path, adapters: dict[str, Path], tmp_path: Path) -> None:
    from rlhf_pipeline.chat import encode_prompt
    from rlhf_pipeline.ppo.roles import POLICY
    from rlhf_pipeline.ppo.trainer import PPOTrainer

    shared, tokenizer, _ = ppo_roles(engine_model_dir, adapters)
    prompts = [encode_prompt(tokenizer, chat) for chat in PROMPTS[:8]]
    before = hf_greedy(shared, POLICY, tokenizer)
    trainer = PPOTrainer(ppo_config(tmp_path), shared, length_reward, tokenizer, prompts, engine=merged_engine)
    trainer.train()
    gap = trainer.log_history[0]["generation/logprob_gap"]
    assert 0 <= gap < 1e-3  # fp32 engine, the rollout's own policy: the same log-probs
    assert {"time/sampling", "time/sync", "time/scoring", "time/optimisation"} <= trainer.log_history[0].keys()
    after = hf_greedy(shared, POLICY, tokenizer)
    assert after != before  # the step changed the policy's greedy answers...
    assert greedy(merged_engine, shared, POLICY, tokenizer, version=trainer.global_step) == after  # ...and the engine's

    resumed_shared, _, _ = ppo_roles(engine_model_dir, adapters)  # a new process's model, resumed from checkpoint-1
    resumed = PPOTrainer(ppo_config(tmp_path), resumed_shared, length_reward, tokenizer, prompts, engine=merged_engine)
    resumed.train(resume_from_checkpoint=tmp_path / "checkpoint-1")
    assert hf_greedy(resumed_shared, POLICY, tokenizer) == after
    assert greedy(merged_engine, resumed_shared, POLICY, tokenizer, version=resumed.global_step) == after


def perturb(shared: Any, role: str, seed: int) -> None:
    """A new policy version: the role's LoRA B matrices moved in place (as an optimizer step would)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in shared.model.named_parameters():
            if "lora_B" in name and f".{role}." in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.3)


def test_each_adapter_version_gets_a_new_lora_id_and_a_reused_id_serves_the_old_adapter(
        lora_engine: Any, engine_model_dir: Path, adapters: dict[str, Path]) -> None:
    from rlhf_pipeline.ppo.roles import POLICY

    shared, tokenizer, _ = ppo_roles(engine_model_dir, adapters)
    first = hf_greedy(shared, POLICY, tokenizer)
    assert greedy(lora_engine, shared, POLICY, tokenizer, version=1) == first
    ids = [lora_engine.loaded.lora_id]
    perturb(shared, POLICY, 0)
    second = hf_greedy(shared, POLICY, tokenizer)
    assert second != first
    assert greedy(lora_engine, shared, POLICY, tokenizer, version=2) == second
    ids.append(lora_engine.loaded.lora_id)
    assert ids[1] > ids[0]

    # An engine that re-used the id (and, as a naive sync would, did not unload it) keeps serving version 2.
    lora_engine.next_lora_id = lora_engine.loaded.lora_id
    lora_engine.llm.llm_engine.remove_lora = lambda lora_id: False
    perturb(shared, POLICY, 1)
    third = hf_greedy(shared, POLICY, tokenizer)
    assert third != second
    stale = greedy(lora_engine, shared, POLICY, tokenizer, version=3)
    assert stale == second and stale != third


def quantized_bytes(shared: Any) -> str:
    """A hash of every 4-bit weight and its quantization constants: what a sync must never change."""
    digest = hashlib.sha256()
    for name, param in sorted(shared.model.named_parameters()):
        if type(param).__name__ == "Params4bit":
            digest.update(name.encode())
            digest.update(param.data.cpu().numpy().tobytes())
            digest.update(param.quant_state.absmax.cpu().float().numpy().tobytes())
    return digest.hexdigest()


def test_qlora_engine_equals_the_4bit_training_model_and_leaves_its_bytes_alone(
        engine_model_dir: Path, adapters: dict[str, Path]) -> None:
    from rlhf_pipeline.ppo.roles import POLICY

    engine = start(engine_model_dir, adapters, "merged", quantized=True)
    try:
        shared, tokenizer, _ = ppo_roles(engine_model_dir, adapters, quantized=True)
        full_precision, _, _ = ppo_roles(engine_model_dir, adapters)
        before = quantized_bytes(shared)
        expected = hf_greedy(shared, POLICY, tokenizer)
        assert expected != hf_greedy(full_precision, POLICY, tokenizer)  # 4-bit is another model: its own answers
        assert greedy(engine, shared, POLICY, tokenizer, version=0) == expected
        perturb(shared, POLICY, 2)
        assert greedy(engine, shared, POLICY, tokenizer, version=1) == hf_greedy(shared, POLICY, tokenizer)
        assert quantized_bytes(shared) == before
    finally:
        engine.close()
