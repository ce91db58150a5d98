"""Sampling answers for chat prompts: the one place every sampling stage goes through, whichever engine samples.

Label, eval, best-of-n, the human probe page and (through the same engines) PPO's rollouts and GRPO all sample
with `open_engine` + `sample_answers`, so policies are compared under exactly the settings their data was
produced with. The engine is the recipe's `generation.engine` (engines/spec.py): Hugging Face `generate` on the
active adapter (the default and the reference), or vLLM, colocated or as a server, holding each policy version
as merged weights or an adapter (engines/weights.py). Each call adds to the stage's record of which engine
sampled and at how many tokens/s (resources.record_sampling).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from rlhf_pipeline.chat import Messages, encode_prompt, end_of_turn_id
from rlhf_pipeline.engines.base import Completion, EngineStats, SamplingSettings
from rlhf_pipeline.resources import record_sampling

if TYPE_CHECKING:
    from pathlib import Path

    from transformers import PreTrainedTokenizerBase

    from rlhf_pipeline.adapters import SharedBase
    from rlhf_pipeline.engines.spec import GenerationSpec


@dataclass
class Sample:
    """One sampled answer: its text, its token ids (end-of-turn included when reached) and the prompt ids."""

    prompt_ids: list[int]
    answer_ids: list[int]
    text: str
    finished: bool


class Engine(Protocol):
    """What a sampling engine offers (engines/hf.py, engines/vllm_local.py, engines/vllm_server.py)."""

    name: str
    stats: EngineStats

    def use(self, shared: SharedBase, role: str, version: object = None) -> None: ...

    def generate(self, prompt_ids: Sequence[Sequence[int]], num_samples: int, settings: SamplingSettings,
                 progress: Any = None) -> list[list[Completion]]: ...

    def close(self) -> None: ...


def stop_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """The tokens that end an answer: the chat template's end of turn and the tokenizer's EOS."""
    return tuple(sorted({end_of_turn_id(tokenizer), tokenizer.eos_token_id}))


def lora_rank(shared: SharedBase) -> int | None:
    """The largest LoRA rank of the adapters on the base (what a LoRA-enabled engine must accept)."""
    configs = getattr(shared.model, "peft_config", {})
    return max((config.r for config in configs.values()), default=None)


def open_engine(spec: GenerationSpec, shared: SharedBase, tokenizer: PreTrainedTokenizerBase, batch_size: int,
                base_path: str | Path) -> Engine:
    """The engine the recipe's `generation:` section asks for, on the base at `base_path` that `shared` holds."""
    if not spec.uses_vllm:
        from rlhf_pipeline.engines.hf import HFEngine

        return HFEngine(tokenizer.pad_token_id, batch_size)
    from rlhf_pipeline.engines.versions import resolve_sync

    sync = resolve_sync(spec)
    if spec.mode == "colocated":
        from rlhf_pipeline.engines.vllm_local import ColocatedVLLM

        return ColocatedVLLM(spec, sync, shared, base_path, lora_rank(shared))
    from rlhf_pipeline.engines.vllm_server import ServerVLLM

    return ServerVLLM(spec, sync, shared, base_path, lora_rank(shared))


@contextmanager
def sampling_engine(spec: GenerationSpec, shared: SharedBase, tokenizer: PreTrainedTokenizerBase, batch_size: int,
                    base_path: str | Path) -> Iterator[Engine]:
    """`open_engine` for the length of a block: a vLLM engine (and a server it started) is shut down after it."""
    engine = open_engine(spec, shared, tokenizer, batch_size, base_path)
    try:
        yield engine
    finally:
        engine.close()


def sample_answers(engine: Engine, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Messages],
                   num_samples: int = 1, max_new_tokens: int = 48, temperature: float = 1.0, top_p: float = 1.0,
                   seed: int = 0, description: str = "sampling") -> list[list[Sample]]:
    """`num_samples` answers for each prompt (greedy when temperature is 0) from the engine's current policy.

    The same seed gives the same answers from the same engine; torch's global generator is seeded for the call
    (Hugging Face draws from it) and restored after it.
    """
    import torch
    from tqdm.auto import tqdm

    from rlhf_pipeline.distributed import is_main_process

    stops = stop_ids(tokenizer)
    encoded = [encode_prompt(tokenizer, prompt) for prompt in prompts]
    settings = SamplingSettings(max_new_tokens, temperature, top_p, seed, stops)
    generator_seed = torch.random.initial_seed()
    torch.manual_seed(seed)
    with tqdm(total=len(encoded) * num_samples, desc=f"{description} ({engine.name})",
              disable=not is_main_process()) as bar:
        completions = engine.generate(encoded, num_samples, settings, progress=lambda done: bar.update(done - bar.n))
    torch.manual_seed(generator_seed)
    record_sampling(engine.stats.as_dict())
    return [[Sample(prompt_ids, c.token_ids, tokenizer.decode(c.token_ids, skip_special_tokens=True).strip(),
                    bool(c.token_ids) and c.token_ids[-1] in stops) for c in group]
            for prompt_ids, group in zip(encoded, completions, strict=True)]
