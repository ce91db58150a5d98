"""Compressed local files: a card pointing at `x.jsonl.gz` (or .bz2, .xz, a .json array, a CSV) loads the same rows,
and names the same bad lines, as the plain file."""

from __future__ import annotations

import bz2
import gzip
import lzma
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from rlhf_pipeline.data.cards import file_suffixes, load_card
from rlhf_pipeline.data.loading import load_datasets
from rlhf_pipeline.data.reading import read_card_rows
from rlhf_pipeline.errors import RecipeError
from rlhf_pipeline.stages import load_recipe
from tests.data.test_loading import BAD, GOOD, _data_file, _recipe

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "preference"
COMPRESS = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress}


def point_card_at(folder: Path, name: str) -> None:
    card = folder / "data_cards" / "messy.yaml"
    card.write_text(yaml.safe_dump(yaml.safe_load(card.read_text()) | {"source": {"path": f"../data/{name}"}}))


@pytest.mark.parametrize("suffix", sorted(COMPRESS))
def test_a_compressed_jsonl_file_loads_the_same_rows(suffix: str, tmp_path: Path, tiny_model_dir: Path,
                                                     tokenizer: Any) -> None:
    recipe = _recipe(tmp_path, tiny_model_dir)
    _data_file(tmp_path, GOOD, BAD, blank=27)
    plain, plain_report = load_datasets(recipe, tokenizer)
    data = tmp_path / "data" / "messy.jsonl"
    (tmp_path / "data" / f"messy.jsonl{suffix}").write_bytes(COMPRESS[suffix](data.read_bytes()))
    data.unlink()
    point_card_at(tmp_path, f"messy.jsonl{suffix}")
    packed, packed_report = load_datasets(load_recipe(recipe.path), tokenizer)
    assert list(packed["train"]) == list(plain["train"]) and len(plain["train"]) == 20
    assert packed_report.as_dict() == plain_report.as_dict()
    assert packed_report.examples["malformed_json"] == ["messy:line 3"]


def test_a_compressed_json_array_and_csv(tmp_path: Path, tiny_model_dir: Path, tokenizer: Any) -> None:
    recipe = _recipe(tmp_path, tiny_model_dir, fmt="prompt_chosen_rejected", stage="rm")
    shutil.copy(FIXTURES / "prompt_chosen_rejected.csv", tmp_path / "data" / "pairs.csv")
    point_card_at(tmp_path, "pairs.csv")
    plain, plain_report = load_datasets(load_recipe(recipe.path), tokenizer)
    (tmp_path / "data" / "pairs.csv.gz").write_bytes(gzip.compress((tmp_path / "data" / "pairs.csv").read_bytes()))
    point_card_at(tmp_path, "pairs.csv.gz")
    packed, packed_report = load_datasets(load_recipe(recipe.path), tokenizer)
    assert list(packed["train"]) == list(plain["train"]) and packed_report.as_dict() == plain_report.as_dict()

    good = b'{"prompt": "Hi?", "chosen": "Hello there!", "rejected": "Go."}'
    array = b"[" + good + b', 7, {"prompt": "Bye?"}, ' + good + b"]"
    (tmp_path / "data" / "pairs.json.xz").write_bytes(lzma.compress(array))
    point_card_at(tmp_path, "pairs.json.xz")
    card = load_card(tmp_path / "data_cards" / "messy.yaml")
    rows, unreadable, where = read_card_rows(card)
    assert rows[1] == {"prompt": "Bye?"} and len(rows) == 3
    assert unreadable == {"not_an_object": 1} and where == {"not_an_object": ["item 2"]}
    _, report = load_datasets(load_recipe(recipe.path), tokenizer)
    assert report.examples == {"not_an_object": ["messy:item 2"], "missing_field": ["messy:item 3"]}


@pytest.mark.parametrize(("name", "accepted"), [
    ("x.jsonl.gz", True), ("x.JSONL.GZ", True), ("x.json.bz2", True), ("x.csv.xz", True), ("x.parquet", True),
    ("x.parquet.gz", False), ("x.gz", False), ("x.txt.gz", False), ("x.jsonl.zip", False),
])
def test_which_local_files_a_card_takes(name: str, accepted: bool, tmp_path: Path) -> None:
    card = tmp_path / "card.yaml"
    card.write_text(yaml.safe_dump({"name": "x", "description": "d", "source": {"path": name},
                                    "format": "prompt_only", "license": "MIT", "stages": ["ppo"]}))
    if accepted:
        assert load_card(card).source.path == name
        return
    with pytest.raises(RecipeError, match=r"source\.path: use one of \.json, \.jsonl, \.csv, \.parquet files, the "
                                          r"first three also compressed \(\.gz, \.bz2, \.xz\)"):
        load_card(card)


def test_file_suffixes() -> None:
    assert file_suffixes("a/b.train.jsonl.gz") == (".jsonl", ".gz")
    assert file_suffixes("b.csv") == (".csv", None)
    assert file_suffixes("b.gz") == ("", ".gz")
