"""The stage registry: a new stage is its own module plus one registry line, and the whole package knows it.

A toy stage is written here as a module of its own; registering it (the one line a real stage adds to
`_STAGE_MODULES`) is all it takes for validate, the report, the model card and the memory estimate to
handle it: nothing else in the package names stages.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from rlhf_pipeline import stages
from rlhf_pipeline.cli import main
from tests.stages.conftest import sft_rows, write_card

TOY_MODULE = '''"""A toy stage: it trains nothing, but says everything a stage says."""

from dataclasses import dataclass

from rlhf_pipeline.data.formats import SFT_FORMATS
from rlhf_pipeline.stages import MemoryModel, ModelOutput, Presentation, Stage


@dataclass
class ToyConfig:
    output_dir: str
    per_device_train_batch_size: int = 2
    steps: int = 3

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError("steps: at least 1")


def headline(metrics):
    return f"the toy took {metrics['steps']} steps"


def section(folder, metrics, plots):
    return [f"A toy section: {metrics['steps']} steps.", ""]


def run(recipe):
    from rlhf_pipeline.sources import resolve_source
    from rlhf_pipeline.stages.common import finish_outputs, finished_manifest

    metrics = {"steps": recipe.settings.steps}
    manifest = finished_manifest(recipe, resolve_source(recipe.model), metrics, adapter=False)
    finish_outputs(recipe, manifest, lambda folder: (folder / "toy.txt").write_text("toy"))
    return metrics


STAGE = Stage(name="toy", summary="a toy stage", example="rlhf-pipeline toy toy.yaml",
              config_class=("toy_stage", "ToyConfig"), data_formats=frozenset(SFT_FORMATS), run=run,
              presentation=Presentation("A toy stage", headline, section),
              model=ModelOutput("toy-model", "toy model that trained nothing"), memory=MemoryModel())
'''


@pytest.fixture
def toy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The toy stage's module on the path and its registry line; returns a recipe for it."""
    (tmp_path / "toy_stage.py").write_text(TOY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(stages._STAGE_MODULES, "toy", "toy_stage")  # the one registry line
    monkeypatch.setattr(stages, "STAGE_NAMES", tuple(stages._STAGE_MODULES))
    yield tmp_path
    sys.modules.pop("toy_stage", None)


def test_a_toy_stage_is_validated_reported_carded_and_estimated(toy: Path, tiny_model_dir: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    from rlhf_pipeline.card import render_model_card
    from rlhf_pipeline.estimate import estimate_recipe

    write_card(toy, "chat", sft_rows(4), "messages", ["sft"])
    recipe_path = toy / "toy.yaml"
    recipe_path.write_text(yaml.safe_dump({
        "stage": "toy", "model": {"name_or_path": str(tiny_model_dir)}, "data": {"train": ["chat"]},
        "training": {"output_dir": str(toy / "out"), "steps": 5}}))

    assert main(["validate", str(recipe_path)]) == 0
    assert "valid toy recipe" in capsys.readouterr().out
    assert main(["validate", str(recipe_path), "training.steps=0"]) == 2
    assert "training.steps: at least 1" in capsys.readouterr().err
    assert main(["validate", str(recipe_path), "training.stpes=2"]) == 2
    assert "did you mean steps?" in capsys.readouterr().err

    recipe = stages.load_recipe(recipe_path)
    assert stages.get_stage("toy").run(recipe) == {"steps": 5}
    report = (toy / "out" / "report.md").read_text()
    assert report.startswith("# A toy stage (out)") and "the toy took 5 steps." in report
    assert "A toy section: 5 steps." in report

    card = render_model_card(toy / "out")
    assert "toy-model" in card and "toy model that trained nothing" in card

    estimate = estimate_recipe(recipe_path, device="cpu")
    assert estimate.setup.micro_batch == 2  # the toy config's own default
    assert any(row.name == "activations" for row in estimate.rows) and estimate.peak > 0


def test_an_unknown_stage_is_named_with_the_known_ones() -> None:
    from rlhf_pipeline.errors import PipelineError

    with pytest.raises(PipelineError, match=r"unknown stage 'ppp'; did you mean ppo\?"):
        stages.get_stage("ppp")
