"""Bad data files: every unusable row is counted by reason and named by its line; too much of it stops the run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from transformers import AutoTokenizer

from rlhf_pipeline.data.loading import load_datasets
from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.recipe import Recipe
from rlhf_pipeline.stages import load_recipe
from tests.stages.conftest import write_card


def chat(question: str, answer: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


GOOD = [json.dumps(chat(f"Tell me about day {i}.", "It was a lovely day.")).encode() for i in range(20)]
# line number (1-based) -> (raw bytes of that line, the reason it must be dropped for)
BAD: dict[int, tuple[bytes, str]] = {
    3: (b'{"messages": [{"role": "user", "content": "hi"}', "malformed_json"),
    6: (b'{"messages": "caf\xe9 \xff"}', "not_utf8"),
    9: (b'[1, 2, 3]', "not_an_object"),
    12: (json.dumps({"messages": "just a string"}).encode(), "wrong_type"),
    14: (json.dumps(chat("What is two plus two?", 4)).encode(), "wrong_type"),
    17: (json.dumps(chat("Say something.", "   ")).encode(), "empty_answer"),
    19: (json.dumps(chat("Write a lot.", "word " * 20_000)).encode(), "too_long"),
    22: (json.dumps(chat("Write a bit more.", "The sun rises in the morning. " * 40)).encode(), "too_long"),
    24: (json.dumps({"messages": [{"role": "user", "content": "No answer here."}]}).encode(), "no_assistant_turn"),
}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _data_file(folder: Path, good: list[bytes], bad: dict[int, tuple[bytes, str]], blank: int | None = None) -> None:
    """Write data/messy.jsonl: bad lines at their line numbers, good lines everywhere else."""
    lines, good_left = [], list(good)
    for number in range(1, len(good) + len(bad) + (blank is not None) + 1):
        if number in bad:
            lines.append(bad[number][0])
        elif number == blank:
            lines.append(b"   ")
        else:
            lines.append(good_left.pop(0))
    assert not good_left
    (folder / "data" / "messy.jsonl").write_bytes(b"\n".join(lines) + b"\n")


def _recipe(folder: Path, model_dir: Path, fmt: str = "messages", stage: str = "sft", **data: Any) -> Recipe:
    """A recipe reading data/messy.jsonl through its card; the data file itself is left alone."""
    data_file = folder / "data" / "messy.jsonl"
    existing = data_file.read_bytes() if data_file.is_file() else b""
    write_card(folder, "messy", [], fmt, [stage])
    data_file.write_bytes(existing)
    recipe = {"stage": stage, "model": {"name_or_path": str(model_dir)},
              "data": {"train": ["messy"], "eval_split": 0.0, "max_length": 128} | data,
              "training": {"output_dir": str(folder / "out")}}
    if stage == "ppo":
        recipe["training"]["reward_model_path"] = str(folder / "rm")
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return load_recipe(path)


def test_bad_rows_are_counted_by_reason_with_line_numbers(tmp_path: Path, tiny_model_dir: Path, tokenizer: Any) -> None:
    recipe = _recipe(tmp_path, tiny_model_dir)
    _data_file(tmp_path, GOOD, BAD, blank=27)
    datasets, report = load_datasets(recipe, tokenizer)

    assert len(datasets["train"]) == 20 and report.kept == 20
    assert report.read == 20 + len(BAD)  # the blank line is no row
    assert dict(report.dropped) == {"malformed_json": 1, "not_utf8": 1, "not_an_object": 1, "wrong_type": 2,
                                    "empty_answer": 1, "too_long": 2, "no_assistant_turn": 1}
    expected_lines: dict[str, list[str]] = {}
    for number, (_, reason) in sorted(BAD.items()):
        expected_lines.setdefault(reason, []).append(f"messy:line {number}")
    assert report.examples == expected_lines  # file line numbers, not positions among the surviving rows
    summary = report.summary()
    assert summary.startswith("20 of 29 rows kept; dropped: ")
    assert "too_long 2 (e.g. messy:line 19, messy:line 22)" in summary
    assert "malformed_json 1 (e.g. messy:line 3)" in summary
    record = report.as_dict()
    assert record["rows_dropped"]["not_utf8"] == 1
    assert record["first_dropped"]["wrong_type"] == ["messy:line 12", "messy:line 14"]
    json.dumps(record)  # goes into metrics.json as is


def test_only_the_first_few_line_numbers_are_kept(tmp_path: Path, tiny_model_dir: Path, tokenizer: Any) -> None:
    recipe = _recipe(tmp_path, tiny_model_dir, min_valid_fraction=0.1)
    bad = {number: (b"{not json", "malformed_json") for number in range(2, 60, 2)}
    _data_file(tmp_path, GOOD * 2, bad)
    _, report = load_datasets(recipe, tokenizer)
    assert report.dropped["malformed_json"] == len(bad)
    assert report.examples["malformed_json"] == [f"messy:line {n}" for n in (2, 4, 6, 8, 10)]


def test_mostly_bad_data_stops_with_a_clear_error(tmp_path: Path, tiny_model_dir: Path, tokenizer: Any) -> None:
    recipe = _recipe(tmp_path, tiny_model_dir)
    bad = {number: (b'{"messages": [}', "malformed_json") for number in range(1, 9)}
    _data_file(tmp_path, GOOD[:4], bad)
    with pytest.raises(PipelineError) as info:
        load_datasets(recipe, tokenizer)
    message = str(info.value)
    assert message.startswith(f"{recipe.path}: data: only 4 of 12 rows kept")
    assert "malformed_json 8 (e.g. messy:line 1, messy:line 2, messy:line 3)" in message
    assert "data.min_valid_fraction=0.5" in message and "lower the threshold" in message

    lenient = _recipe(tmp_path, tiny_model_dir, min_valid_fraction=0.3)
    datasets, report = load_datasets(lenient, tokenizer)  # enough rows remain for this threshold
    assert len(datasets["train"]) == 4 and report.dropped["malformed_json"] == 8


def test_no_usable_rows_at_all(tmp_path: Path, tiny_model_dir: Path, tokenizer: Any) -> None:
    recipe = _recipe(tmp_path, tiny_model_dir)
    _data_file(tmp_path, [], {1: (b"\xff\xfe\x00", "not_utf8"), 2: (b"{\"messages\": null}", "missing_field")})
    with pytest.raises(PipelineError, match=r"only 0 of 2 rows kept.*not_utf8 1 \(e\.g\. messy:line 1\)"):
        load_datasets(recipe, tokenizer)


def test_json_array_and_byte_order_mark(tmp_path: Path, tiny_model_dir: Path, tokenizer: Any) -> None:
    """A JSON array with a stray non-object, and a JSONL file saved with a UTF-8 BOM (Windows editors)."""
    recipe = _recipe(tmp_path, tiny_model_dir)
    card = tmp_path / "data_cards" / "messy.yaml"
    card.write_text(card.read_text().replace("messy.jsonl", "messy.json"))
    items = [chat("Hi?", "Hello!"), "not a row", chat("Bye?", "Goodbye!"), chat("Again?", "")]
    (tmp_path / "data" / "messy.json").write_text(json.dumps(items))
    datasets, report = load_datasets(load_recipe(recipe.path), tokenizer)
    assert len(datasets["train"]) == 2
    assert report.examples == {"not_an_object": ["messy:item 2"], "empty_answer": ["messy:item 4"]}

    card.write_text(card.read_text().replace("messy.json", "messy.jsonl"))
    _data_file(tmp_path, GOOD[:3], {})
    path = tmp_path / "data" / "messy.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    _, report = load_datasets(load_recipe(recipe.path), tokenizer)
    assert report.kept == 3 and not report.dropped


def test_prompt_sets_name_lines_too(tmp_path: Path, tiny_model_dir: Path, tokenizer: Any) -> None:
    """Stages that sample (PPO) keep distinct prompts; over-long and bad prompts are named by line."""
    recipe = _recipe(tmp_path, tiny_model_dir, fmt="prompt_only", stage="ppo")
    rows = [json.dumps({"prompt": text}).encode()
            for text in ["Say hi.", "Say hi.", "Describe rain.", "word " * 400, "", "Describe snow."]]
    (tmp_path / "data" / "messy.jsonl").write_bytes(b"\n".join(rows))
    datasets, report = load_datasets(recipe, tokenizer, prompts_only=True)
    assert sorted(row["prompt"][-1]["content"] for row in datasets["train"]) == ["Describe rain.",
                                                                                 "Describe snow.", "Say hi."]
    assert report.examples == {"too_long": ["messy:line 4"], "empty_prompt": ["messy:line 5"]}


def test_hub_dataset_offline_names_the_card(tmp_path: Path, tiny_model_dir: Path, tokenizer: Any) -> None:
    recipe = _recipe(tmp_path, tiny_model_dir)
    card = tmp_path / "data_cards" / "messy.yaml"
    data = yaml.safe_load(card.read_text())
    data["source"] = {"hub_id": "nobody-here/not-a-cached-dataset", "split": "train"}
    card.write_text(yaml.safe_dump(data))
    with pytest.raises(PipelineError) as info:  # tests run with HF_HUB_OFFLINE=1
        load_datasets(load_recipe(recipe.path), tokenizer)
    message = str(info.value)
    assert message.startswith(f"{card.resolve()}: source.hub_id: cannot reach 'nobody-here/not-a-cached-dataset'")
    assert "HF_HUB_OFFLINE=1" in message and "source.path" in message
