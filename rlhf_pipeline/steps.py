"""Solutions written one step per line: how they split into steps and which token ends each step.

A process reward model (stages/prm.py) is trained and read at the token that ends each step, PPO's dense
rewards land there, and Math-Shepherd labels are estimated per step prefix; all of them split an answer
here, so a step means the same thing everywhere. A step is one non-blank line. A step ends at the token
holding the line break after it; the last step ends at the answer's last token (the end-of-turn token when
the answer finished). Pure Python: tokenizers are only called, never imported.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

SEPARATOR = "\n"


def split_steps(text: str) -> list[str]:
    """The steps of an answer: its non-blank lines, stripped."""
    return [line.strip() for line in text.split(SEPARATOR) if line.strip()]


def join_steps(steps: Sequence[str]) -> str:
    """An answer from its steps, one per line; a step's own line breaks become spaces (one step, one line)."""
    return SEPARATOR.join(" ".join(step.split()) for step in steps)


def step_ends(token_texts: Sequence[str]) -> list[int]:
    """Indices of the tokens that end each step, given each answer token's text.

    A token holding a line break ends the step written since the previous end, if that step has any
    non-blank text (blank lines end nothing); the last token ends the last step when text follows the
    last line break.
    """
    ends: list[int] = []
    pending = False  # non-blank text since the last step end
    for index, text in enumerate(token_texts):
        before, newline, after = text.partition(SEPARATOR)
        if newline:
            if pending or before.strip():
                ends.append(index)
            pending = bool(after.rpartition(SEPARATOR)[2].strip())
        elif text.strip():
            pending = True
    if pending and token_texts:
        ends.append(len(token_texts) - 1)
    return ends


def token_texts(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """Each token's own text (special tokens as they are spelled), for `step_ends`."""
    return [tokenizer.decode([token]) for token in ids]


def step_end_positions(tokenizer: Any, answer_ids: Sequence[int]) -> list[int]:
    """Positions in `answer_ids` of the tokens that end each step. Special tokens count as text-free, so the
    last step of a finished answer ends on its end-of-turn token (the answer's last token)."""
    special = set(tokenizer.all_special_ids)
    return step_ends(["" if token in special else text
                      for token, text in zip(answer_ids, token_texts(tokenizer, answer_ids), strict=True)])
