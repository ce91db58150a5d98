"""Policies on a tiny base for the engine tests: PPO's roles on one base, built without any TRL trainer (vLLM's
CPU build pins a transformers that TRL's trainers do not run on, and these tests also run in .venv-vllm).

The tiny model here has head size 64 (vLLM's CPU attention takes 32 and up); adapters are random with LoRA B
non-zero, so a policy differs from the bare base from its first token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import build_tiny_model

PROMPTS = [[{"role": "user", "content": f"Tell me about {topic}."}]
           for topic in ("the weather", "my cake", "the traffic", "my garden", "the weekend", "the train", "my tea",
                         "the park", "the library", "dinner", "the market", "the story", "the river", "the cat",
                         "the letter", "the film", "the shop", "the mountains")]


@pytest.fixture(scope="session")
def engine_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama-64"), hidden_size=128, num_attention_heads=2,
                            num_key_value_heads=1)


def random_adapter(model_dir: Path, folder: Path, seed: int, reward: bool = False) -> Path:
    """A LoRA adapter (r 8, every linear layer) with random A and B; a reward model's also saves its score head."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model_class = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
    base = model_class.from_pretrained(model_dir, **({"num_labels": 1} if reward else {}))
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                        task_type=TaskType.SEQ_CLS if reward else TaskType.CAUSAL_LM)
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.2)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def adapters(engine_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("adapters")
    return {"sft": random_adapter(engine_model_dir, work / "sft", 1),
            "rm": random_adapter(engine_model_dir, work / "rm", 2, reward=True)}


def ppo_roles(model_dir: Path, adapters: dict[str, Path], quantized: bool = False) -> tuple[Any, Any, Any]:
    """(shared base with PPO's four roles, tokenizer, model spec): the base 4-bit (fp32 compute) when `quantized`."""
    from rlhf_pipeline.models import load_tokenizer
    from rlhf_pipeline.ppo.roles import build_ppo_model
    from rlhf_pipeline.recipe import LoraSpec, ModelSpec, QuantizationSpec
    from rlhf_pipeline.sources import ModelSource

    quantization = QuantizationSpec(load_in_4bit=True, bnb_4bit_compute_dtype="float32") if quantized \
        else QuantizationSpec()
    spec = ModelSpec(name_or_path=str(model_dir), dtype="float32", quantization=quantization,
                     lora=LoraSpec(r=8, lora_alpha=16, lora_dropout=0.0))
    source = ModelSource(str(model_dir), None, "tiny", None, str(model_dir), adapter=str(adapters["sft"]))
    reward = ModelSource(str(model_dir), None, "tiny", None, str(model_dir), adapter=str(adapters["rm"]))
    tokenizer = load_tokenizer(source, spec)
    return build_ppo_model(source, reward, spec, tokenizer), tokenizer, spec


def greedy(engine: Any, shared: Any, role: str, tokenizer: Any, version: object = None,
           tokens: int = 12) -> list[list[int]]:
    """Each prompt's greedy answer ids from `engine` once it holds `role` at `version`."""
    from rlhf_pipeline.generation import sample_answers

    engine.use(shared, role, version)
    return [group[0].answer_ids for group in sample_answers(engine, tokenizer, PROMPTS, 1, tokens, 0.0)]


def hf_greedy(shared: Any, role: str, tokenizer: Any, tokens: int = 12) -> list[list[int]]:
    """The reference: Hugging Face `generate` on the role's adapter, live on the training base."""
    from rlhf_pipeline.engines.hf import HFEngine

    return greedy(HFEngine(tokenizer.pad_token_id, 32), shared, role, tokenizer, tokens=tokens)
