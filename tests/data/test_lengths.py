"""Token lengths measured in batches and pieces are exactly `apply_chat_template`'s, row by row."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from tokenizers import AddedToken
from transformers import AutoTokenizer

from rlhf_pipeline.data import lengths
from rlhf_pipeline.data.lengths import LengthMeter, plain_lengths


def chat(*turns: str) -> list[dict[str, str]]:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": text} for i, text in enumerate(turns)]


def answer(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


ROWS: list[dict[str, Any]] = [
    {"prompt": chat("How was the park?"), "chosen": answer("Lovely, the sun was out."), "rejected": answer("Fine.")},
    {"prompt": chat("Hi", "Hello!", "Tell me more about the train to the city."),
     "chosen": answer("It leaves at nine o'clock."), "rejected": answer("It leaves at nine o'clock!")},
    {"prompt": [{"role": "system", "content": "Be brief."}, *chat("What is tea?")],
     "chosen": answer("A drink."), "rejected": answer("A drink made from leaves.\n\nHot or cold.")},
    # special tokens and their look-alikes inside the text, and answers that share a beginning
    {"prompt": chat("Say <|im_start|> and <|im_end|> for me."), "chosen": answer("<|im_start|>assistant\nok"),
     "rejected": answer("<|im_start|>assistant\nno")},
    {"prompt": chat("  spaces   around  "), "chosen": answer("  yes  "), "rejected": answer("\n\n")},
    {"prompt": chat("An answer and no pair."), "completion": answer("Just the one.")},
    {"prompt": chat("A prompt alone, to be answered.")},
    {"prompt": chat("Labelled."), "completion": answer("Good."), "label": True},
]


def test_the_meter_counts_what_apply_chat_template_counts(tokenizer: Any) -> None:
    meter = LengthMeter(tokenizer)
    assert meter.cuts and "<|im_start|>" in meter.cuts
    assert meter(ROWS * 5) == plain_lengths(tokenizer, ROWS * 5)
    assert meter.backend is not None  # the pieces were used, and agreed on the first batch


def test_pairs_are_cut_before_the_answer_only(tokenizer: Any) -> None:
    meter = LengthMeter(tokenizer)
    texts = meter._rendered(ROWS[:1])[0]
    cut = meter._cut(texts)
    assert texts[0][:cut] == texts[1][:cut] and texts[0][cut:].startswith("<|im_start|>assistant")


def test_a_tokenizer_whose_added_token_strips_is_never_cut_there(tiny_model_dir: Path) -> None:
    """`lstrip` takes the whitespace before the token: cutting there would count it twice, so it is no cut."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_tokens([AddedToken("<|im_start|>", lstrip=True, special=True, normalized=False)],
                         special_tokens=True)
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in ("a  <|im_start|>", "a<|im_start|>")]
    assert ids[0] == ids[1]  # the spaces before it are taken into the token
    meter = LengthMeter(tokenizer)
    assert "<|im_start|>" not in meter.cuts
    assert meter(ROWS) == plain_lengths(tokenizer, ROWS)


def test_a_meter_that_disagrees_measures_the_plain_way(tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    meter = LengthMeter(tokenizer)
    monkeypatch.setattr(LengthMeter, "_fast", lambda self, rows: [1] * len(rows))
    assert meter(ROWS) == plain_lengths(tokenizer, ROWS)
    assert meter.backend is None  # and for every later batch too
    assert meter(ROWS[:2]) == plain_lengths(tokenizer, ROWS[:2])


def test_common_prefix() -> None:
    assert lengths._common_prefix(["abcdef", "abcxyz", "abcd"]) == 3
    assert lengths._common_prefix(["same", "same"]) == 4
    assert lengths._common_prefix(["x", "y"]) == 0
