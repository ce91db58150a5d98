"""A trivial judge for chain tests: it prefers answers with more of the letter 'e'."""

from __future__ import annotations

from collections.abc import Sequence


def letter_e_share(prompts: Sequence[object], answers: Sequence[str]) -> list[float]:
    return [answer.count("e") / max(len(answer), 1) for answer in answers]


def mentions_cake(prompts: Sequence[object], answers: Sequence[str]) -> list[float]:
    """A rule for tests: 1.0 (the rule is broken) when an answer says "cake"."""
    return [float("cake" in answer.lower()) for answer in answers]


def answer_length(prompts: Sequence[object], answers: Sequence[str]) -> list[float]:
    return [float(len(answer)) for answer in answers]


def over_30_characters(prompts: Sequence[object], answers: Sequence[str]) -> list[float]:
    """A rule for tests: an answer over 30 characters breaks it."""
    return [float(len(answer) > 30) for answer in answers]


def first_word(answer: str) -> str | None:
    """A "final answer" for majority-vote tests: an answer's first word (None for an empty answer)."""
    words = answer.split()
    return words[0].lower() if words else None
