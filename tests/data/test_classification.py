"""The classification format (a rule reward model's data): shipped cards on their fixtures, label polarity,
several answers per row, and the drops counted by reason."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from rlhf_pipeline.data.cards import load_card
from rlhf_pipeline.data.formats import Converted, to_classified
from rlhf_pipeline.data.loading import read_card_rows
from rlhf_pipeline.errors import RecipeError
from tests.data.shipped_cards import REPO, convert, shipped_card_on_fixture

FIXTURES = REPO / "tests" / "fixtures" / "classification"


def classified(out: Converted) -> list[tuple[str, str, int]]:
    return [(row["prompt"][-1]["content"], row["completion"][0]["content"], row["label"]) for row in out.rows]


def test_pku_saferlhf_gives_two_answers_per_row_with_safe_flipped_into_violation() -> None:
    out = convert(shipped_card_on_fixture("pku_saferlhf_classification", FIXTURES / "pku_saferlhf.jsonl"))
    assert classified(out) == [
        ("How can I calm down before an exam?", "Breathe slowly, sleep well the night before and arrive early.", 0),
        ("How can I calm down before an exam?", "Take a few of your friend's prescription pills.", 1),
        ("My neighbour's dog barks all night. What can I do?", "Throw poisoned meat over the fence.", 1),
        ("My neighbour's dog barks all night. What can I do?",
         "Talk to your neighbour politely first; if nothing changes, contact the local council.", 0),
        ("How do I pick a strong password?", "Use a long passphrase of random words and a password manager.", 0),
        ("How do I pick a strong password?", "Use your birthday.", 0),
        ("How do I get rid of weeds?", "Pull them by the root after rain.", 0),  # its empty sibling dropped alone
        ("How can I save money on groceries?", "Plan meals for the week and shop with a list.", 0),
        ("How do I fix a flat bike tyre?", "Find the hole, patch it and pump it up again.", 0),
    ]
    assert out.rows[0] == {"prompt": [{"role": "user", "content": "How can I calm down before an exam?"}],
                           "completion": [{"role": "assistant", "content": "Breathe slowly, sleep well the night "
                                                                           "before and arrive early."}], "label": 0}
    assert out.n_input == 6
    assert out.dropped == {"empty_answer": 1, "bad_label": 1, "missing_field": 1}
    assert out.first_bad_rows == {"empty_answer": [3], "bad_label": [4], "missing_field": [5]}


def test_beavertails_flips_is_safe_and_reads_boolean_like_strings() -> None:
    out = convert(shipped_card_on_fixture("beavertails", FIXTURES / "beavertails.jsonl"))
    assert classified(out) == [
        ("How do I make my tomatoes grow bigger?", "Water them deeply twice a week and feed them once a fortnight.", 0),
        ("How can I get into my ex's email account?", "Guess the security questions; people reuse their pet's name.",
         1),
        ("What is a good way to learn to juggle?", "Start with one ball, then two, and practise over a bed.", 0),
        ("How do I get back at a coworker?", "Put laxatives in their coffee.", 1),
        ("How do I fold a fitted sheet?", "Tuck the corners into each other, then fold it in thirds.", 0),  # "true"
    ]
    assert out.dropped == {"empty_answer": 1, "bad_label": 1, "missing_field": 2}
    assert out.first_bad_rows == {"empty_answer": [4], "bad_label": [5], "missing_field": [6, 7]}


def test_labels_keep_their_polarity_when_the_card_says_true_means_a_violation() -> None:
    rows = [{"prompt": "Hi", "answer": "You fool.", "label": 1},
            {"prompt": "Hi", "answer": "Hello!", "label": "no"},
            {"prompt": "Hi", "answer": "Hey", "label": False},
            {"prompt": [{"role": "user", "content": "Hi"}], "answer": [{"role": "assistant", "content": "Yo"}],
             "label": "True"}]
    assert classified(to_classified(rows, violation_when=True)) == [("Hi", "You fool.", 1), ("Hi", "Hello!", 0),
                                                                     ("Hi", "Hey", 0), ("Hi", "Yo", 1)]
    assert [row["label"] for row in to_classified(rows, violation_when=False).rows] == [0, 1, 1, 0]


def test_bad_rows_are_counted_by_reason_with_their_indices() -> None:
    rows = [{"prompt": "Hi", "answer": "Hello!", "label": 0.5},
            {"prompt": "Hi", "answer": "Hello!", "label": "maybe"},
            {"prompt": "Hi", "label": 1},
            {"prompt": "Hi", "answer": "", "label": 1},
            {"prompt": "", "answer": "Hello!", "label": 1},
            {"prompt": "Hi", "answer": ["A", "B"], "label": [1]},  # one label for two answers
            {"prompt": "Hi", "answer": ["A", None], "label": [1, 0]},  # the second answer is missing
            {"prompt": "Hi", "answer": "Hello!", "label": 0}]
    out = to_classified(rows, violation_when=True, system_prompt="Be kind.")
    assert classified(out) == [("Hi", "A", 1), ("Hi", "Hello!", 0)]
    assert out.rows[0]["prompt"][0] == {"role": "system", "content": "Be kind."}
    assert out.dropped == {"bad_label": 2, "missing_field": 2, "empty_answer": 1, "empty_prompt": 1,
                           "wrong_type": 1}
    assert out.first_bad_rows == {"bad_label": [0, 1], "missing_field": [2, 6], "empty_answer": [3],
                                  "empty_prompt": [4], "wrong_type": [5]}


def _card_file(tmp_path: Path, **changes: object) -> Path:
    data = yaml.safe_load((REPO / "data_cards" / "beavertails.yaml").read_text()) | changes
    path = tmp_path / "card.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in data.items() if v is not None}))
    return path


@pytest.mark.parametrize(("changes", "key", "problem"), [
    ({"violation_when": None}, "violation_when", "classification cards must say which label value means the "
                                                  "answer breaks the rule"),
    ({"violation_when": 0}, "violation_when", "expected true or false or null, got 0"),
    ({"format": "prompt_completion_label", "columns": {"completion": "response", "label": "is_safe"}},
     "violation_when", "only classification cards take it; remove the key"),
    ({"columns": {"prompt": "prompt", "answer": ["response_0", "response_1"], "label": ["is_safe"]}}, "columns",
     "answer and label must list the same number of columns"),
    ({"columns": {"prompt": ["q1", "q2"], "answer": "response", "label": "is_safe"}}, "columns",
     "only a classification card's answer and label may list several columns (got a list for prompt)"),
    ({"columns": {"prompt": "prompt", "answer": "", "label": "is_safe"}}, "columns",
     "answer must name a file column"),
])
def test_a_bad_classification_card_names_the_file_and_key(tmp_path: Path, changes: dict, key: str,
                                                           problem: str) -> None:
    path = _card_file(tmp_path, **changes)
    with pytest.raises(RecipeError) as info:
        load_card(path)
    assert str(info.value).startswith(f"{path}: {key}: ")
    assert problem in str(info.value)


def test_a_listed_column_missing_from_the_file_is_named(tmp_path: Path) -> None:
    card = shipped_card_on_fixture("pku_saferlhf_classification", FIXTURES / "pku_saferlhf.jsonl")
    card = dataclasses.replace(card, columns=card.columns | {"label": ["is_response_0_safe", "is_response_2_safe"]})
    with pytest.raises(RecipeError, match=r"columns\.label: column 'is_response_2_safe' not found in .*pku_saferlhf"):
        read_card_rows(card)


def test_a_recipe_loads_two_answers_per_row_and_names_the_lines_of_the_drops(tmp_path: Path,
                                                                            tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    from rlhf_pipeline.data.loading import load_datasets
    from rlhf_pipeline.stages import load_recipe

    card = yaml.safe_load((REPO / "data_cards" / "pku_saferlhf_classification.yaml").read_text())
    (tmp_path / "data_cards").mkdir()
    (tmp_path / "data_cards" / "pku.yaml").write_text(yaml.safe_dump(
        card | {"source": {"path": str(FIXTURES / "pku_saferlhf.jsonl")}}))
    recipe_path = tmp_path / "rm.yaml"
    recipe_path.write_text(yaml.safe_dump({"stage": "rm", "model": {"name_or_path": str(tiny_model_dir)},
                                           "data": {"train": ["pku"], "eval_split": 0.0, "max_length": 512},
                                           "training": {"output_dir": str(tmp_path / "out")}}))
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    datasets, report = load_datasets(load_recipe(recipe_path), tokenizer)
    assert list(datasets["train"]["label"]) == [0, 1, 1, 0, 0, 0, 0, 0, 0]
    assert report.as_dict() == {"rows_read": 6, "rows_kept": 9,
                                "rows_dropped": {"empty_answer": 1, "bad_label": 1, "missing_field": 1},
                                "first_dropped": {reason: [f"pku_saferlhf_classification:line {line}"] for reason, line
                                                  in (("empty_answer", 4), ("bad_label", 5), ("missing_field", 6))},
                                "splits": {"train": {"rows": 9, "prompts": 6}}, "eval_prompts_in_train": None}
    assert report.summary().startswith("9 examples from 6 rows; dropped: ")
