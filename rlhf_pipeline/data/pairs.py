"""Preference formats that need a decision before they are pairs: rankings, labelled pairs, nested answers.

A ranking (K answers, best first or scored) expands into every ordered pair; a labelled pair
(Stanford SHP, PKU-SafeRLHF) is put in order by its label; nested completions (openbmb/UltraFeedback)
are a scored ranking stored as a list of records. Pure Python, like `formats`, which dispatches here.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import Any

from rlhf_pipeline.data.rows import (
    Row,
    UnusableRow,
    make_pair,
    pair_from_answers,
    parse_answer,
    required_field,
    shared_prompt,
)

PAIR_LABELS = (0, 1)  # the two values a `pair_with_label` label may take; the card says which means "A"


def _ranked_answers(row: Mapping) -> tuple[list[Any], list[float] | None]:
    """Answers best first, and their scores when the row gives scores instead of an order."""
    if row.get("ranked") is not None:
        ranked = row["ranked"]
        if not isinstance(ranked, (list, tuple)):
            raise UnusableRow("wrong_type")
        return list(ranked), None
    answers, scores = required_field(row, "answers"), required_field(row, "scores")
    if not isinstance(answers, (list, tuple)) or not isinstance(scores, (list, tuple)):
        raise UnusableRow("wrong_type")
    if any(isinstance(s, bool) or not isinstance(s, (int, float)) for s in scores):
        raise UnusableRow("wrong_type")
    if not all(math.isfinite(s) for s in scores):  # a NaN orders nothing and would give NaN margins
        raise UnusableRow("non_finite_score")
    if len(answers) != len(scores):
        raise UnusableRow("malformed_ranking")
    order = sorted(range(len(answers)), key=lambda i: -scores[i])  # stable: equal scores keep row order
    return [answers[i] for i in order], [float(scores[i]) for i in order]


def pairs_from_ranking(row: Mapping, with_margin: bool) -> list[Row | UnusableRow]:
    """K ranked answers -> K·(K−1)/2 pairs, better answer chosen; tied scores give no pair ("tie").

    Drops inside a ranking are counted per pair, since one bad answer spoils only the pairs it is in.
    """
    answers, scores = _ranked_answers(row)
    if len(answers) < 2:
        raise UnusableRow("too_few_answers")
    parsed = [parse_answer(answer) for answer in answers]
    prompt = shared_prompt(row, [history for history, _ in parsed])
    texts = [text for _, text in parsed]
    outcomes: list[Row | UnusableRow] = []
    for better, worse in itertools.combinations(range(len(texts)), 2):
        if scores is not None and scores[better] == scores[worse]:
            outcomes.append(UnusableRow("tie"))
            continue
        try:
            pair = make_pair(prompt, texts[better], texts[worse])
        except UnusableRow as unusable:
            outcomes.append(unusable)
            continue
        if with_margin and scores is not None:
            pair["margin"] = scores[better] - scores[worse]
        outcomes.append(pair)
    return outcomes


def pair_from_label(row: Mapping, first_preferred_when: int) -> list[Row]:
    """`answer_a`/`answer_b` ordered by `label`: the card's `first_preferred_when` value means A is better.

    Datasets disagree on the convention (SHP: 1 means A; PKU-SafeRLHF: 0 means response_0), so the
    card has to say it; any other label value is dropped as `bad_label` rather than guessed.
    """
    label = required_field(row, "label")
    if isinstance(label, bool) or label not in PAIR_LABELS:
        raise UnusableRow("bad_label")
    first, second = required_field(row, "answer_a"), required_field(row, "answer_b")
    if label == first_preferred_when:
        return pair_from_answers(row, first, second)
    return pair_from_answers(row, second, first)


def pairs_from_completions(row: Mapping, with_margin: bool, answer_key: str,
                           score_key: str) -> list[Row | UnusableRow]:
    """`completions` records holding an answer and its score, ranked as `answers` + `scores` would be."""
    completions = required_field(row, "completions")
    if not isinstance(completions, (list, tuple)) or not all(isinstance(c, Mapping) for c in completions):
        raise UnusableRow("wrong_type")
    answers = [required_field(completion, answer_key) for completion in completions]
    scores = [required_field(completion, score_key) for completion in completions]
    return pairs_from_ranking({"prompt": row.get("prompt"), "answers": answers, "scores": scores}, with_margin)
