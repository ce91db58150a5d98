"""The data cache: a card converts once per tokenizer and settings, every later load (and every other rank) reads
it, and anything that changes the rows makes a new entry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from datasets import Dataset
from transformers import AutoTokenizer

from rlhf_pipeline.data import cache as data_cache_module
from rlhf_pipeline.data import conversion
from rlhf_pipeline.data.cache import data_cache
from rlhf_pipeline.data.cards import DataSpec
from rlhf_pipeline.data.loading import load_datasets
from rlhf_pipeline.errors import RecipeError
from rlhf_pipeline.stages import load_recipe
from tests.data.test_loading import BAD, GOOD, _data_file, _recipe
from tests.two_processes import launch_two_processes

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty cache for this test, and a count of the batches converted in this process."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("RLHF_PIPELINE_DATA_CACHE", str(folder))
    return folder


@pytest.fixture
def conversions(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many rows each conversion batch in this process had (the cache is read when this stays empty)."""
    calls: list[int] = []
    convert = conversion.Converter.__call__

    def counted(self: conversion.Converter, batch: dict[str, list[Any]], indices: list[int]) -> dict[str, list[Any]]:
        calls.append(len(indices))
        return convert(self, batch, indices)

    monkeypatch.setattr(conversion.Converter, "__call__", counted)
    return calls


def entries(cache: Path) -> list[str]:
    return sorted(path.name for path in cache.iterdir() if not path.name.startswith("."))


def test_a_second_load_reads_the_cache(tmp_path: Path, tiny_model_dir: Path, tokenizer: Any, cache: Path,
                                       conversions: list[int]) -> None:
    recipe = _recipe(tmp_path, tiny_model_dir)
    _data_file(tmp_path, GOOD, BAD)
    first, report = load_datasets(recipe, tokenizer)
    assert conversions == [29] and len(entries(cache)) == 1
    assert entries(cache)[0].startswith("messy-")
    entry = cache / entries(cache)[0]
    record = json.loads((entry / "card.json").read_text())
    assert record["read"] == 29 and record["rows"] == 22  # too_long is decided when read: the limit is not in the key
    assert record["where"]["malformed_json"] == ["line 3"]

    second, again = load_datasets(load_recipe(recipe.path), tokenizer)
    assert conversions == [29]  # nothing converted the second time
    assert list(second["train"]) == list(first["train"])
    assert again.as_dict() == report.as_dict()  # the same drops, named by the same lines


def test_what_changes_the_rows_changes_the_key(tmp_path: Path, tiny_model_dir: Path, tokenizer: Any, cache: Path,
                                               conversions: list[int]) -> None:
    recipe = _recipe(tmp_path, tiny_model_dir)
    _data_file(tmp_path, GOOD, BAD)
    load_datasets(recipe, tokenizer)
    lengths = sorted(Dataset.load_from_disk(str(cache / entries(cache)[0] / "rows"))["_length"])
    limit = lengths[len(lengths) // 2]
    _, shorter = load_datasets(_recipe(tmp_path, tiny_model_dir, max_length=limit, min_valid_fraction=0.1),
                               tokenizer)
    assert len(conversions) == 1 and len(entries(cache)) == 1  # the same entry, cut at another length
    assert shorter.kept == sum(length <= limit for length in lengths) < len(lengths)

    load_datasets(_recipe(tmp_path, tiny_model_dir, system_prompt="Be brief."), tokenizer)
    assert len(conversions) == 2 and len(entries(cache)) == 2

    other = AutoTokenizer.from_pretrained(tiny_model_dir)
    other.chat_template = other.chat_template.replace("You are a helpful assistant.", "You help.")
    load_datasets(recipe, other)
    assert len(conversions) == 3 and len(entries(cache)) == 3

    _data_file(tmp_path, GOOD[:-1], BAD)  # the file's bytes changed
    load_datasets(recipe, tokenizer)
    assert len(conversions) == 4 and len(entries(cache)) == 4

    recipe = _recipe(tmp_path, tiny_model_dir)  # as before (the system prompt's recipe was written over it)
    card = tmp_path / "data_cards" / "messy.yaml"  # documentation is not part of the key
    card.write_text(yaml.safe_dump(yaml.safe_load(card.read_text()) | {"description": "other words",
                                                                        "license": "MIT"}))
    load_datasets(load_recipe(recipe.path), tokenizer)
    assert len(conversions) == 4


def test_a_failed_conversion_leaves_no_entry(tmp_path: Path, tiny_model_dir: Path, tokenizer: Any,
                                             cache: Path) -> None:
    recipe = _recipe(tmp_path, tiny_model_dir, fmt="prompt_completion")
    _data_file(tmp_path, GOOD, {})
    with pytest.raises(RecipeError, match=r"columns\.completion: column 'completion' not found in .*messy"):
        load_datasets(recipe, tokenizer)
    assert not cache.exists() or not entries(cache)


def test_several_processes_convert_as_one(tmp_path: Path, tiny_model_dir: Path, tokenizer: Any, cache: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """`num_proc: 2` splits a card between two workers; rows, order and named drops are those of one process."""
    recipe = _recipe(tmp_path, tiny_model_dir)
    _data_file(tmp_path, GOOD * 3, BAD)
    one, one_report = load_datasets(recipe, tokenizer)
    monkeypatch.setenv("RLHF_PIPELINE_DATA_CACHE", str(tmp_path / "another-cache"))
    two, two_report = load_datasets(_recipe(tmp_path, tiny_model_dir, num_proc=2), tokenizer)
    assert two_report.sources[0]["cache"] == "converted"
    assert list(two["train"]) == list(one["train"])
    assert two_report.as_dict() == one_report.as_dict()


def test_an_entry_another_process_placed_first_is_kept(tmp_path: Path, tiny_model_dir: Path, tokenizer: Any,
                                                       cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runs converting one card at once: the entry placed first stays (the other run may be reading it, and
    the trainers write their own caches into it); the later conversion is dropped, and it reads that entry."""
    recipe = _recipe(tmp_path, tiny_model_dir)
    _data_file(tmp_path, GOOD, BAD)
    first, report = load_datasets(recipe, tokenizer)
    entry = cache / entries(cache)[0]
    (entry / "rows" / "cache-in-use.arrow").write_bytes(b"a trainer's cache file")
    entry.rename(tmp_path / "placed-meanwhile")
    convert = data_cache_module._convert

    def slower(*args: Any, **kwargs: Any) -> Any:
        built = convert(*args, **kwargs)
        (tmp_path / "placed-meanwhile").rename(entry)  # the other run finished first
        return built

    monkeypatch.setattr(data_cache_module, "_convert", slower)
    second, again = load_datasets(load_recipe(recipe.path), tokenizer)
    assert (entry / "rows" / "cache-in-use.arrow").is_file()  # the same folder, not replaced
    assert [path.name for path in cache.iterdir()] == [entry.name]  # no scratch left behind
    assert again.sources[0]["cache"] == "converted"
    assert list(second["train"]) == list(first["train"]) and again.as_dict() == report.as_dict()

    monkeypatch.setattr(data_cache_module, "_convert", convert)
    (entry / "card.json").unlink()  # half deleted by hand: converted again, whole
    load_datasets(load_recipe(recipe.path), tokenizer)
    assert (entry / "card.json").is_file() and not (entry / "rows" / "cache-in-use.arrow").exists()


def test_the_cache_folder_and_its_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("RLHF_PIPELINE_DATA_CACHE")
    monkeypatch.setenv("RLHF_PIPELINE_CACHE", str(tmp_path / "pipeline"))
    assert data_cache() == tmp_path / "pipeline" / "data"
    monkeypatch.setenv("RLHF_PIPELINE_DATA_CACHE", "~/somewhere")
    assert data_cache() == Path.home() / "somewhere"


RANK_SCRIPT = """
import json, sys
sys.path[:0] = [{root!r}]
import tests.conftest  # noqa: F401  (offline Hugging Face settings)
from transformers import AutoTokenizer
from rlhf_pipeline.data import conversion
from rlhf_pipeline.data.loading import load_datasets
from rlhf_pipeline.distributed import process_state
from rlhf_pipeline.stages import load_recipe

state = process_state()
calls = []
convert = conversion.Converter.__call__
conversion.Converter.__call__ = lambda self, batch, indices: calls.append(len(indices)) or convert(self, batch, indices)
recipe = load_recipe(sys.argv[1])
datasets, report = load_datasets(recipe, AutoTokenizer.from_pretrained(recipe.model.name_or_path))
result = {{"rank": state.process_index, "world_size": state.num_processes, "converted": calls,
           "cache": [source["cache"] for source in report.sources], "train": list(datasets["train"]),
           "eval": list(datasets["eval"]), "report": report.as_dict()}}
open(sys.argv[2] + f".{{state.process_index}}", "w").write(json.dumps(result))
state.wait_for_everyone()
"""


def test_two_processes_one_converts_the_other_reads(tmp_path: Path, tiny_model_dir: Path, cache: Path) -> None:
    recipe = _recipe(tmp_path, tiny_model_dir, eval_split=0.2)
    _data_file(tmp_path, GOOD * 2, BAD)
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT.format(root=str(ROOT)))
    launch_two_processes(script, str(recipe.path), str(tmp_path / "seen"), timeout=300)
    ranks = [json.loads((tmp_path / f"seen.{rank}").read_text()) for rank in (0, 1)]
    assert [rank["world_size"] for rank in ranks] == [2, 2]
    assert ranks[0]["converted"] == [49] and ranks[0]["cache"] == ["converted"]
    assert ranks[1]["converted"] == [] and ranks[1]["cache"] == ["read"]  # it read what rank 0 wrote
    assert len(entries(cache)) == 1
    assert ranks[0]["train"] == ranks[1]["train"] and ranks[0]["eval"] == ranks[1]["eval"]
    assert len(ranks[0]["train"]) == 32 and len(ranks[0]["eval"]) == 8
    assert ranks[0]["report"] == ranks[1]["report"]


def test_workers_follow_the_idle_cpus_and_the_card_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """One worker per idle CPU, none for a small card or on busy CPUs; `data.num_proc` decides when set."""
    monkeypatch.setattr(data_cache_module.os, "sched_getaffinity", lambda _: {0, 1, 2, 3}, raising=False)
    busy = {"cpus": 0.0, "looks": 0}

    def busy_cpus() -> float:
        busy["looks"] += 1
        return busy["cpus"]

    monkeypatch.setattr(data_cache_module, "_busy_cpus", busy_cpus)
    spec = DataSpec(train=["x"])
    assert data_cache_module.processes(spec, 200_000) == 4
    assert data_cache_module.processes(spec, 50_000) == 2  # one per 20,000 rows
    looks = busy["looks"]
    assert data_cache_module.processes(spec, 30_000) is None
    assert busy["looks"] == looks  # a small card does not wait to look at the CPUs
    busy["cpus"] = 2.6
    assert data_cache_module.processes(spec, 200_000) is None  # 1.4 idle: one process
    busy["cpus"] = 1.0
    assert data_cache_module.processes(spec, 200_000) == 3
    assert data_cache_module.processes(DataSpec(train=["x"], num_proc=2), 1_000) == 2


def test_busy_cpus_sees_a_spinning_process() -> None:
    """A process spinning on one CPU is seen within the window, where the 1-minute load average lags."""
    if not Path("/proc/stat").is_file():
        pytest.skip("needs /proc/stat")
    before = data_cache_module._busy_cpus()
    if before > len(os.sched_getaffinity(0)) - 1:
        pytest.skip(f"no idle CPU to spin on ({before:.1f} busy)")
    spin = "import time\nend = time.time() + 3\nwhile time.time() < end: pass"
    with subprocess.Popen([sys.executable, "-c", spin]) as spinner:
        time.sleep(0.5)
        during = data_cache_module._busy_cpus()
        spinner.kill()
    assert during >= before + 0.6, (before, during)
