"""Trivial judges and reward functions for chain tests: the letter 'e', and answer length."""

from __future__ import annotations

from collections.abc import Sequence


def letter_e_share(prompts: Sequence[object], answers: Sequence[str]) -> list[float]:
    return [answer.count("e") / max(len(answer), 1) for answer in answers]


def answer_length(prompts: Sequence[object], answers: Sequence[str]) -> list[float]:
    return [float(len(answer)) for answer in answers]
