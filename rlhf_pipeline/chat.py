"""How conversations become token ids, the same way in every stage that scores or samples answers.

A prompt is the chat template rendered up to the assistant's turn (`add_generation_prompt=True`); an
answer is its text's tokens followed by the template's end-of-turn token. The reward model is trained
on exactly the layout the policy produces when it samples (prompt ids, then answer ids ending at the
end-of-turn token), so a score means the same thing in RM training, labelling, PPO and evaluation.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

Messages = list[dict[str, str]]
_PROBE = "zqxj"


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The special token the chat template closes an assistant turn with (`<|im_end|>`, `<|eot_id|>`...)."""
    return _end_of_turn_id(tokenizer)


@functools.cache
def _end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                           tokenize=True)
    full = tokenizer.apply_chat_template([{"role": "user", "content": "hi"},
                                          {"role": "assistant", "content": _PROBE}], tokenize=True)
    special = set(tokenizer.all_special_ids)
    return next((token for token in _ids(full)[len(_ids(prompt)):] if token in special), tokenizer.eos_token_id)


def _ids(encoded: object) -> list[int]:
    """apply_chat_template returns a list or a BatchEncoding depending on the tokenizer; take the ids."""
    return list(encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, messages: Messages) -> list[int]:
    """The prompt's ids, ending where the assistant's answer starts."""
    return _ids(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))


def encode_answer(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """The answer's ids followed by the end-of-turn token, as a sampling policy would emit them."""
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [end_of_turn_id(tokenizer)]


def encode_conversations(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Messages],
                         answers: Sequence[str]) -> list[list[int]]:
    """Prompt + answer ids for each (prompt, answer) pair."""
    return [encode_prompt(tokenizer, p) + encode_answer(tokenizer, a) for p, a in zip(prompts, answers, strict=True)]


def answer_text(message: Messages | str) -> str:
    """The text of a canonical answer (a one-message list) or of a plain string."""
    return message if isinstance(message, str) else message[-1]["content"]


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded ids and the attention mask built from the lengths (never from `ids != pad`, which would hide an
    end-of-turn token that doubles as the pad token). `side="left"` ends every prompt together, for sampling;
    "right" puts every row's last token at its own length, for scoring.
    """
    import torch
    from trl.trainer.utils import pad

    rows = [torch.as_tensor(sequence, dtype=torch.long) for sequence in sequences]
    return (pad(rows, padding_value=pad_id, padding_side=side),
            pad([torch.ones_like(row) for row in rows], padding_value=0, padding_side=side))
