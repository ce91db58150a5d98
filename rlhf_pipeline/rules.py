"""Rules a machine can check: rule signals of a `reward:` section, rule labels (`label` with
`labelling.writes: classification`) and violation rates in `eval`.

Each has a judge's signature and returns, per answer, 1.0 when the answer breaks the rule and 0.0 when it
keeps it: the convention of the classification format and of rule reward models.

    reward:
      signals:
        long: {function: rlhf_pipeline.rules:over_word_limit, use: penalty}
"""

from __future__ import annotations

from collections.abc import Sequence

WORD_LIMIT = 20  # words; the demo's SFT policy goes over it in about two answers of five


def over_word_limit(prompts: Sequence[object], answers: Sequence[str]) -> list[float]:
    """An answer longer than WORD_LIMIT words (whitespace-separated) breaks the rule."""
    return [float(len(answer.split()) > WORD_LIMIT) for answer in answers]


def asks_a_question(prompts: Sequence[object], answers: Sequence[str]) -> list[float]:
    """An answer that asks the user something back (a question mark anywhere) breaks the rule."""
    return [float("?" in answer) for answer in answers]
