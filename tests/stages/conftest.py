"""Builders for small stage recipes over the tiny model: a data file, its card, and the recipe."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

WARM = ["Lovely, what a great day!", "That sounds wonderful, well done!", "Happy to help, enjoy it!",
        "Great news, I love that!", "What a nice idea, have fun!"]
FLAT = ["It was a day.", "The cake exists.", "Traffic was traffic.", "Noted.", "It is what it is."]
TOPICS = ["the weather", "my cake", "the traffic", "my garden", "the weekend", "the train", "my tea",
          "the park", "the library", "dinner", "the market", "the story"]


def sft_rows(n: int = 48) -> list[dict[str, Any]]:
    """Chat rows with a learnable answer pattern, so eval loss can fall within a few steps."""
    return [{"messages": [{"role": "user", "content": f"Tell me about {TOPICS[i % len(TOPICS)]}."},
                          {"role": "assistant", "content": WARM[i % len(WARM)]}]} for i in range(n)]


def preference_rows(n: int = 64) -> list[dict[str, Any]]:
    """Pairs where the chosen answer always carries the word 'great' (trivially learnable)."""
    rows = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        rows.append({"prompt": f"How was {topic}?", "chosen": f"It was great, {topic} was great.",
                     "rejected": f"It was {FLAT[i % len(FLAT)].lower()} {topic}"})
    return rows


def write_card(folder: Path, name: str, rows: list[dict[str, Any]], fmt: str, stages: list[str]) -> Path:
    """A data file and its card in `folder/data_cards/`, where recipes in `folder` find it by name."""
    (folder / "data").mkdir(parents=True, exist_ok=True)
    (folder / "data_cards").mkdir(parents=True, exist_ok=True)
    data_file = folder / "data" / f"{name}.jsonl"
    data_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    card = {"name": name, "description": "test rows", "source": {"path": f"../data/{name}.jsonl"},
            "format": fmt, "license": "Apache-2.0", "stages": stages}
    card_path = folder / "data_cards" / f"{name}.yaml"
    card_path.write_text(yaml.safe_dump(card))
    return card_path


def write_label_recipe(folder: Path, model_dir: Path, prompts: list[str], labelling: dict[str, Any] | None = None,
                       **sections: Any) -> Path:
    """A label recipe for `model_dir` over `prompts` (a prompt-only card), writing into folder/outputs/label."""
    write_card(folder, "prompts", [{"prompt": prompt} for prompt in prompts], "prompt_only", ["label"])
    path = folder / "label.yaml"
    path.write_text(yaml.safe_dump({
        "stage": "label", "model": {"name_or_path": str(model_dir)},
        "data": {"train": ["prompts"], "eval_split": 0.0, "max_length": 96},
        "labelling": {"output_dir": str(folder / "outputs" / "label"), **(labelling or {})}, **sections},
        sort_keys=False))
    return path


RecipeFactory = Callable[..., Path]


def write_recipe(folder: Path, model_dir: Path, stage: str, cards: list[str], training: dict[str, Any] | None = None,
                 model: dict[str, Any] | None = None, name: str | None = None, **sections: Any) -> Path:
    """A stage recipe for the tiny model in `folder`; sections are merged over small CPU-friendly defaults."""
    recipe = {
        "stage": stage,
        "model": {"name_or_path": str(model_dir), "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0}}
        | (model or {}),
        "data": {"train": cards, "eval_split": 0.25, "max_length": 128},
        "training": {"output_dir": str(folder / "outputs" / (name or stage)), "num_train_epochs": 1,
                     "per_device_train_batch_size": 8, "per_device_eval_batch_size": 8,
                     "learning_rate": 5e-3, "logging_steps": 1, "save_steps": 2, "seed": 0,
                     "eval_strategy": "no", "report_to": "none"} | (training or {}),
    } | sections
    path = folder / f"{name or stage}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture
def make_recipe(tmp_path: Path, tiny_model_dir: Path) -> RecipeFactory:
    """Write a stage recipe for the tiny model in this test's folder (see write_recipe)."""
    def make(*args: Any, **kwargs: Any) -> Path:
        return write_recipe(tmp_path, tiny_model_dir, *args, **kwargs)
    return make


@pytest.fixture(scope="session")
def sft_and_rm(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> tuple[Path, Path]:
    """A finished SFT stage on the tiny base (LoRA r 8) and a reward model trained from it: where the policy
    stages start. The SFT adapter is trained hard enough to move its log-probabilities well away from the base."""
    from rlhf_pipeline.stages import load_recipe, rm, sft

    folder = tmp_path_factory.mktemp("sft-and-rm")
    write_card(folder, "chat", sft_rows(16), "messages", ["sft"])
    write_card(folder, "pairs", preference_rows(16), "prompt_chosen_rejected", ["rm"])
    sft_recipe = load_recipe(write_recipe(folder, tiny_model_dir, "sft", ["chat"], {"max_steps": 4},
                                          data={"train": ["chat"], "eval_split": 0.0, "max_length": 128}))
    sft.run(sft_recipe)
    rm_recipe = load_recipe(write_recipe(folder, tiny_model_dir, "rm", ["pairs"], {"max_steps": 2},
                                         model={"name_or_path": str(sft_recipe.output_dir)},
                                         data={"train": ["pairs"], "eval_split": 0.0, "max_length": 128}))
    rm.run(rm_recipe)
    return sft_recipe.output_dir, rm_recipe.output_dir


def rm_with_another_tokenizer(folder: Path, base: Path) -> Path:
    """A finished-looking rm stage whose tokenizer has one extra special token (no weights: none may load)."""
    from transformers import AutoTokenizer

    from tests.stages.test_ppo_checks import _fake_stage

    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|reward|>"]})
    return _fake_stage(folder, "rm", base, tokenizer)


@pytest.fixture
def weights_forbidden(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make loading any model's weights fail the test: what must be refused before weights load."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    def no_weights(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("weights were loaded before the check")

    for model_class in (AutoModelForCausalLM, AutoModelForSequenceClassification):
        monkeypatch.setattr(model_class, "from_pretrained", no_weights)
