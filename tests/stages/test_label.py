"""The label stage's pairing rules: a preference needs a real gap, and a judge must give finite scores."""

from __future__ import annotations

import math

import pytest

from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.stages.label import check_scores, select_pairs


def test_exact_ties_never_become_preferences() -> None:
    """VADER scores many neutral answers exactly 0.0: with min_gap 0 they must not be ordered by sampling order."""
    answers = ["It rained.", "The bus came.", "Lovely day!", "Awful."]
    pairs, too_close = select_pairs(answers, [0.0, 0.0, 0.6, -0.4], min_gap=0.0, mode="all")
    assert [(pair["chosen"], pair["rejected"]) for pair in pairs] == [
        ("Lovely day!", "It rained."), ("Lovely day!", "The bus came."), ("Lovely day!", "Awful."),
        ("It rained.", "Awful."), ("The bus came.", "Awful.")]
    assert too_close == 1  # the 0.0 tie
    assert select_pairs(["a", "b"], [0.0, 0.0], min_gap=0.0, mode="best_worst") == ([], 1)


def test_min_gap_is_inclusive_above_zero() -> None:
    pairs, too_close = select_pairs(["a", "b", "c"], [1.0, 0.5, 0.2], min_gap=0.5, mode="all")
    assert [(p["chosen"], p["rejected"], p["judge_gap"]) for p in pairs] == [("a", "b", 0.5), ("a", "c", 0.8)]
    assert too_close == 1


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_judge_score_is_an_error_naming_the_judge(bad: float) -> None:
    with pytest.raises(PipelineError, match=rf"label: the judge 'vader' returned {bad} for an answer to the prompt "
                                            r"\[\{'role': 'user', 'content': 'Hi'\}\] \(scores \[3\.0, "):
        check_scores([3.0, bad, 8.0], "vader", [{"role": "user", "content": "Hi"}])
    check_scores([3.0, -1.0, 0.0], "vader", "Hi")  # finite scores pass
