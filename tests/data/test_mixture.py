"""Mixtures of cards in `data.train`: weights and caps give their counts, taken by whole prompts, seeded and
stable; bad entries fail before anything loads, naming the key; the data report and model card list every card."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import pytest
import yaml
from datasets import Dataset

from rlhf_pipeline.data.loading import load_datasets
from rlhf_pipeline.errors import RecipeError
from rlhf_pipeline.stages import load_recipe
from tests.stages.conftest import RecipeFactory, write_card
from tests.stages.test_held_out import ranked_rows


def pairs(name: str, count: int) -> list[dict[str, Any]]:
    """`count` pairs, each on its own prompt, naming their card in the prompt (so a row tells where it came from)."""
    return [{"prompt": f"{name} question {i}?", "chosen": f"A kind answer {i}.", "rejected": f"No {i}."}
            for i in range(count)]


def card_of(row: dict[str, Any]) -> str:
    return row["prompt"][-1]["content"].split()[0]


def mixture(make_recipe: RecipeFactory, train: list[Any], **data: Any) -> Any:
    return load_recipe(make_recipe("rm", ["a"], data={"train": train, "eval_split": 0.0, "max_length": 128} | data))


@pytest.fixture
def cards(tmp_path: Path) -> None:
    write_card(tmp_path, "a", pairs("a", 30), "prompt_chosen_rejected", ["rm"])
    write_card(tmp_path, "b", pairs("b", 50), "prompt_chosen_rejected", ["rm"])
    write_card(tmp_path, "c", pairs("c", 40), "prompt_chosen_rejected", ["rm"])


@pytest.mark.usefixtures("cards")
def test_weights_give_each_card_its_share(make_recipe: RecipeFactory, tokenizer: Any) -> None:
    """Shares 1:3 of cards with 30 and 50 rows: the largest mixture repeating no row is 40 + 40·... = b whole."""
    recipe = mixture(make_recipe, [{"card": "a", "weight": 1}, {"card": "b", "weight": 3}])
    datasets, report = load_datasets(recipe, tokenizer)
    counts = collections.Counter(card_of(row) for row in datasets["train"])
    assert counts == {"a": 16, "b": 50}  # b runs out first: 50 rows are 3/4, so a gives 50/3 -> 16 whole rows
    assert [(s["card"], s["weight"], s["rows_kept"], s["rows_taken"], s["train_rows"]) for s in report.sources] == [
        ("a", 1, 30, 16, 16), ("b", 3, 50, 50, 50)]

    equal = mixture(make_recipe, [{"card": "a", "weight": 0.5}, {"card": "b", "weight": 0.5}])
    datasets, _ = load_datasets(equal, tokenizer)
    assert collections.Counter(card_of(row) for row in datasets["train"]) == {"a": 30, "b": 30}


@pytest.mark.usefixtures("cards")
def test_caps_and_fractions_and_a_card_taken_whole(make_recipe: RecipeFactory, tokenizer: Any) -> None:
    recipe = mixture(make_recipe, [{"card": "a", "max_rows": 10}, {"card": "b", "fraction": 0.5}, "c"])
    datasets, report = load_datasets(recipe, tokenizer)
    rows = list(datasets["train"])
    assert collections.Counter(card_of(row) for row in rows) == {"a": 10, "b": 25, "c": 40}
    assert [card_of(row) for row in rows] == ["a"] * 10 + ["b"] * 25 + ["c"] * 40  # in the order listed
    assert [row["prompt"][-1]["content"] for row in rows[35:]] == [f"c question {i}?" for i in range(40)]  # c as is
    assert [s.get("max_rows") for s in report.sources] == [10, None, None]
    assert report.sources[1]["fraction"] == 0.5


@pytest.mark.usefixtures("cards")
def test_sampling_is_seeded_and_stable(make_recipe: RecipeFactory, tokenizer: Any) -> None:
    train = [{"card": "a", "max_rows": 10}, {"card": "b", "weight": 1}]
    with pytest.raises(RecipeError, match=r"data\.train\[0\]: give every data\.train entry a weight, or none"):
        mixture(make_recipe, train)
    train = [{"card": "a", "max_rows": 10, "weight": 1}, {"card": "b", "weight": 1}]
    first, _ = load_datasets(mixture(make_recipe, train), tokenizer)
    again, _ = load_datasets(mixture(make_recipe, train), tokenizer)  # read from the cache this time
    other, _ = load_datasets(mixture(make_recipe, train, seed=7), tokenizer)
    assert list(first["train"]) == list(again["train"])
    assert collections.Counter(card_of(row) for row in first["train"]) == {"a": 10, "b": 10}
    assert {row["prompt"][-1]["content"] for row in first["train"]} != \
        {row["prompt"][-1]["content"] for row in other["train"]}
    taken = Dataset.from_dict({"n": range(30)}).shuffle(seed=42)["n"][:10]  # one row per prompt: shuffle's order
    assert [row["prompt"][-1]["content"] for row in first["train"]][:10] == [f"a question {n}?" for n in taken]


def test_a_cap_takes_whole_prompts(tmp_path: Path, make_recipe: RecipeFactory, tokenizer: Any) -> None:
    """Six pairs per prompt (a ranking of four answers): 20 rows are three whole prompts."""
    write_card(tmp_path, "ranked", ranked_rows(), "ranking", ["rm"])
    write_card(tmp_path, "a", pairs("a", 5), "prompt_chosen_rejected", ["rm"])
    recipe = mixture(make_recipe, [{"card": "ranked", "max_rows": 20}, "a"])
    datasets, report = load_datasets(recipe, tokenizer)
    prompts = collections.Counter(row["prompt"][-1]["content"] for row in datasets["train"])
    assert sum(prompts.values()) == 23 and sorted(prompts.values()) == [1] * 5 + [6] * 3
    with pytest.raises(RecipeError, match=r"data\.train\[0\]\.max_rows: card 'ranked' would give 5 rows, fewer "
                                          r"than any one of its prompts has"):
        load_datasets(mixture(make_recipe, [{"card": "ranked", "max_rows": 5}, "a"]), tokenizer)
    assert report.sources[0]["rows_taken"] == 18


@pytest.mark.usefixtures("cards")
def test_the_eval_split_is_carved_by_prompt_from_the_mixture(make_recipe: RecipeFactory, tokenizer: Any) -> None:
    recipe = mixture(make_recipe, [{"card": "a", "weight": 1}, {"card": "b", "weight": 1}], eval_split=0.25)
    datasets, report = load_datasets(recipe, tokenizer)
    train = {row["prompt"][-1]["content"] for row in datasets["train"]}
    held_out = {row["prompt"][-1]["content"] for row in datasets["eval"]}
    assert len(train) == 45 and len(held_out) == 15 and not train & held_out
    for source in report.sources:  # every row a card gave went to exactly one side
        assert source["train_rows"] + source["eval_rows"] == source["rows_taken"] == 30
    by_card = collections.Counter(card_of(row) for row in datasets["eval"])
    assert [by_card[s["card"]] for s in report.sources] == [s["eval_rows"] for s in report.sources]


@pytest.mark.usefixtures("cards")
def test_the_report_lists_every_card(make_recipe: RecipeFactory, tokenizer: Any) -> None:
    recipe = mixture(make_recipe, [{"card": "a", "weight": 2}, {"card": "b", "weight": 1}], eval=["c"])
    _, report = load_datasets(recipe, tokenizer)
    record = report.as_dict()
    assert [(s["card"], s["split"]) for s in record["sources"]] == [("a", "train"), ("b", "train"), ("c", "eval")]
    assert record["sources"][2]["eval_rows"] == 40
    summary = report.summary()
    assert "sources: a (train, weight 2): 30 of 30 kept rows taken (30 train); b (train, weight 1): 15 of 50 kept " \
           "rows taken (15 train); c (eval): 40 of 40 kept rows taken (40 eval)" in summary


@pytest.mark.parametrize(("entry", "key", "words"), [
    ({"card": "b", "weight": 0}, "data.train[1].weight", "must be a positive number"),
    ({"card": "b", "weight": -0.3}, "data.train[1].weight", "must be a positive number"),
    ({"card": "b", "weight": "high"}, "data.train[1].weight", "must be a positive number"),
    ({"card": "b", "wieght": 1}, "data.train[1].wieght", "unknown key; did you mean weight?"),
    ({"card": "b", "fraction": 1.5}, "data.train[1].fraction", "must be in (0, 1]"),
    ({"card": "b", "max_rows": 0}, "data.train[1].max_rows", "at least 1"),
    ({"card": "b", "max_rows": 5, "fraction": 0.5}, "data.train[1].fraction", "max_rows or fraction, not both"),
    ({"weight": 1}, "data.train[1].card", "name the data card"),
    ({"card": "b", "max_rows": 51}, "data.train[1].max_rows", "51 is more than the 50 rows card 'b' has (counted "
                                                              "in b.jsonl)"),
    ({"card": "a", "max_rows": 3}, "data.train[1]", "card 'a' is already data.train[0]"),
])
@pytest.mark.usefixtures("cards")
def test_a_bad_entry_names_its_key(make_recipe: RecipeFactory, entry: dict[str, Any], key: str, words: str) -> None:
    train = [{"card": "a", "weight": 1} if "weight" in entry else "a", entry]
    with pytest.raises(RecipeError) as info:
        mixture(make_recipe, train)
    assert str(info.value).startswith(f"{info.value.file}: {key}: ")
    assert words in str(info.value)


@pytest.mark.usefixtures("cards")
def test_a_cap_is_checked_against_the_cards_stated_size(tmp_path: Path, make_recipe: RecipeFactory) -> None:
    card = tmp_path / "data_cards" / "b.yaml"
    card.write_text(yaml.safe_dump(yaml.safe_load(card.read_text()) | {"size": {"rows": 40}}))
    with pytest.raises(RecipeError, match=r"data\.train\[0\]\.max_rows: 45 is more than the 40 rows card 'b' has "
                                          r"\(its card's size\.rows\)"):
        mixture(make_recipe, [{"card": "b", "max_rows": 45}])
    write_card(tmp_path, "ranked", ranked_rows(4), "ranking", ["rm"])  # four rows, 24 pairs: a row count is no bound
    assert mixture(make_recipe, [{"card": "ranked", "max_rows": 20}]).data.sources()[0].max_rows == 20
