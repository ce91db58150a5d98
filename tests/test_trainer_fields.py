"""Trainer config fields come from the real dataclasses, cached per installed version, and validate stays light."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_pipeline import trainer_fields
from rlhf_pipeline.schema import annotation_text, matches
from rlhf_pipeline.stages import STAGE_NAMES, get_stage

REPO = Path(__file__).resolve().parent.parent
CONFIG_CLASSES = sorted({get_stage(name).config_class for name in STAGE_NAMES})


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("RLHF_PIPELINE_CACHE", str(tmp_path))
    trainer_fields.config_fields.cache_clear()
    yield tmp_path / "trainer_fields"
    trainer_fields.config_fields.cache_clear()


@pytest.mark.parametrize(("module", "class_name"), CONFIG_CLASSES)
def test_fields_are_those_of_the_real_dataclass_and_defaults_fit_them(module: str, class_name: str,
                                                                       fresh_cache: Path) -> None:
    fields = trainer_fields.config_fields(module, class_name)
    real = dataclasses.fields(getattr(importlib.import_module(module), class_name))
    assert set(fields) == {field.name for field in real if not field.name.startswith("_")}
    for name, field in fields.items():
        if field.default is not None:  # what a recipe may write must pass the check built from the annotation
            assert matches(field.default, field.annotation), (name, field.annotation, field.default)


def test_trl_fields_are_read_once_per_installed_version(fresh_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sft = ("trl.trainer.sft_config", "SFTConfig")
    fields = trainer_fields.config_fields(*sft)
    assert fields["eval_strategy"].annotation == "IntervalStrategy | str"
    assert fields["per_device_train_batch_size"] == trainer_fields.ConfigField("int", 8)
    (cached,) = fresh_cache.glob("trl.trainer.sft_config.SFTConfig-trl-*_transformers-*.json")
    assert json.loads(cached.read_text())["max_length"]["annotation"] == "int | None"

    trainer_fields.config_fields.cache_clear()

    def no_import(*args: object) -> None:
        raise AssertionError("the cached fields should have been used")

    monkeypatch.setattr(trainer_fields, "read_fields", no_import)
    assert trainer_fields.config_fields(*sft) == fields


def test_annotation_text_spells_types_as_the_schema_reads_them() -> None:
    from typing import Any, Literal, Optional, Union

    assert annotation_text(Optional[int]) == "int | None"  # noqa: UP045 (transformers' own spelling)
    assert annotation_text(Union[str, list[str]]) == "str | list[str]"  # noqa: UP007
    assert annotation_text(dict[str, Any] | None) == "dict[str, Any] | None"
    assert annotation_text(Literal["a", "b"]) == "Literal['a', 'b']"
    assert matches(["x"], annotation_text(Union[str, list[str]]))  # noqa: UP007


def test_validate_with_a_warm_cache_imports_neither_torch_nor_trl(tmp_path: Path) -> None:
    env = {**os.environ, "RLHF_PIPELINE_CACHE": str(tmp_path)}
    warm = "from rlhf_pipeline.stages import cache_config_fields; cache_config_fields()"
    subprocess.run([sys.executable, "-c", warm], check=True, env=env, cwd=REPO, capture_output=True)
    probe = ("import sys; from rlhf_pipeline.stages import load_recipe\n"
             "for stage in ('sft', 'rm', 'ppo'): load_recipe(f'recipes/smollm2-135m/{stage}.yaml', pending_outputs="
             "[__import__('pathlib').Path('outputs')])\n"
             "print(sorted(m for m in ('torch', 'trl', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], env=env, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_an_unwritable_cache_only_costs_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv("RLHF_PIPELINE_CACHE", str(blocker))
    trainer_fields.config_fields.cache_clear()
    try:
        fields = trainer_fields.config_fields("trl.trainer.reward_config", "RewardConfig")
    finally:
        trainer_fields.config_fields.cache_clear()
    assert fields["center_rewards_coefficient"].annotation == "float | None"
    assert "could not cache RewardConfig's fields" in caplog.text
