"""Token lengths measured in batches and pieces are exactly `apply_chat_template`'s, row by row."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from tokenizers import AddedToken
from transformers import AutoTokenizer

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
    assert meter(ROWS * 5) == plain_lengths(tokenizer, ROWS * 5)
    assert meter.backend is not None  # the pieces were used, and agreed on the first batch
    assert meter(ROWS[::-1]) == plain_lengths(tokenizer, ROWS[::-1])  # with pieces known from the batch before


def test_renderings_are_cut_before_added_tokens_and_pieces_counted_once(tokenizer: Any,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    meter = LengthMeter(tokenizer)
    encoded: list[str] = []
    encode = meter.backend.encode_batch_fast
    monkeypatch.setattr(meter, "backend", type("Counting", (), {"encode_batch_fast": lambda self, pieces, **kw: (
        encoded.extend(pieces), encode(pieces, **kw))[1]})())
    meter(ROWS[:2])
    system = "<|im_start|>system\nYou are a helpful assistant."
    assert system in encoded and encoded.count(system) == 1  # every conversation's, tokenised once
    assert "<|im_start|>user\nHow was the park?" in encoded  # the pair's prompt, once for both answers
    assert {"<|im_start|>assistant\nLovely, the sun was out.", "<|im_start|>assistant\nFine."} <= set(encoded)
    encoded.clear()
    meter(ROWS[:1])
    assert system not in encoded  # known from the batch before


def test_a_tokenizer_whose_added_token_strips_is_never_cut_there(tiny_model_dir: Path) -> None:
    """`lstrip` takes the whitespace before the token: cutting there would count it twice, so it is no cut."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_tokens([AddedToken("<|im_start|>", lstrip=True, special=True, normalized=False)],
                         special_tokens=True)
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in ("a  <|im_start|>", "a<|im_start|>")]
    assert ids[0] == ids[1]  # the spaces before it are taken into the token
    meter = LengthMeter(tokenizer)
    assert meter.pieces.split("x<|im_start|>y<|im_end|>z") == ["x<|im_start|>y", "<|im_end|>z"]  # not cut there
    assert meter(ROWS) == plain_lengths(tokenizer, ROWS)


def test_a_meter_that_disagrees_measures_the_plain_way(tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    meter = LengthMeter(tokenizer)
    monkeypatch.setattr(LengthMeter, "_fast", lambda self, rows: [1] * len(rows))
    assert meter(ROWS) == plain_lengths(tokenizer, ROWS)
    assert meter.backend is None  # and for every later batch too
    assert meter(ROWS[:2]) == plain_lengths(tokenizer, ROWS[:2])
