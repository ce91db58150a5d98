"""The format converters: canonical prompt/answer splits, ranking expansion, and counted drops."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from rlhf_pipeline.data.formats import (
    CANONICAL_COLUMNS,
    FORMATS,
    PREFERENCE_FORMATS,
    SFT_FORMATS,
    Converted,
    parse_hh_transcript,
    to_labelled,
    to_preference,
    to_prompts,
    to_sft,
    unpair,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "preference"


def read_jsonl(name: str) -> list[dict]:
    with open(FIXTURES / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def answers(pair: dict) -> tuple[str, str]:
    return pair["chosen"][0]["content"], pair["rejected"][0]["content"]


# --------------------------------------------------------------------------- SFT


def test_messages_split_at_last_assistant_turn() -> None:
    conversation = [
        {"role": "system", "content": "Be brief."},
        user("Name a fruit."),
        assistant("Apple."),
        user("Another one?"),
        assistant("Pear."),
    ]
    out = to_sft([{"messages": conversation}], "messages")
    assert out.rows == [{"prompt": conversation[:4], "completion": [assistant("Pear.")]}]
    assert not out.dropped


def test_messages_cut_turns_after_the_last_answer() -> None:
    out = to_sft([{"messages": [user("Hi"), assistant("Hello!"), user("Bye")]}], "messages")
    assert out.rows == [{"prompt": [user("Hi")], "completion": [assistant("Hello!")]}]


def test_sharegpt_spelling_is_normalised() -> None:
    row = {"messages": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}
    assert to_sft([row], "messages").rows == [{"prompt": [user("Hi")], "completion": [assistant("Hello!")]}]


def test_prompt_completion_strings_and_lists() -> None:
    rows = [
        {"prompt": "Describe a rainy Monday.", "completion": "Grey, wet and slow."},
        {"prompt": [user("Hi")], "completion": [assistant("Hello there.")]},
    ]
    out = to_sft(rows, "prompt_completion")
    assert out.rows == [
        {"prompt": [user("Describe a rainy Monday.")], "completion": [assistant("Grey, wet and slow.")]},
        {"prompt": [user("Hi")], "completion": [assistant("Hello there.")]},
    ]


def test_system_prompt_is_added_unless_the_row_has_one() -> None:
    rows = [
        {"prompt": "Hi", "completion": "Hello."},
        {"prompt": [{"role": "system", "content": "Own."}, user("Hi")], "completion": "Hello."},
    ]
    out = to_sft(rows, "prompt_completion", system_prompt="Be warm.")
    assert out.rows[0]["prompt"] == [{"role": "system", "content": "Be warm."}, user("Hi")]
    assert out.rows[1]["prompt"][0]["content"] == "Own."


def test_sft_bad_rows_are_counted_by_reason_with_indices() -> None:
    rows = [
        {"messages": [user("Hi"), assistant("Hello.")]},  # 0 good
        {"messages": [user("Hi"), assistant("   ")]},  # 1 empty answer
        {"messages": [user("Hi"), user("Anyone?")]},  # 2 no assistant turn
        {"messages": [user("Hi"), {"role": "assistant", "content": None}]},  # 3 wrong type
        {"conversation": []},  # 4 column not mapped
        "not a row",  # 5 wrong type
        {"messages": [assistant("Unprompted.")]},  # 6 nothing to answer
        {"messages": [user("Hi"), assistant("")]},  # 7 empty answer
    ]
    out = to_sft(rows, "messages")
    assert len(out.rows) == 1
    assert out.n_input == 8
    assert out.dropped == {
        "empty_answer": 2, "no_assistant_turn": 1, "wrong_type": 2, "missing_field": 1, "empty_prompt": 1,
    }
    assert out.first_bad_rows == {
        "empty_answer": [1, 7], "no_assistant_turn": [2], "wrong_type": [3, 5], "missing_field": [4],
        "empty_prompt": [6],
    }
    assert out.n_dropped == 7


def test_first_bad_rows_keeps_only_the_first_five() -> None:
    out = to_sft([{"messages": [user("Hi"), assistant("")]}] * 9, "messages")
    assert out.dropped["empty_answer"] == 9
    assert out.first_bad_rows["empty_answer"] == [0, 1, 2, 3, 4]


def test_unknown_format_fails_at_once_naming_the_choices() -> None:
    with pytest.raises(ValueError, match="prompt_completion"):
        to_sft([], "chosen_rejected")
    with pytest.raises(ValueError, match="hh_transcript"):
        to_preference([], "messages")


# --------------------------------------------------------------------------- preference formats


def check_prompt_chosen_rejected(out: Converted) -> None:
    assert len(out.rows) == 5
    first = out.rows[0]
    assert first["prompt"] == [user("Describe a rainy Monday.")]
    assert answers(first) == (
        "Rain on the windows, a warm mug in hand, and a slow, cozy start to the week.",
        "Wet streets, late buses and a grey sky from morning to night.",
    )
    assert set(first) == {"prompt", "chosen", "rejected"}


def test_prompt_chosen_rejected_strings() -> None:
    out = to_preference(read_jsonl("prompt_chosen_rejected.jsonl"), "prompt_chosen_rejected")
    check_prompt_chosen_rejected(out)
    assert out.dropped == {"empty_answer": 1, "identical_answers": 1}
    assert out.first_bad_rows == {"empty_answer": [4], "identical_answers": [5]}


def test_csv_and_parquet_variants_hold_the_same_rows() -> None:
    with open(FIXTURES / "prompt_chosen_rejected.csv", newline="", encoding="utf-8") as f:
        csv_rows = list(csv.DictReader(f))
    assert csv_rows == read_jsonl("prompt_chosen_rejected.jsonl")
    check_prompt_chosen_rejected(to_preference(csv_rows, "prompt_chosen_rejected"))
    parquet = pytest.importorskip("pyarrow.parquet")
    parquet_rows = parquet.read_table(FIXTURES / "prompt_chosen_rejected.parquet").to_pylist()
    assert parquet_rows == csv_rows


def test_prompt_chosen_rejected_as_message_lists() -> None:
    chosen, rejected = [assistant("Hello, lovely to see you!")], [assistant("Hi.")]
    row = {"prompt": [user("Hi")], "chosen": chosen, "rejected": rejected}
    out = to_preference([row], "prompt_chosen_rejected")
    assert out.rows == [{"prompt": [user("Hi")], "chosen": chosen, "rejected": rejected}]


def test_ultrafeedback_messages_share_their_history_as_prompt() -> None:
    out = to_preference(read_jsonl("ultrafeedback_messages.jsonl"), "chosen_rejected_messages")
    assert len(out.rows) == 4
    # the user turn sits in both the `prompt` string and the message lists: it must appear once
    assert out.rows[0]["prompt"] == [user("Suggest a name for a grey kitten.")]
    assert answers(out.rows[0])[1] == "Cat."
    multi_turn = out.rows[2]
    assert [m["role"] for m in multi_turn["prompt"]] == ["user", "assistant", "user"]
    assert multi_turn["prompt"][-1] == user("And what should I eat afterwards?")
    assert answers(multi_turn)[1] == "Nothing, probably."
    assert out.dropped == {"mismatched_history": 1}
    assert out.first_bad_rows == {"mismatched_history": [4]}


def test_message_list_format_rejects_plain_strings() -> None:
    out = to_preference([{"prompt": "Hi", "chosen": "Hello!", "rejected": "Hi."}], "chosen_rejected_messages")
    assert out.dropped == {"wrong_type": 1}


def test_trl_style_rows_take_the_prompt_column() -> None:
    row = {"prompt": [user("Hi")], "chosen": [assistant("Hello!")], "rejected": [assistant("What.")]}
    out = to_preference([row], "chosen_rejected_messages")
    assert out.rows[0]["prompt"] == [user("Hi")]


def test_hh_transcripts_split_at_the_last_assistant_turn() -> None:
    out = to_preference(read_jsonl("hh_transcripts.jsonl"), "hh_transcript")
    assert len(out.rows) == 4
    single, multi = out.rows[0], out.rows[1]
    assert single["prompt"] == [user("What's a nice thing to do on a rainy afternoon?")]
    assert answers(single) == (
        "Bake some cookies, put on a film, or read by the window.",
        "Wait for it to stop.",
    )
    assert multi["prompt"] == [
        user("I want to learn to juggle."),
        assistant("Great! Start with two balls."),
        user("Two is easy now. What next?"),
    ]
    assert answers(multi) == (
        "Add a third ball and practise a steady rhythm over a bed.",
        "Keep dropping things, I guess.",
    )
    paragraphs = "Ticket to Ride is easy to learn and fun with family.\n\nIt takes about an hour."
    assert answers(out.rows[3])[0] == paragraphs
    assert out.dropped == {"malformed_transcript": 1, "mismatched_history": 1}
    assert out.first_bad_rows == {"malformed_transcript": [3], "mismatched_history": [4]}


def test_hh_prompt_column_is_the_shared_beginning() -> None:
    row = {"prompt": "\n\nHuman: Hi\n\nAssistant:", "chosen": " Hello, friend!", "rejected": " Go away."}
    out = to_preference([row], "hh_transcript")
    assert out.rows[0]["prompt"] == [user("Hi")]
    assert answers(out.rows[0]) == ("Hello, friend!", "Go away.")


def test_hh_parser_edge_cases() -> None:
    assert parse_hh_transcript("Human: a\n\nAssistant: b") == [user("a"), assistant("b")]
    out = to_preference(
        [{"chosen": "\n\nHuman: only a question", "rejected": "\n\nHuman: only a question"}], "hh_transcript"
    )
    assert out.dropped == {"no_assistant_turn": 1}


def test_ranking_of_four_gives_six_ordered_pairs() -> None:
    row = read_jsonl("ranking.jsonl")[0]
    out = to_preference([row], "ranking")
    ranked = row["ranked"]
    assert len(out.rows) == 6
    assert [answers(pair) for pair in out.rows] == [
        (ranked[i], ranked[j]) for i in range(4) for j in range(i + 1, 4)
    ]
    assert all(pair["prompt"] == [user(row["prompt"])] for pair in out.rows)
    assert "margin" not in out.rows[0]


def test_ranking_by_scores_orders_pairs_and_gives_margins() -> None:
    row = read_jsonl("ranking.jsonl")[1]
    out = to_preference([row], "ranking", margin_key="scores")
    score = dict(zip(row["answers"], row["scores"], strict=True))
    assert len(out.rows) == 6
    for pair in out.rows:
        chosen, rejected = answers(pair)
        assert score[chosen] > score[rejected]
        assert pair["margin"] == score[chosen] - score[rejected]
    assert answers(out.rows[0]) == ("Call a friend, stretch, and enjoy a proper meal.",
                                    "Take a short walk outside and eat away from your desk.")


def test_ranking_ties_give_no_pair_and_are_counted() -> None:
    out = to_preference(read_jsonl("ranking.jsonl"), "ranking")
    assert len(out.rows) == 6 + 6 + 5
    assert out.dropped == {"tie": 1}
    assert out.first_bad_rows == {"tie": [2]}
    tied = {"Joyful", "Cheerful"}
    assert all({*answers(pair)} != tied for pair in out.rows)


def test_ranking_bad_rows() -> None:
    rows = [
        {"prompt": "Q", "ranked": ["only one"]},
        {"prompt": "Q", "answers": ["a", "b"], "scores": [1.0]},
        {"prompt": "Q", "answers": ["a", "b"], "scores": ["high", "low"]},
        {"prompt": "Q", "ranked": ["good", "", "bad"]},
    ]
    out = to_preference(rows, "ranking")
    assert [answers(pair) for pair in out.rows] == [("good", "bad")]
    assert out.dropped == {"too_few_answers": 1, "malformed_ranking": 1, "wrong_type": 1, "empty_answer": 2}
    assert out.first_bad_rows["empty_answer"] == [3]


def test_a_non_finite_score_drops_its_row_by_name() -> None:
    """Scores (3, NaN, 8) once gave "A(3) > C(8)" with margin -5 and two NaN margins: the row orders nothing."""
    rows = [{"prompt": "Q", "answers": ["A", "B", "C"], "scores": [3, float("nan"), 8]},
            {"prompt": "Q", "answers": ["A", "B"], "scores": [float("inf"), 1]},
            {"prompt": "Q", "answers": ["A", "B", "C"], "scores": [3, 5, 8]}]
    out = to_preference(rows, "ranking", margin_key="scores")
    assert [(*answers(pair), pair["margin"]) for pair in out.rows] == [("C", "B", 3.0), ("C", "A", 5.0),
                                                                      ("B", "A", 2.0)]
    assert out.dropped == {"non_finite_score": 2} and out.first_bad_rows == {"non_finite_score": [0, 1]}
    margins = [{"prompt": "Q", "chosen": "a", "rejected": "b", "margin": float("nan")}]
    assert to_preference(margins, "prompt_chosen_rejected", margin_key="margin").dropped == {"non_finite_score": 1}


def test_margin_column() -> None:
    out = to_preference(read_jsonl("with_margin.jsonl"), "prompt_chosen_rejected", margin_key="margin")
    assert [pair["margin"] for pair in out.rows] == [2.5, 1.0, 3.0]
    assert all(isinstance(pair["margin"], float) for pair in out.rows)
    assert out.dropped == {"wrong_type": 1}
    assert out.first_bad_rows == {"wrong_type": [3]}


def test_margin_is_left_out_unless_asked_for() -> None:
    out = to_preference(read_jsonl("with_margin.jsonl"), "prompt_chosen_rejected")
    assert len(out.rows) == 4 and all("margin" not in pair for pair in out.rows)


# --------------------------------------------------------------------------- labelled answers (KTO)


def test_labelled_answers_accept_the_usual_label_spellings_and_count_the_rest() -> None:
    rows = [{"prompt": "Hi", "completion": "Hello!", "label": True},
            {"prompt": "Hi", "completion": "Go away.", "label": 0},
            {"prompt": "Hi", "completion": "Hey there", "label": "Desirable"},
            {"prompt": "Hi", "completion": "Meh", "label": "no"},
            {"prompt": "Hi", "completion": "Eh", "label": 0.5},
            {"prompt": "Hi", "completion": "Eh", "label": "maybe"},
            {"prompt": "Hi", "completion": "Eh"},
            {"prompt": "Hi", "completion": "  ", "label": True}]
    out = to_labelled(rows)
    assert [(row["completion"][0]["content"], row["label"]) for row in out.rows] == [
        ("Hello!", True), ("Go away.", False), ("Hey there", True), ("Meh", False)]
    assert out.rows[0]["prompt"] == [user("Hi")]
    assert out.dropped == {"bad_label": 2, "missing_field": 1, "empty_answer": 1}
    assert out.first_bad_rows["bad_label"] == [4, 5]


def test_a_pair_unpairs_into_a_desirable_and_an_undesirable_answer() -> None:
    row = {"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}
    pair = to_preference([row], "prompt_chosen_rejected").rows[0]
    assert unpair([pair]) == ([(0, {"prompt": [user("Hi")], "completion": [assistant("Hello!")], "label": True}),
                               (0, {"prompt": [user("Hi")], "completion": [assistant("Go away.")], "label": False})],
                              [])


def test_best_worst_pairs_unpair_as_each_pair_on_its_own() -> None:
    """One pair per prompt: every answer once, in pair order, chosen desirable and rejected undesirable."""
    rows = [{"prompt": f"Q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(3)]
    labelled, ambiguous = unpair(to_preference(rows, "prompt_chosen_rejected").rows)
    assert [(index, row["prompt"][0]["content"], row["completion"][0]["content"], row["label"])
            for index, row in labelled] == [(0, "Q0", "good 0", True), (0, "Q0", "bad 0", False),
                                            (1, "Q1", "good 1", True), (1, "Q1", "bad 1", False),
                                            (2, "Q2", "good 2", True), (2, "Q2", "bad 2", False)]
    assert ambiguous == []


def test_ranked_pairs_unpair_into_each_answer_once_with_one_label() -> None:
    """Scores A .9, B .5, C -.1, D -.8 with min_gap .5 give the pairs A>C, A>D, B>C, B>D, C>D (as the label stage
    writes them): C is chosen once and rejected twice, so it has no consistent label and is dropped; A and B are
    desirable, D undesirable, each once although they stand in two or three pairs."""
    pairs = [("A", "C"), ("A", "D"), ("B", "C"), ("B", "D"), ("C", "D")]
    rows = [{"prompt": "Q", "chosen": chosen, "rejected": rejected} for chosen, rejected in pairs]
    rows.append({"prompt": "Other", "chosen": "C", "rejected": "A"})  # the same texts under another prompt
    labelled, ambiguous = unpair(to_preference(rows, "prompt_chosen_rejected").rows)
    assert [(row["prompt"][0]["content"], row["completion"][0]["content"], row["label"]) for _, row in labelled] == [
        ("Q", "A", True), ("Q", "D", False), ("Q", "B", True), ("Other", "C", True), ("Other", "A", False)]
    assert [index for index, _ in labelled] == [0, 1, 2, 5, 5]
    assert ambiguous == [0]  # C, first seen in pair 0


# --------------------------------------------------------------------------- prompt sets and registry


def test_prompts() -> None:
    rows = [{"prompt": "Describe a rainy Monday."}, {"prompt": ""}, {"prompt": [user("Hi"), assistant("Yo")]}]
    out = to_prompts(rows, system_prompt="Be warm.")
    system = {"role": "system", "content": "Be warm."}
    assert out.rows == [{"prompt": [system, user("Describe a rainy Monday.")]}]
    assert out.dropped == {"empty_prompt": 1, "ends_with_answer": 1}


def test_every_format_has_its_columns_listed() -> None:
    assert set(CANONICAL_COLUMNS) == FORMATS
    assert not SFT_FORMATS & PREFERENCE_FORMATS


def test_module_imports_no_heavy_libraries() -> None:
    source = (Path(__file__).resolve().parents[2] / "rlhf_pipeline" / "data" / "formats.py").read_text()
    assert "import torch" not in source and "import datasets" not in source


# --------------------------------------------------------------------------- the shipped demo data

DEMO = Path(__file__).resolve().parents[2] / "data" / "demo"


def read_demo(name: str) -> list[dict]:
    with open(DEMO / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_demo_files_convert_without_drops_and_eval_is_held_out() -> None:
    sft = to_sft(read_demo("sft_demonstrations.jsonl"), "messages")
    prefs = to_preference(read_demo("preferences_warm.jsonl"), "prompt_chosen_rejected")
    ppo = to_prompts(read_demo("ppo_prompts.jsonl"))
    evals = to_prompts(read_demo("eval_prompts.jsonl"))
    assert not (sft.dropped or prefs.dropped or ppo.dropped or evals.dropped)

    def prompts(out: Converted) -> set[str]:
        return {row["prompt"][-1]["content"] for row in out.rows}

    assert len(prompts(sft)) == len(sft.rows) and len(prompts(evals)) == len(evals.rows)
    assert not prompts(evals) & (prompts(sft) | prompts(ppo) | prompts(prefs))
    assert not prompts(sft) & prompts(ppo)
    assert max(len(row["completion"][0]["content"].split()) for row in sft.rows) <= 40


def test_demo_preferences_agree_with_vader() -> None:
    vader = pytest.importorskip("vaderSentiment.vaderSentiment").SentimentIntensityAnalyzer()
    pairs = read_demo("preferences_warm.jsonl")
    agree = sum(
        vader.polarity_scores(p["chosen"])["compound"] > vader.polarity_scores(p["rejected"])["compound"]
        for p in pairs
    )
    assert agree >= 0.95 * len(pairs)
