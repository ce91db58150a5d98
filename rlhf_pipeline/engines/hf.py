"""Hugging Face `generate` as a sampling engine: the default, and the reference the vLLM engine is tested against.

It samples from the role that is active on the shared base (a PEFT adapter, never merged), in left-padded
batches. Every sampling option the model's own generation_config would fill (Qwen's top_k=20, a repetition
penalty) is set here, so answers come from exactly softmax(logits / temperature), as PPO's log-probs assume.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rlhf_pipeline.chat import pad_batch
from rlhf_pipeline.engines.base import Completion, EngineStats, SamplingSettings

if TYPE_CHECKING:
    from rlhf_pipeline.adapters import SharedBase

PURE_SAMPLING = {"top_k": 0, "min_p": 0.0, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
                 "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_new_tokens": 0, "num_beams": 1}


def generation_config(settings: SamplingSettings, pad_id: int) -> Any:
    """A complete GenerationConfig for the settings (greedy at temperature 0), nothing left to the model's defaults."""
    from transformers import GenerationConfig

    sampling = settings.temperature > 0
    extra = {"temperature": settings.temperature, "top_p": settings.top_p} if sampling else {}
    return GenerationConfig(do_sample=sampling, max_new_tokens=settings.max_new_tokens, **PURE_SAMPLING, **extra,
                            eos_token_id=list(settings.stop_ids), pad_token_id=pad_id, use_cache=True)


def cut_at_stop(tokens: Sequence[int], stop_ids: Sequence[int]) -> list[int]:
    """The answer up to and including its first stop token (all of it when it never stops)."""
    for index, token in enumerate(tokens):
        if token in stop_ids:
            return list(tokens[: index + 1])
    return list(tokens)


class HFEngine:
    """`generate` on a `SharedBase` role, `batch_size` sequences at a time."""

    name = "hf"

    def __init__(self, pad_id: int, batch_size: int) -> None:
        self.pad_id = pad_id
        self.batch_size = batch_size
        self.model: Any = None
        self.stats = EngineStats(self.name)

    def use(self, shared: SharedBase, role: str, version: object = None) -> None:
        """Sample from `role` from now on; its adapter is live on the base, so every version is current."""
        self.model = shared.use(role)

    def generate(self, prompt_ids: Sequence[Sequence[int]], num_samples: int, settings: SamplingSettings,
                 progress: Any = None) -> list[list[Completion]]:
        """`num_samples` completions per prompt, drawn from torch's global generator (the caller seeds it)."""
        import torch

        rows = [list(ids) for ids in prompt_ids for _ in range(num_samples)]
        config = generation_config(settings, self.pad_id)
        device = next(self.model.parameters()).device
        completions: list[Completion] = []
        self.model.eval()
        self.stats.start()
        with torch.no_grad():
            for start in range(0, len(rows), self.batch_size):
                ids, mask = pad_batch(rows[start : start + self.batch_size], self.pad_id, "left")
                output = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                             generation_config=config, synced_gpus=False)
                completions += [Completion(cut_at_stop(row, settings.stop_ids))
                                for row in output[:, ids.shape[1]:].tolist()]
                if progress is not None:
                    progress(min(start + self.batch_size, len(rows)))
        self.stats.add(sum(len(c.token_ids) for c in completions))
        return [completions[i * num_samples : (i + 1) * num_samples] for i in range(len(prompt_ids))]

    def close(self) -> None:
        self.model = None
