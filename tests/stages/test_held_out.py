"""Held out means held out: eval splits are carved by prompt, so no eval prompt is ever trained on.

A ranked card (four scored answers per prompt, every pair kept) gives six pairs per prompt: a row split put
most eval prompts in training too (87% of the demo's RM eval pairs). Here every stage that carves its eval set
from its training cards (rm, dpo, kto, the rule RM) is checked on the prompts themselves.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from datasets import Dataset
from transformers import AutoTokenizer

from rlhf_pipeline.data.loading import load_datasets, prompt_key, sample_prompts, split_by_prompt
from rlhf_pipeline.errors import RecipeError
from rlhf_pipeline.stages import load_recipe
from tests.stages.conftest import RecipeFactory, write_card

ANSWERS = ["A lovely, sunny answer!", "A fine answer.", "An answer.", "A dreary, awful answer."]


def ranked_rows(prompts: int = 20) -> list[dict[str, Any]]:
    """Four scored answers per prompt: six pairs each with `pairs: all`, as the label stage's ranking gives."""
    return [{"prompt": f"How was day {i}?", "answers": [f"{a} ({i})" for a in ANSWERS],
             "scores": [0.9, 0.5, -0.1, -0.8]} for i in range(prompts)]


def classified_rows(prompts: int = 20) -> list[dict[str, Any]]:
    """Three answers per prompt, each labelled by a rule (1 = broken), as label's `writes: classification` gives."""
    return [{"prompt": f"How was day {i}?", "answer": f"{answer} ({i})", "label": int(k == 2)}
            for i in range(prompts) for k, answer in enumerate(ANSWERS[:3])]


def prompts_of(rows: Any) -> list[str]:
    return [prompt_key(row["prompt"]) for row in rows]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny_model_dir)


STAGES = {  # stage -> (card format, rows, model: the tiny base or the SFT stage, data keys)
    "rm": ("ranking", ranked_rows, "base", {}),
    "dpo": ("ranking", ranked_rows, "sft", {}),
    "kto": ("ranking", ranked_rows, "sft", {"unpair": True}),
    "rule-rm": ("classification", classified_rows, "base", {}),
}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_no_eval_prompt_is_trained_on(stage: str, tmp_path: Path, make_recipe: RecipeFactory, tokenizer: Any,
                                      sft_and_rm: tuple[Path, Path]) -> None:
    fmt, rows, model, data = STAGES[stage]
    card = write_card(tmp_path, "ranked", rows(), fmt, ["rm", "dpo", "kto"])
    if fmt == "classification":
        card.write_text(card.read_text() + "violation_when: true\n")
    model_dir = {"base": None, "sft": str(sft_and_rm[0])}[model]
    recipe = load_recipe(make_recipe("rm" if stage == "rule-rm" else stage, ["ranked"], name=stage,
                                     data={"train": ["ranked"], "eval_split": 0.25, "max_length": 128} | data,
                                     **({"model": {"name_or_path": model_dir}} if model_dir else {})))
    datasets, report = load_datasets(recipe, tokenizer)
    train, held_out = prompts_of(datasets["train"]), prompts_of(datasets["eval"])
    assert held_out and not set(held_out) & set(train)
    assert len(set(held_out)) == 5 and len(set(train)) == 15  # a quarter of the 20 prompts, each with all its rows
    per_prompt = {"rm": 6, "dpo": 6, "kto": 2, "rule-rm": 3}[stage]  # kto: best and worst (B, C are both)
    assert len(held_out) == 5 * per_prompt and len(train) == 15 * per_prompt
    assert report.splits == {"train": {"rows": 15 * per_prompt, "prompts": 15},
                             "eval": {"rows": 5 * per_prompt, "prompts": 5}}


def test_distinct_prompts_split_exactly_as_rows_did() -> None:
    """With one row per prompt (SFT demonstrations, prompt sets) the split is the seeded row split it replaces."""
    rows = [{"prompt": [{"role": "user", "content": f"Q{i}"}], "n": i} for i in range(50)]
    train, held_out = split_by_prompt(rows, 0.15, seed=42)
    by_rows = Dataset.from_list(rows).train_test_split(test_size=0.15, seed=42)
    assert [row["n"] for row in train] == by_rows["train"]["n"]
    assert [row["n"] for row in held_out] == by_rows["test"]["n"]
    assert [row["n"] for row in sample_prompts(rows, 7, seed=3)] == Dataset.from_list(rows).shuffle(seed=3)["n"][:7]


def test_max_samples_takes_whole_prompts(tmp_path: Path, make_recipe: RecipeFactory, tokenizer: Any) -> None:
    write_card(tmp_path, "ranked", ranked_rows(), "ranking", ["rm"])
    recipe = load_recipe(make_recipe("rm", ["ranked"], data={"train": ["ranked"], "eval_split": 0.0,
                                                             "max_length": 128, "max_samples": 20}))
    datasets, _ = load_datasets(recipe, tokenizer)
    kept = prompts_of(datasets["train"])
    assert len(kept) == 18 and all(kept.count(prompt) == 6 for prompt in kept)  # three whole prompts, none cut
    with pytest.raises(RecipeError, match=r"data\.max_samples: 5 rows is fewer than any one prompt has"):
        load_datasets(load_recipe(make_recipe("rm", ["ranked"], name="tiny", data={
            "train": ["ranked"], "eval_split": 0.0, "max_length": 128, "max_samples": 5})), tokenizer)


@pytest.mark.parametrize("overlap", ["warn", "drop", "error"])
def test_eval_cards_sharing_prompts_with_training(overlap: str, tmp_path: Path, make_recipe: RecipeFactory,
                                                  tokenizer: Any) -> None:
    rows = ranked_rows(8)
    write_card(tmp_path, "train_pairs", rows, "ranking", ["rm"])
    write_card(tmp_path, "eval_pairs", rows[6:] + ranked_rows(12)[8:], "ranking", ["rm"])  # 2 of 6 also trained on
    recipe = load_recipe(make_recipe("rm", ["train_pairs"], data={
        "train": ["train_pairs"], "eval": ["eval_pairs"], "max_length": 128, "eval_overlap": overlap}))
    if overlap == "error":
        with pytest.raises(RecipeError, match=r"data\.eval: 2 of the 6 eval prompts also occur in the train cards"):
            load_datasets(recipe, tokenizer)
        return
    datasets, report = load_datasets(recipe, tokenizer)
    assert report.eval_prompts_in_train == 2
    shared = set(prompts_of(datasets["train"])) & set(prompts_of(datasets["eval"]))
    assert len(shared) == (2 if overlap == "warn" else 0)
    assert report.splits["train"] == {"rows": 6 * (8 if overlap == "warn" else 6),
                                      "prompts": 8 if overlap == "warn" else 6}
    assert "2 eval prompts also in train" in report.summary()


def test_a_bad_eval_overlap_names_the_key(tmp_path: Path, make_recipe: RecipeFactory) -> None:
    write_card(tmp_path, "pairs", ranked_rows(4), "ranking", ["rm"])
    with pytest.raises(RecipeError, match=r"data\.eval_overlap: warn .*, drop .* or error"):
        load_recipe(make_recipe("rm", ["pairs"], data={"train": ["pairs"], "eval_overlap": "ignore"}))


def test_kto_labels_each_answer_once_and_counts_the_middle_ones(tmp_path: Path, make_recipe: RecipeFactory,
                                                                 tokenizer: Any, sft_and_rm: tuple[Path, Path]) -> None:
    """The label stage's pairs for scores A .9, B .5, C -.1, D -.8 at min_gap .5, for two prompts."""
    pairs = [("A", "C"), ("A", "D"), ("B", "C"), ("B", "D"), ("C", "D")]
    rows = [{"prompt": f"Q{q}", "chosen": f"{chosen}{q}", "rejected": f"{rejected}{q}"}
            for q in range(2) for chosen, rejected in pairs]
    write_card(tmp_path, "pairs", rows, "prompt_chosen_rejected", ["kto"])
    recipe = load_recipe(make_recipe("kto", ["pairs"], model={"name_or_path": str(sft_and_rm[0])},
                                     data={"train": ["pairs"], "eval_split": 0.0, "max_length": 128, "unpair": True}))
    datasets, report = load_datasets(recipe, tokenizer)
    answers = [(row["completion"][0]["content"], row["label"]) for row in datasets["train"]]
    assert answers == [("A0", True), ("D0", False), ("B0", True), ("A1", True), ("D1", False), ("B1", True)]
    assert report.as_dict()["rows_dropped"] == {"chosen_and_rejected": 2}
    assert report.as_dict()["first_dropped"]["chosen_and_rejected"] == ["pairs:line 1", "pairs:line 6"]
    assert json.dumps(report.as_dict())  # the report stays JSON for stage.json


class _Captured(Exception):
    """Raised by the stand-in trainer once it has seen the prompts PPO would train on."""


def test_ppo_trains_on_no_eval_prompt(tmp_path: Path, tokenizer: Any,
                                      sft_and_rm: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from rlhf_pipeline.ppo import trainer
    from rlhf_pipeline.stages import ppo

    seen: list[str] = []

    def capture(config: Any, model: Any, reward_fn: Any, tokenizer: Any, prompts: list[list[int]], **_: Any) -> None:
        seen.extend(tokenizer.decode(ids) for ids in prompts)
        raise _Captured

    monkeypatch.setattr(trainer, "PPOTrainer", capture)
    write_card(tmp_path, "prompts", [{"prompt": f"Tell me about topic {i}."} for i in range(16)], "prompt_only",
               ["ppo"])
    sft, rm = sft_and_rm
    path = tmp_path / "ppo.yaml"
    path.write_text(yaml.safe_dump({
        "stage": "ppo", "model": {"name_or_path": str(sft), "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0}},
        "data": {"train": ["prompts"], "eval_split": 0.25, "max_length": 64},
        "training": {"output_dir": str(tmp_path / "ppo"), "reward_model_path": str(rm), "response_length": 4}}))
    recipe = load_recipe(path)
    with pytest.raises(_Captured):
        ppo.run(recipe)
    held_out = [tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
                for row in load_datasets(recipe, tokenizer, prompts_only=True)[0]["eval"]]
    assert len(seen) == 12 and len(held_out) == 4
    assert not {text.strip() for text in seen} & {text.strip() for text in held_out}
    assert all("topic" in text for text in seen)
