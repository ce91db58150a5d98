"""A trivial judge for chain tests: it prefers answers with more of the letter 'e'."""

from __future__ import annotations

from collections.abc import Sequence


def letter_e_share(prompts: Sequence[object], answers: Sequence[str]) -> list[float]:
    return [answer.count("e") / max(len(answer), 1) for answer in answers]
