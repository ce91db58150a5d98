"""Final answers, read off a solution's text, and the outcome check: the reward with a right answer.

A solution states its final answer as "The answer is N." (the shipped arithmetic task, Math-Shepherd's
"The answer is: N") or as GSM8K's "#### N"; the last such statement counts. A reference (a card's
`reference` column) is a right answer written either way, a full solution ending in one, or a bare number.

    reward:
      functions: [rlhf_pipeline.tasks.answers:outcome]    # 1 when the final answer is right, else 0

A function with a `references` parameter gets each prompt's reference from the stage's data (judges.py).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation

_NUMBER = r"(-?\$?-?[\d,]*\.?\d+)"
_STATED = re.compile(rf"(?:the answer is:?|####)\s*{_NUMBER}", re.IGNORECASE)
_BARE = re.compile(rf"\s*{_NUMBER}\s*\.?\s*")


def normalise(number: str) -> str:
    """One spelling per number: no "$", thousands commas, spaces or trailing decimal zeros ("1,000.50" -> "1000.5")."""
    text = number.replace("$", "").replace(",", "").replace(" ", "")
    try:
        value = Decimal(text)
    except InvalidOperation:
        return text
    return "0" if value == 0 else format(value.normalize(), "f")


def final_answer(text: str) -> str | None:
    """The number after the solution's last "The answer is" or "####", normalised; None when it states none."""
    stated = _STATED.findall(text)
    return normalise(stated[-1]) if stated else None


def reference_answer(reference: str) -> str | None:
    """The right answer a reference gives: its stated final answer, or the reference itself when a bare number."""
    stated = final_answer(reference)
    if stated is not None:
        return stated
    bare = _BARE.fullmatch(reference)
    return normalise(bare.group(1)) if bare else None


def outcome(prompts: Sequence[object], answers: Sequence[str], references: Sequence[str]) -> list[float]:
    """1.0 when an answer's final answer equals its reference's, else 0.0 (no final answer stated is wrong)."""
    scores = []
    for answer, reference in zip(answers, references, strict=True):
        right = reference_answer(reference)
        if right is None:
            raise ValueError(f"reference {reference!r} states no final answer (a number, 'The answer is N.' or "
                             "'#### N'); fix the card's reference column")
        scores.append(float(final_answer(answer) == right))
    return scores


def majority(answers: Sequence[str]) -> list[str]:
    """The most frequent final answers among `answers` (several when tied; none when no answer states one)."""
    counts = Counter(answer for answer in map(final_answer, answers) if answer is not None)
    if not counts:
        return []
    top = max(counts.values())
    return [answer for answer, count in counts.items() if count == top]
