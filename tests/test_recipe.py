"""Recipe validation: every shipped recipe passes; every kind of mistake names the file and the key."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rlhf_pipeline.errors import RecipeError
from rlhf_pipeline.pipeline import read_pipeline, validate_pipeline
from rlhf_pipeline.stages import load_recipe

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "recipes").rglob("*.yaml"))
SFT_RECIPE = REPO / "recipes" / "smollm2-135m" / "sft.yaml"


PIPELINES = [p for p in SHIPPED if "stages" in yaml.safe_load(p.read_text())]


def _in_a_pipeline() -> set[Path]:
    return {step.recipe.resolve() for pipeline in PIPELINES for step in read_pipeline(pipeline)[1]}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_recipe_validates(path: Path) -> None:
    """Pipelines validate as a chain (later stages read earlier outputs); other recipes on their own."""
    if path in PIPELINES and path.name == "pipeline-vllm.yaml" and not (REPO / ".venv-vllm" / "bin").is_dir():
        with pytest.raises(RecipeError, match="make vllm-env"):  # its server starts from .venv-vllm
            validate_pipeline(path)
    elif path in PIPELINES:
        assert validate_pipeline(path)[0].stage == "sft"
    elif path.resolve() not in _in_a_pipeline():
        recipe = load_recipe(path)
        assert recipe.output_dir.parts[0] == "outputs"


def test_a_shipped_stage_continuing_another_keeps_its_lora_shape() -> None:
    """A stage trains a copy of the adapter it starts from (the policy, and PPO's critic from the RM), and refuses
    another LoRA shape once that adapter exists: a shipped chain whose shapes disagree fails at its second stage."""
    recipes = [load_recipe(p, pending_outputs=[Path("/")]) for p in SHIPPED if p not in PIPELINES]
    by_output = {recipe.output_dir: recipe for recipe in recipes}
    continued = 0
    for recipe in recipes:
        for source in (recipe.model.name_or_path, recipe.config.get("reward_model_path"),
                       recipe.config.get("policy_init")):
            start = by_output.get(Path(source)) if source else None
            if start is None:
                continue
            mine, theirs = recipe.model.lora, start.model.lora
            assert (mine.r, mine.lora_alpha, mine.layers_to_transform) == (
                theirs.r, theirs.lora_alpha, theirs.layers_to_transform), f"{recipe.path} continues {start.path}"
            if "all-linear" not in (mine.target_modules, theirs.target_modules):
                assert sorted(mine.target_modules) == sorted(theirs.target_modules), recipe.path
            continued += 1
    assert continued >= 20  # every shipped chain's later stages were compared


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _sft_data() -> dict:
    data = yaml.safe_load(SFT_RECIPE.read_text())
    data["data"]["train"] = [str(REPO / "data_cards" / "demo_sft.yaml")]
    return data


@pytest.mark.parametrize(
    ("override", "key", "words"),
    [
        ("training.learnig_rate=1e-4", "training.learnig_rate", "did you mean learning_rate?"),
        ("model.lora.rank=8", "model.lora.rank", "unknown key"),
        ("model.lora.r=0", "model.lora.r", "at least 1"),
        ("training.learning_rate=-0.1", "training.learning_rate", "must be positive"),
        ("training.num_train_epochs=many", "training.num_train_epochs", "expected a number"),
        ("model.quantization.load_in_8bit=true", "model.quantization", "cannot be fully fine-tuned"),
        ("data.max_length=2", "data.max_length", "at least 8"),
        ("data.train=[no_such_card]", "data", "no data card named 'no_such_card'"),
        ("training.max_length=512", "training.max_length", "use data.max_length"),
        ("hub.token=hf_abc", "hub.token", "looks like a secret"),
        ("modle.dtype=float32", "modle", "did you mean model?"),
        ("stage=sfft", "stage", "did you mean sft?"),
        ("training.eval_strategy=yes", "training.eval_strategy", "expected IntervalStrategy or a string, got True"),
    ],
)
def test_mistakes_name_file_and_key(tmp_path: Path, override: str, key: str, words: str) -> None:
    data = _sft_data()
    if override.startswith("model.quantization"):
        data["model"]["lora"] = None
    path = _write(tmp_path, data)
    with pytest.raises(RecipeError) as info:
        load_recipe(path, [override])
    message = str(info.value)
    assert message.startswith(f"{path}: {key}")
    assert words in message


def test_both_quantizations_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, _sft_data())
    with pytest.raises(RecipeError, match="choose one of load_in_4bit and load_in_8bit"):
        load_recipe(path, ["model.quantization.load_in_4bit=true", "model.quantization.load_in_8bit=true"])


def test_overrides_change_values_and_fingerprint(tmp_path: Path) -> None:
    path = _write(tmp_path, _sft_data())
    base = load_recipe(path)
    changed = load_recipe(path, ["training.learning_rate=1e-5", "model.lora.r=4"])
    assert changed.config["learning_rate"] == 1e-5
    assert changed.model.lora is not None and changed.model.lora.r == 4
    assert changed.fingerprint() != base.fingerprint()
    assert load_recipe(path).fingerprint() == base.fingerprint()


def test_no_is_a_strategy_in_recipes_and_overrides(tmp_path: Path) -> None:
    """YAML 1.1 reads `no` and `off` as false; transformers' strategies spell "no" (its docs write it unquoted)."""
    text = yaml.safe_dump(_sft_data())
    assert "  eval_strategy: 'no'\n" in text
    path = tmp_path / "recipe.yaml"
    path.write_text(text.replace("  eval_strategy: 'no'\n", "  eval_strategy: no\n  save_strategy: off\n"))
    recipe = load_recipe(path)
    assert recipe.config["eval_strategy"] == recipe.config["save_strategy"] == "no"
    overridden = load_recipe(path, ["training.eval_strategy=no", "training.logging_strategy=no"])
    assert overridden.config["eval_strategy"] == overridden.config["logging_strategy"] == "no"


def test_bool_fields_keep_false_and_refuse_strings(tmp_path: Path) -> None:
    path = _write(tmp_path, _sft_data())
    config = load_recipe(path, ["training.bf16=no", "training.include_num_input_tokens_seen=no"]).config
    assert config["bf16"] is False
    assert config["include_num_input_tokens_seen"] is False  # `str | bool`: transformers maps false to "no"
    with pytest.raises(RecipeError, match=r"training\.packing: expected true or false, got 'sometimes'"):
        load_recipe(path, ["training.packing=sometimes"])


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: sft\nmodel: [unclosed\n")
    with pytest.raises(RecipeError, match="line 3"):
        load_recipe(bad)


def test_validate_cli_is_fast_and_names_the_key(tmp_path: Path) -> None:
    path = _write(tmp_path, _sft_data())
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "rlhf_pipeline", "validate", str(path),
                             "training.learnig_rate=1e-4"], capture_output=True, text=True, cwd=REPO)
    elapsed = time.monotonic() - started
    assert result.returncode == 2
    assert "training.learnig_rate: unknown key; did you mean learning_rate?" in result.stderr
    assert "Traceback" not in result.stderr
    assert elapsed < 3.0, f"validate took {elapsed:.1f}s"
    ok = subprocess.run([sys.executable, "-m", "rlhf_pipeline", "validate", str(SFT_RECIPE)],
                        capture_output=True, text=True, cwd=REPO)
    assert ok.returncode == 0, ok.stderr
    assert "valid sft recipe" in ok.stdout
