"""Sampling answers from a policy for chat prompts: batched, left-padded, stopped at the end of the turn.

Labelling and evaluation both sample through `sample_answers`, so the SFT and PPO policies are compared
under exactly the settings their data was produced with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rlhf_pipeline.chat import Messages, encode_prompt, end_of_turn_id, pad_batch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class Sample:
    """One sampled answer: its text, its token ids (end-of-turn included when reached) and the prompt ids."""

    prompt_ids: list[int]
    answer_ids: list[int]
    text: str
    finished: bool


def cut_at_stop(tokens: Sequence[int], stop_ids: set[int]) -> tuple[list[int], bool]:
    """The answer up to and including its first stop token, and whether it stopped at all."""
    for index, token in enumerate(tokens):
        if token in stop_ids:
            return list(tokens[: index + 1]), True
    return list(tokens), False


def sample_answers(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Messages],
                   num_samples: int = 1, max_new_tokens: int = 48, temperature: float = 1.0, top_p: float = 1.0,
                   batch_size: int = 16, seed: int = 0, description: str = "sampling",
                   answer_prefixes: Sequence[str] | None = None) -> list[list[Sample]]:
    """`num_samples` answers for each prompt (greedy when temperature is 0), with a progress bar.

    With `answer_prefixes` (one per prompt) each answer continues its prompt's prefix, as Math-Shepherd's rollouts
    continue a solution's first steps: the prefix is part of the prompt ids, the sample holds the continuation only.
    """
    import torch
    from tqdm.auto import tqdm

    from rlhf_pipeline.distributed import is_main_process

    stop_ids = {end_of_turn_id(tokenizer), tokenizer.eos_token_id}
    prefixes = answer_prefixes if answer_prefixes is not None else [""] * len(prompts)
    encoded = [encode_prompt(tokenizer, p) + tokenizer(prefix, add_special_tokens=False)["input_ids"]
               for p, prefix in zip(prompts, prefixes, strict=True) for _ in range(num_samples)]
    device = next(model.parameters()).device
    generator_seed = torch.random.initial_seed()
    torch.manual_seed(seed)
    samples: list[Sample] = []
    model.eval()
    with torch.no_grad():
        for start in tqdm(range(0, len(encoded), batch_size), desc=description, disable=not is_main_process()):
            batch = encoded[start : start + batch_size]
            ids, mask = pad_batch(batch, tokenizer.pad_token_id, "left")
            output = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                    max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                                    temperature=temperature if temperature > 0 else None,
                                    top_p=top_p if temperature > 0 else None, top_k=0 if temperature > 0 else None,
                                    eos_token_id=sorted(stop_ids), pad_token_id=tokenizer.pad_token_id)
            for prompt_ids, row in zip(batch, output[:, ids.shape[1]:].tolist(), strict=True):
                answer, finished = cut_at_stop(row, stop_ids)
                text = tokenizer.decode(answer, skip_special_tokens=True).strip()
                samples.append(Sample(prompt_ids, answer, text, finished))
    torch.manual_seed(generator_seed)
    return [samples[i * num_samples : (i + 1) * num_samples] for i in range(len(prompts))]
