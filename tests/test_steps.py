"""Where steps end: on the token holding the line break after a step, or the answer's last token, checked on ids."""

from __future__ import annotations

from pathlib import Path

from rlhf_pipeline.chat import encode_answer
from rlhf_pipeline.steps import join_steps, split_steps, step_end_positions, step_ends


def test_split_and_join_keep_one_step_per_line() -> None:
    assert split_steps("a = 1\n\n  b = 2 \n") == ["a = 1", "b = 2"]
    assert join_steps(["a = 1", "two\nlines", " c "]) == "a = 1\ntwo lines\nc"
    assert split_steps(join_steps(["x", "y z"])) == ["x", "y z"]


def test_step_ends_on_token_texts() -> None:
    assert step_ends(["2", "3", " +", " 4", "\n", "The", " end", "."]) == [4, 7]
    assert step_ends(["a", "\n\n", "\n", "b", "\n"]) == [1, 4]  # blank lines end nothing
    assert step_ends([".\nThe", " end"]) == [0, 1]  # a break inside a token, text after it
    assert step_ends(["\n", "a"]) == [1]
    assert step_ends([]) == [] and step_ends(["\n", " "]) == []


def test_step_end_positions_on_the_ids_a_policy_emits(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = encode_answer(tokenizer, "12 + 30 = 42\n42 - 2 = 40\nThe answer is 40.")
    ends = step_end_positions(tokenizer, ids)
    assert len(ends) == 3
    assert [tokenizer.decode([ids[i]]) for i in ends[:2]] == ["\n", "\n"]
    assert ends[2] == len(ids) - 1 and ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    unfinished = ids[:-1]  # cut before its end-of-turn token: the last step ends on its last word
    assert step_end_positions(tokenizer, unfinished) == [*ends[:2], len(unfinished) - 1]
