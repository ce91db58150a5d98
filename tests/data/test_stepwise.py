"""Stepwise data (a process reward model's): the shipped PRM800K and Math-Shepherd cards on fixtures in their real
shapes, with labels exactly as the cards say; the plain stepwise format; GSM8K as prompts with references."""

from __future__ import annotations

import pytest

from rlhf_pipeline.data.cards import load_card
from rlhf_pipeline.data.formats import to_prompts, to_stepwise
from rlhf_pipeline.data.loading import read_card_rows
from rlhf_pipeline.errors import RecipeError
from rlhf_pipeline.tasks.answers import outcome, reference_answer
from tests.data.shipped_cards import REPO, convert, shipped_card_on_fixture

FIXTURES = REPO / "tests" / "fixtures"


def solutions(rows: list[dict]) -> list[tuple[str, list[str], list[float]]]:
    return [(row["prompt"][-1]["content"], row["steps"], row["labels"]) for row in rows]


def test_prm800k_follows_chosen_steps_and_maps_ratings_by_the_card() -> None:
    card = shipped_card_on_fixture("prm800k", FIXTURES / "steps" / "prm800k.jsonl")
    assert card.good_ratings == [0, 1]  # the shipped card: neutral steps are not wrong
    out = convert(card)
    assert solutions(out.rows) == [
        ("What is $15\\%$ of $80$?", ["I need to multiply $80$ by $0.15$.",
                                       "I could also think of it as $10\\%$ plus $5\\%$.",
                                       "$80 \\cdot 0.15 = 12$. # Answer 12"], [1.0, 1.0, 1.0]),
        ("How many minutes are in $2.5$ hours?", ["There are $60$ minutes in an hour.",
                                                  "So $2$ hours are $120$ minutes.",
                                                  "And half an hour is $20$ minutes, so the total is $140$."],
         [1.0, 1.0, 0.0]),
        ("Simplify $\\frac{18}{24}$.", ["Both numbers are even.",
                                        "The greatest common divisor of $18$ and $24$ is $6$.",
                                        "Dividing both by $6$ gives $\\frac{3}{4}$. # Answer \\frac{3}{4}"],
         [1.0, 1.0, 1.0]),
        # labelling stopped at step 2 with two rated alternatives: one solution each
        ("What is the sum of the first $5$ odd numbers?", ["The first $5$ odd numbers are $1, 3, 5, 7, 9$.",
                                                           "Their sum is $1 + 3 + 5 + 7 + 9 = 24$."], [1.0, 0.0]),
        ("What is the sum of the first $5$ odd numbers?", ["The first $5$ odd numbers are $1, 3, 5, 7, 9$.",
                                                           "Their sum is $25$, which is also $5^2$."], [1.0, 1.0]),
        ("Round $3.456$ to the nearest tenth.", ["The tenths digit is $4$."], [1.0]),  # a null rating ends it
    ]
    assert out.dropped == {"bad_problem": 1, "missing_field": 1}
    assert out.first_bad_rows == {"bad_problem": [3], "missing_field": [6]}

    strict = to_stepwise(read_card_rows(card)[0], "prm800k", good_ratings=[1])
    assert strict.rows[0]["labels"] == [1.0, 0.0, 1.0]  # with [1], the neutral step is wrong


def test_math_shepherd_reads_each_tag_label_and_splits_the_question_from_step_one() -> None:
    out = convert(shipped_card_on_fixture("math_shepherd", FIXTURES / "steps" / "math_shepherd.jsonl"))
    assert solutions(out.rows) == [
        ("Ali reads 12 pages a day. How many pages does he read in a week?",
         ["Step 1: Ali reads 12 pages each day for 7 days.",
          "Step 2: He reads 12 * 7 = <<12*7=84>>84 pages. The answer is: 84"], [1.0, 1.0]),
        ("A shop sells pens at $3 each. Mia buys 4 pens and pays with a $20 note. How much change does she get?",
         ["Step 1: The pens cost 4 * 3 = <<4*3=12>>12 dollars.",
          "Step 2: Her change is 20 - 12 = <<20-12=9>>9 dollars.", "Step 3: The answer is: 9"], [1.0, 0.0, 0.0]),
        ("Find the value of $x$ if $2x + 3 = 11$.",
         ["Step 1: Subtract $3$ from both sides: $2x = 8$.", "Step 2: Divide by $2$: $x = 4$. The answer is: 4"],
         [1.0, 1.0]),
    ]
    assert out.dropped == {"mismatched_labels": 1, "malformed_steps": 1}
    assert out.first_bad_rows == {"mismatched_labels": [3], "malformed_steps": [4]}


def test_plain_stepwise_rows_take_bool_and_soft_labels_and_count_bad_ones() -> None:
    rows = [
        {"prompt": "q1", "steps": ["a = 1", "b = 2"], "labels": [True, 0.25]},
        {"prompt": [{"role": "user", "content": "q2"}], "steps": ["one\nline"], "labels": [1]},
        {"prompt": "q3", "steps": ["a", "b"], "labels": [True]},
        {"prompt": "q4", "steps": [], "labels": []},
        {"prompt": "q5", "steps": ["a", "  "], "labels": [True, False]},
        {"prompt": "q6", "steps": ["a"], "labels": [1.5]},
        {"prompt": "q7", "steps": "a", "labels": [True]},
    ]
    out = to_stepwise(rows, "stepwise", system_prompt="Be brief.")
    assert out.rows == [
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q1"}],
         "steps": ["a = 1", "b = 2"], "labels": [1.0, 0.25]},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q2"}],
         "steps": ["one line"], "labels": [1.0]},
    ]
    assert out.dropped == {"mismatched_labels": 1, "no_steps": 1, "empty_step": 1, "bad_label": 1, "wrong_type": 1}


def test_a_prm800k_card_must_say_which_ratings_are_good(tmp_path) -> None:
    card = load_card(REPO / "data_cards" / "prm800k.yaml")
    path = tmp_path / "card.yaml"
    text = (REPO / "data_cards" / "prm800k.yaml").read_text().replace("good_ratings: [0, 1]", "good_ratings: [2]")
    path.write_text(text)
    with pytest.raises(RecipeError, match=r"good_ratings: prm800k cards must say which step ratings count as good"):
        load_card(path)
    path.write_text(text.replace("format: prm800k", "format: stepwise"))
    with pytest.raises(RecipeError, match="good_ratings: only prm800k cards take it"):
        load_card(path)
    assert card.good_ratings == [0, 1]


def test_gsm8k_prompts_carry_their_worked_solution_as_the_reference() -> None:
    out = convert(shipped_card_on_fixture("gsm8k", FIXTURES / "verifiable" / "gsm8k.jsonl"))
    assert [row["prompt"][-1]["content"][:20] for row in out.rows] == ["Lena picks 18 strawb", "A bus holds 40 peopl",
                                                                       "Omar saves $1,250 a "]
    assert [reference_answer(row["reference"]) for row in out.rows] == ["54", "145", "15000"]
    assert out.dropped == {"empty_prompt": 1}
    prompts = [row["prompt"] for row in out.rows]
    answers = ["18 + 36 = 54\n#### 54", "The answer is 145.", "#### 1500"]
    assert outcome(prompts, answers, [row["reference"] for row in out.rows]) == [1.0, 1.0, 0.0]
    assert to_prompts([{"prompt": "q", "reference": 7}]).rows == [{"prompt": [{"role": "user", "content": "q"}],
                                                                   "reference": "7"}]
