"""Final answers in both shapes (ours and GSM8K's), the outcome check, and majority voting."""

from __future__ import annotations

import pytest

from rlhf_pipeline.tasks.answers import final_answer, majority, normalise, outcome, reference_answer


@pytest.mark.parametrize(("text", "expected"), [
    ("23 + 48 = 71\n71 - 17 = 54\nThe answer is 54.", "54"),
    ("He saves 1250 * 12 = <<1250*12=15000>>15000 dollars.\n#### 15,000", "15000"),
    ("Step 4: ... so she makes $18. The answer is: 18", "18"),
    ("the answer is $-3.50", "-3.5"),
    ("The answer is 5. No wait, the answer is 7.", "7"),  # the last statement counts
    ("I think it is 54.", None),
    ("The answer is unknown.", None),
])
def test_final_answer(text: str, expected: str | None) -> None:
    assert final_answer(text) == expected


def test_numbers_have_one_spelling_and_references_may_be_bare() -> None:
    assert [normalise(n) for n in ("1,000", "54.0", "054", "$7", "-0", "0.50")] == ["1000", "54", "54", "7", "0", "0.5"]
    assert reference_answer("72") == "72" and reference_answer(" 7.0 ") == "7"
    assert reference_answer("worked out\n#### 3") == "3"
    assert reference_answer("no number here") is None


def test_outcome_compares_final_answers_and_refuses_a_reference_without_one() -> None:
    prompts = [[{"role": "user", "content": "q"}]] * 4
    answers = ["The answer is 54.", "#### 54", "54", "The answer is 45."]
    assert outcome(prompts, answers, ["#### 54"] * 4) == [1.0, 1.0, 0.0, 0.0]  # "54" alone states nothing
    with pytest.raises(ValueError, match="states no final answer"):
        outcome(prompts[:1], answers[:1], ["see the book"])


def test_majority_counts_final_answers_and_keeps_ties() -> None:
    assert majority(["The answer is 4.", "#### 4", "The answer is 5.", "no answer"]) == ["4"]
    assert sorted(majority(["The answer is 4.", "The answer is 5."])) == ["4", "5"]
    assert majority(["no answer", ""]) == []
