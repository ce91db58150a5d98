"""`data.streaming` (SFT): the stream gives the rows the cached path gives, counts what it read with the same
named drops, holds eval prompts out, and what it cannot do honestly is refused before anything loads."""

from __future__ import annotations

import collections
import json
import re
from pathlib import Path
from typing import Any

import pytest

from rlhf_pipeline.data.loading import load_datasets
from rlhf_pipeline.errors import PipelineError, RecipeError
from rlhf_pipeline.stages import load_recipe
from tests.data.test_loading import BAD, GOOD, _data_file
from tests.stages.conftest import RecipeFactory, sft_rows, write_card

STREAM = {"streaming": True, "eval_split": 0.0, "max_length": 128, "shuffle_buffer": 4}


def streamed(make_recipe: RecipeFactory, name: str = "sft", **data: Any) -> Any:
    return load_recipe(make_recipe("sft", ["messy"], {"max_steps": 2}, name=name,
                                   data={"train": ["messy"]} | STREAM | data))


def key(row: dict[str, Any]) -> str:
    return json.dumps(row, sort_keys=True)


@pytest.fixture
def messy(tmp_path: Path) -> None:
    write_card(tmp_path, "messy", [], "messages", ["sft"])
    _data_file(tmp_path, GOOD, BAD)


@pytest.mark.usefixtures("messy")
def test_a_stream_gives_the_rows_and_named_drops_of_the_cached_path(make_recipe: RecipeFactory,
                                                                    tokenizer: Any) -> None:
    cached, cached_report = load_datasets(load_recipe(make_recipe(
        "sft", ["messy"], name="cached", data={"train": ["messy"], "eval_split": 0.0, "max_length": 128})), tokenizer)
    datasets, report = load_datasets(streamed(make_recipe), tokenizer)
    assert report.summary().startswith("streaming messy (counted as training reads them): 0 of 0 rows kept")
    rows = list(datasets["train"])
    assert sorted(map(key, rows)) == sorted(map(key, cached["train"]))
    assert [key(row) for row in rows] != [key(row) for row in cached["train"]]  # shuffled through the buffer
    assert report.as_dict() == cached_report.as_dict()  # the same counts and lines, once the stream was read

    again = list(datasets["train"])  # a second epoch starts the stream again: nothing counted twice
    assert len(again) == 20 and report.as_dict() == cached_report.as_dict()


@pytest.mark.usefixtures("messy")
def test_the_report_counts_what_was_read_so_far(make_recipe: RecipeFactory, tokenizer: Any) -> None:
    datasets, report = load_datasets(streamed(make_recipe, shuffle_buffer=1), tokenizer)
    stream = iter(datasets["train"])
    next(stream)  # the first batch of raw rows is read to give one row
    assert 0 < report.as_dict()["rows_kept"] <= report.as_dict()["rows_read"]
    list(stream)
    assert report.as_dict()["rows_read"] == 29


def test_eval_prompts_are_held_out_of_the_stream(tmp_path: Path, make_recipe: RecipeFactory, tokenizer: Any) -> None:
    rows = sft_rows(48)  # 12 topics: every prompt four times
    write_card(tmp_path, "messy", rows, "messages", ["sft"])
    write_card(tmp_path, "held", rows[:3], "messages", ["sft"])  # three of the twelve prompts
    datasets, report = load_datasets(streamed(make_recipe, eval=["held"], eval_overlap="drop"), tokenizer)
    train = list(datasets["train"])
    held_out = {key(row["prompt"]) for row in datasets["eval"]}
    assert len(train) == 36 and not {key(row["prompt"]) for row in train} & held_out
    record = report.as_dict()
    assert record["rows_dropped"] == {"eval_prompt": 12} and record["eval_prompts_in_train"] == 3
    assert record["splits"] == {"train": {"rows": 36, "prompts": 9}, "eval": {"rows": 3, "prompts": 3}}

    datasets, report = load_datasets(streamed(make_recipe, name="warn", eval=["held"]), tokenizer)
    assert len(list(datasets["train"])) == 48 and report.as_dict()["eval_prompts_in_train"] == 3


def test_weighted_cards_interleave(tmp_path: Path, make_recipe: RecipeFactory, tokenizer: Any) -> None:
    write_card(tmp_path, "messy", sft_rows(60), "messages", ["sft"])
    write_card(tmp_path, "few", [{"messages": [{"role": "user", "content": f"Few {i}?"},
                                               {"role": "assistant", "content": "Yes."}]} for i in range(20)],
               "messages", ["sft"])
    recipe = streamed(make_recipe, train=[{"card": "messy", "weight": 3}, {"card": "few", "weight": 1}])
    datasets, report = load_datasets(recipe, tokenizer)
    first = [row["prompt"][-1]["content"] for row in datasets["train"]]
    assert first == [row["prompt"][-1]["content"] for row in load_datasets(recipe, tokenizer)[0]["train"]]
    counts = collections.Counter("few" if text.startswith("Few") else "messy" for text in first)
    assert counts["few"] == 20 and 40 <= counts["messy"] <= 60  # "few" runs out first, at about 3 rows to 1
    assert [source["card"] for source in report.as_dict()["sources"]] == ["messy", "few"]


def test_mostly_bad_rows_stop_the_stream(tmp_path: Path, make_recipe: RecipeFactory, tokenizer: Any) -> None:
    write_card(tmp_path, "messy", [], "messages", ["sft"])
    _data_file(tmp_path, GOOD[:2], {number: (b"{oops", "malformed_json") for number in range(1, 9)})
    datasets, _ = load_datasets(streamed(make_recipe), tokenizer)
    with pytest.raises(PipelineError, match=r"card messy streamed 10 rows and kept only 2 \(malformed_json 8\), "
                                            r"below data\.min_valid_fraction=0\.5"):
        list(datasets["train"])


@pytest.mark.parametrize(("stage", "data", "training", "key", "words"), [
    ("rm", {}, {"max_steps": 2}, "data.streaming", "the rm stage needs its whole dataset before training"),
    ("sft", {}, {}, "training.max_steps", "set max_steps"),
    ("sft", {"eval_split": 0.1}, {"max_steps": 2}, "data.eval_split", "give eval cards (data.eval) or set "
                                                                      "eval_split: 0"),
    ("sft", {"max_samples": 10}, {"max_steps": 2}, "data.max_samples", "cannot take whole prompts from a stream"),
    ("sft", {"train": [{"card": "messy", "max_rows": 10}]}, {"max_steps": 2}, "data.train[0].max_rows",
     "use weights"),
    ("sft", {"eval": ["messy"], "eval_overlap": "error"}, {"max_steps": 2}, "data.eval_overlap", "use drop"),
    ("sft", {}, {"max_steps": 2, "dataloader_num_workers": 2}, "training.dataloader_num_workers", "0 workers"),
])
@pytest.mark.usefixtures("messy")
def test_what_a_stream_cannot_do_is_refused(stage: str, data: dict[str, Any], training: dict[str, Any], key: str,
                                            words: str, make_recipe: RecipeFactory) -> None:
    with pytest.raises(RecipeError, match=re.escape(f"{key}: ")) as info:
        load_recipe(make_recipe(stage, ["messy"], training, data={"train": ["messy"]} | STREAM | data))
    assert words in str(info.value)


def test_a_missing_column_fails_before_training(tmp_path: Path, make_recipe: RecipeFactory, tokenizer: Any) -> None:
    write_card(tmp_path, "messy", [{"conversation": []}] * 3, "messages", ["sft"])
    with pytest.raises(RecipeError, match=r"columns\.messages: column 'messages' not found in .*messy\.jsonl; "
                                          r"its columns are: conversation"):
        load_datasets(streamed(make_recipe), tokenizer)
