"""The labelled-pair and nested-completion formats, read through the shipped cards against local fixtures."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from rlhf_pipeline.data.cards import load_card
from rlhf_pipeline.data.formats import Converted, to_preference
from rlhf_pipeline.errors import RecipeError
from tests.data.shipped_cards import REPO, convert, shipped_card_on_fixture

FIXTURES = REPO / "tests" / "fixtures" / "preference"


def texts(out: Converted) -> list[tuple[str, str, str]]:
    return [(p["prompt"][-1]["content"], p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in out.rows]


def test_shp_labels_one_prefers_a_and_zero_prefers_b() -> None:
    out = convert(shipped_card_on_fixture("stanfordnlp_shp", FIXTURES / "shp.jsonl"))
    assert texts(out) == [
        ("Why does my bread come out flat?", "Your dough is probably over-proofed; shorten the second rise.",
         "Bread is hard."),
        ("Is it fine to freeze cooked rice?",
         "Yes: cool it quickly, freeze it flat in a bag and reheat until steaming.", "No idea, never tried."),
        ("How do I keep basil fresh?", "Stand it in a glass of water on the counter, like flowers.",
         "Put it in the fridge."),
    ]
    assert out.dropped == {"bad_label": 1, "identical_answers": 1, "empty_answer": 1}
    assert out.first_bad_rows == {"bad_label": [3], "identical_answers": [4], "empty_answer": [5]}


def test_pku_better_response_id_is_the_index_of_the_chosen_answer() -> None:
    out = convert(shipped_card_on_fixture("pku_saferlhf_preference", FIXTURES / "pku_saferlhf.jsonl"))
    assert [(chosen, rejected) for _, chosen, rejected in texts(out)] == [
        ("Breathe slowly, sleep well the night before and arrive early.", "Just don't think about it."),
        ("Talk to your neighbour politely first; if nothing changes, contact the local council.", "Shout at it."),
        ("Use a long passphrase of random words and a password manager.", "Use your birthday."),
    ]
    assert out.rows[0]["prompt"] == [{"role": "user", "content": "How can I calm down before an exam?"}]
    assert out.dropped == {"bad_label": 1, "empty_answer": 1}
    assert out.first_bad_rows == {"bad_label": [3], "empty_answer": [4]}


def test_ultrafeedback_completions_give_every_pair_of_distinct_scores_best_chosen() -> None:
    card = shipped_card_on_fixture("openbmb_ultrafeedback", FIXTURES / "openbmb_ultrafeedback.jsonl")
    out = convert(card)
    assert len(out.rows) == 6 + (6 - 1) + 1  # K(K-1)/2 minus ties; the third row's empty answer spoils two pairs
    haiku = texts(out)[:6]
    assert {prompt for prompt, _, _ in haiku} == {"Write a haiku about autumn leaves."}
    assert haiku[0][1:] == ("Golden leaves let go / and dance down to the wet path / summer says goodbye",
                            "Red leaves drift and fall / the cold wind hums a soft tune / branches wait for snow")
    assert sum(chosen.startswith("Golden") for _, chosen, _ in haiku) == 3  # the best answer beats all three
    assert all({chosen, rejected} != {"Crumb & Co.", "The Rising Loaf"} for _, chosen, rejected in texts(out))
    assert texts(out)[-1] == ("Give one tip for better sleep.", "Keep the same bedtime every day, weekends too.",
                              "Sleep more.")
    assert "margin" not in out.rows[0]
    assert out.dropped == {"tie": 1, "empty_answer": 2, "missing_field": 1}
    assert out.first_bad_rows == {"tie": [1], "empty_answer": [2], "missing_field": [3]}

    margins = [pair["margin"] for pair in convert(dataclasses.replace(card, margin_column="margin")).rows[:6]]
    assert margins == [0.5, 5.0, 7.0, 4.5, 6.5, 2.0]


def test_bad_rows_are_counted_with_their_indices() -> None:
    rows = [{"prompt": "Q", "answer_a": "Good.", "answer_b": "Bad.", "label": True},
            {"prompt": "Q", "answer_a": "Good.", "answer_b": "Bad.", "label": "1"},
            {"prompt": "Q", "answer_a": "Same.", "answer_b": "Same. ", "label": 0},
            {"prompt": "Q", "answer_a": "Good.", "answer_b": "Bad.", "label": 0},
            {"prompt": "Q", "answer_a": "Good.", "label": 1}]
    out = to_preference(rows, "pair_with_label", first_preferred_when=1)
    assert texts(out) == [("Q", "Bad.", "Good.")]
    assert out.dropped == {"bad_label": 2, "identical_answers": 1, "missing_field": 1}
    assert out.first_bad_rows == {"bad_label": [0, 1], "identical_answers": [2], "missing_field": [4]}

    nested = [{"prompt": "Q", "completions": "not a list"},
              {"prompt": "Q", "completions": [{"text": "a", "rating": 2}, {"text": "b", "rating": 1}]}]
    out = to_preference(nested, "nested_completions", answer_key="text", score_key="rating")
    assert texts(out) == [("Q", "a", "b")]
    assert out.dropped == {"wrong_type": 1}


def test_pair_with_label_needs_to_know_which_value_means_a() -> None:
    with pytest.raises(ValueError, match="first_preferred_when"):
        to_preference([], "pair_with_label")


@pytest.mark.parametrize(("value", "problem"), [
    (2, "pair_with_label cards must say which label value means answer_a is preferred: one of 0, 1 (got 2)"),
    (None, "pair_with_label cards must say which label value means answer_a is preferred: one of 0, 1 (got None)"),
    ("A", "expected an integer"),
])
def test_a_card_with_a_bad_first_preferred_when_names_the_file_and_key(tmp_path: Path, value: object,
                                                                       problem: str) -> None:
    data = yaml.safe_load((REPO / "data_cards" / "stanfordnlp_shp.yaml").read_text())
    data["first_preferred_when"] = value
    path = tmp_path / "shp.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(RecipeError) as info:
        load_card(path)
    assert str(info.value).startswith(f"{path}: first_preferred_when: ")
    assert problem in str(info.value)


def test_only_labelled_pair_cards_take_first_preferred_when(tmp_path: Path) -> None:
    data = yaml.safe_load((REPO / "data_cards" / "openbmb_ultrafeedback.yaml").read_text())
    path = tmp_path / "uf.yaml"
    path.write_text(yaml.safe_dump(data | {"first_preferred_when": 0}))
    with pytest.raises(RecipeError, match="first_preferred_when: only pair_with_label cards take it; remove the key"):
        load_card(path)
