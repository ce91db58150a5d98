"""Model cards of finished stages: Hub metadata as huggingface_hub's ModelCardData, every section, and
loading snippets that run (on the tiny model under a Hub id; see tests/hub_stages.py)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from rlhf_pipeline import card as model_card
from rlhf_pipeline.outputs import read_manifest, shown_path
from tests.hub_stages import (
    FAKE_TOKEN,
    HUB_BASE,
    SNIPPET_ANSWER,
    SNIPPET_PROMPT,
    Stages,
    code_block,
    front_matter,
    logits,
    run_snippet,
    short_sha,
)

pytestmark = pytest.mark.usefixtures("hub_cache")


def test_finish_writes_a_model_card_and_names_the_base_by_hub_id(hub_stages: Stages) -> None:
    config = json.loads((hub_stages.sft / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == HUB_BASE  # models.record_origin, never a cache path

    card = (hub_stages.sft / "README.md").read_text()
    meta = front_matter(card)
    assert meta["base_model"] == HUB_BASE and meta["base_model_relation"] == "adapter"
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "text-generation"
    assert {"rlhf", "trl", "peft", "lora", "sft"} <= set(meta["tags"])
    assert meta["license"] == "apache-2.0"  # the only data card's license, as a Hub license id
    assert "datasets" not in meta  # the card's source is a local file, not a Hub dataset

    assert model_card.CARD_MARKER in card
    adapter_sha = short_sha(hub_stages.sft / "adapter_model.safetensors")
    assert f"| sft adapter (this model) | {shown_path(hub_stages.sft)} | `{adapter_sha}` |" in card
    assert yaml.safe_load(code_block(card, "yaml")) == yaml.safe_load((hub_stages.sft / "recipe.yaml").read_text())
    metrics = json.loads((hub_stages.sft / "metrics.json").read_text())
    assert f"| global_steps | {metrics['global_steps']} |" in card
    assert "| data.rows_kept | 16 |" in card and "log_history" not in card
    assert "### chat" in card and "- license: Apache-2.0" in card and "- format: messages" in card
    assert f"| torch | {torch.__version__} |" in card
    for library in ("transformers", "trl", "peft", "accelerate", "rlhf-pipeline"):
        assert re.search(rf"\| {library} \| \d", card), library


def test_front_matter_is_the_hub_libraries_model_card_data(hub_stages: Stages, tiny_model_dir: Path,
                                                            tmp_path: Path) -> None:
    from huggingface_hub import ModelCard, ModelCardData

    path = hub_stages.sft / "README.md"
    card = ModelCard.load(path)
    assert isinstance(card.data, ModelCardData)
    assert card.data.to_dict() == {
        "base_model": HUB_BASE, "library_name": "peft", "license": "apache-2.0", "pipeline_tag": "text-generation",
        "tags": ["rlhf", "trl", "peft", "lora", "sft"], "base_model_relation": "adapter"}
    assert card.text.startswith(model_card.CARD_MARKER + "\n")
    assert str(card) == path.read_text()  # the file is exactly what the library writes for this metadata

    # Hub datasets come from the data cards; a card that is not found is named in the body.
    (tmp_path / "data_cards").mkdir()
    (tmp_path / "data_cards" / "hub_pairs.yaml").write_text(yaml.safe_dump({
        "name": "hub_pairs", "description": "pairs on the Hub", "format": "prompt_chosen_rejected",
        "source": {"hub_id": "org/pairs", "subset": "en", "revision": "abc123", "split": "train"},
        "license": "MIT", "stages": ["rm"], "size": {"rows": 10}}))
    recipe = yaml.safe_load((hub_stages.sft / "recipe.yaml").read_text())
    recipe["data"].update(train=["hub_pairs"], eval=["hub_pairs", "missing"])
    text = model_card.render_model_card(hub_stages.sft, recipe=recipe, recipe_path=tmp_path / "recipe.yaml")
    data = ModelCard(text).data
    assert (data.datasets, data.license) == (["org/pairs"], "mit")
    assert ("- source: [org/pairs](https://huggingface.co/datasets/org/pairs), subset en, revision abc123, "
            "split train") in text and "- size: rows: 10" in text
    assert "### missing\n\nThe card was not found from here (" in text
    assert "License in the metadata: `mit`, from the data cards (MIT (hub_pairs))" in text

    # A full fine-tune is a transformers model; a base that is only a local folder is no Hub base_model.
    manifest = read_manifest(hub_stages.sft)
    full = ModelCard(model_card.render_model_card(hub_stages.sft, dataclasses.replace(manifest, adapter=False)))
    assert (full.data.library_name, full.data.base_model_relation) == ("transformers", "finetune")
    assert full.data.tags == ["rlhf", "trl", "sft"] and "MODEL = " in full.text
    local = dataclasses.replace(manifest, base_model={**manifest.base_model, "origin": str(tiny_model_dir)})
    local_card = ModelCard(model_card.render_model_card(hub_stages.sft, local))
    assert local_card.data.base_model is None and "base_model_relation" not in local_card.data.to_dict()
    assert "(a local folder, not on the Hub)" in local_card.text


def test_a_mixture_says_what_the_stage_took_of_each_card(hub_stages: Stages, tmp_path: Path) -> None:
    import shutil

    folder = shutil.copytree(hub_stages.sft, tmp_path / "sft")
    metrics = json.loads((folder / "metrics.json").read_text())
    metrics["data"]["sources"] = [
        {"card": "hh", "split": "train", "weight": 0.7, "rows_read": 120, "rows_kept": 100, "rows_taken": 70,
         "train_rows": 63, "eval_rows": 7},
        {"card": "shp", "split": "train", "weight": 0.3, "rows_read": 30, "rows_kept": 30, "rows_taken": 30,
         "train_rows": 27, "eval_rows": 3}]
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (tmp_path / "data_cards").mkdir()
    for name in ("hh", "shp"):
        (tmp_path / "data_cards" / f"{name}.yaml").write_text(yaml.safe_dump({
            "name": name, "description": f"{name} pairs", "format": "prompt_chosen_rejected",
            "source": {"path": f"{name}.jsonl"}, "license": "MIT", "stages": ["rm"]}))
    recipe = yaml.safe_load((folder / "recipe.yaml").read_text())
    recipe["data"]["train"] = [{"card": "hh", "weight": 0.7}, {"card": "shp", "weight": 0.3}]
    text = model_card.render_model_card(folder, recipe=recipe, recipe_path=tmp_path / "recipe.yaml")
    assert "### hh\n" in text and "### shp\n" in text
    assert "- used by this stage: 70 of its 100 usable rows (weight 0.7): train 63, eval 7\n" in text
    assert "- used by this stage: 30 of its 30 usable rows (weight 0.3): train 27, eval 3\n" in text
    plain = model_card.render_model_card(hub_stages.sft)  # one card, no mixture: no such line
    assert "used by this stage" not in plain


def test_card_blanks_anything_shaped_like_a_token(hub_stages: Stages) -> None:
    recipe = yaml.safe_load((hub_stages.sft / "recipe.yaml").read_text())
    recipe["training"]["run_name"] = FAKE_TOKEN  # pasted into a free-text field by mistake
    text = model_card.render_model_card(hub_stages.sft, recipe=recipe)
    assert FAKE_TOKEN not in text and "run_name: hf_***" in text
    assert model_card.redact(f"Bearer {FAKE_TOKEN}.") == "Bearer hf_***."


def test_chain_card_loads_the_chain_with_its_own_adapter_alone(hub_stages: Stages, tiny_model_dir: Path,
                                                                capsys) -> None:
    from rlhf_pipeline.adapters import load_frozen_roles
    from rlhf_pipeline.models import load_tokenizer
    from rlhf_pipeline.recipe import ModelSpec
    from rlhf_pipeline.sources import resolve_source

    card = (hub_stages.chain / "README.md").read_text()
    assert front_matter(card)["base_model"] == HUB_BASE
    assert "started as a copy of it" in card
    assert f"`{short_sha(hub_stages.sft / 'adapter_model.safetensors')}`" in card
    code = code_block(card, "python")
    assert code.count("PeftModel.from_pretrained") == 1 and "merge" not in code
    assert "revision='exp'" in code  # the recipe pushes it to me/tiny-chain@exp
    namespace = run_snippet(card, {"me/tiny-chain": str(hub_stages.chain), HUB_BASE: str(tiny_model_dir)}, capsys)

    spec = ModelSpec(name_or_path=str(hub_stages.chain))
    source = resolve_source(spec)
    assert source.adapter == str(hub_stages.chain.resolve())
    assert source.lineage == [str(hub_stages.sft.resolve()), str(hub_stages.chain.resolve())]
    shared = load_frozen_roles({"chain": source}, spec, load_tokenizer(source, spec))["chain"]
    torch.testing.assert_close(logits(namespace["model"]), logits(shared.use("chain")), atol=1e-5, rtol=0)


def test_reward_model_card_snippet_scores_like_the_stage(hub_reward_model: Path, tiny_model_dir: Path,
                                                         capsys) -> None:
    from rlhf_pipeline.reward import RewardModel

    card = (hub_reward_model / "README.md").read_text()
    meta = front_matter(card)
    assert meta["pipeline_tag"] == "text-classification" and "reward-model" in meta["tags"]
    assert "AutoModelForSequenceClassification.from_pretrained(BASE, num_labels=1)" in card
    assert "Reward statistics over the training answers" in card
    local = shown_path(hub_reward_model, home=False)
    namespace = run_snippet(card, {local: str(hub_reward_model), HUB_BASE: str(tiny_model_dir)}, capsys)

    expected = RewardModel.from_stage(hub_reward_model).score([SNIPPET_PROMPT], [SNIPPET_ANSWER])[0]
    assert namespace["reward"] == pytest.approx(expected, abs=1e-4)
