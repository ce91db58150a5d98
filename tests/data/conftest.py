"""Fixtures of the data tests: the tiny model's tokenizer, and stage recipes written in the test's folder."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from tests.stages.conftest import RecipeFactory, write_recipe


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def make_recipe(tmp_path: Path, tiny_model_dir: Path) -> RecipeFactory:
    """A stage recipe for the tiny model in this test's folder (tests/stages/conftest.py's write_recipe)."""
    return functools.partial(write_recipe, tmp_path, tiny_model_dir)
