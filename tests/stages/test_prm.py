"""The prm stage on the tiny model: labels on the step-ending tokens only, a trivial step rule learnt and measured on
other problems, validate and estimate; and the finished PRM read back as a scorer. (Resume after SIGTERM:
tests/test_interruption.py; two-process DDP and ZeRO-2: tests/test_distributed.py.)"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from rlhf_pipeline.errors import RecipeError
from rlhf_pipeline.outputs import read_manifest
from rlhf_pipeline.stages import load_recipe, prm
from tests.stages.conftest import preference_rows, stepwise_rows, write_card


def test_labels_sit_on_the_step_ending_tokens_and_nowhere_else(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    from rlhf_pipeline.chat import encode_prompt

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = [{"role": "user", "content": "Add them up."}]
    steps = ["12 + 30 = 42", "42 - 2 = 40", "The answer is 40."]
    encoded = prm.encode_solution(tokenizer, prompt, steps, [1.0, 0.0, 0.25])
    ids, labels = encoded["input_ids"], encoded["labels"]
    assert len(ids) == len(labels)
    labelled = [index for index, label in enumerate(labels) if label != prm.IGNORED]
    newline = tokenizer.convert_tokens_to_ids("Ċ")  # byte-level BPE's "\n"
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert [ids[index] for index in labelled] == [newline, newline, end_of_turn]
    assert labelled[-1] == len(ids) - 1  # the last step ends on the answer's end-of-turn token
    assert [labels[index] for index in labelled] == [1.0, 0.0, 0.25]
    # Every other newline or end-of-turn token (the prompt's template has several) carries no label.
    prompt_length = len(encode_prompt(tokenizer, prompt))
    assert all(label == prm.IGNORED for label in labels[:prompt_length])
    assert sum(1 for token in ids if token in (newline, end_of_turn)) > 3
    assert tokenizer.decode(ids[prompt_length:]) == "12 + 30 = 42\n42 - 2 = 40\nThe answer is 40.<|im_end|>"


def test_the_prm_learns_a_trivial_step_rule_on_held_out_problems(make_recipe, tmp_path: Path) -> None:
    write_card(tmp_path, "steps", stepwise_rows(192), "stepwise", ["prm"])
    write_card(tmp_path, "steps_eval", stepwise_rows(32, offset=1000, seed=1), "stepwise", ["prm"])
    recipe = load_recipe(make_recipe("prm", ["steps"], {"num_train_epochs": 4, "learning_rate": 5e-3},
                                     data={"train": ["steps"], "eval": ["steps_eval"], "max_length": 160}))
    metrics = prm.run(recipe)

    held_out = metrics["eval"]
    assert held_out["solutions"] == 32 and held_out["steps"] == sum(len(r["steps"]) for r in stepwise_rows(32, 1000, 1))
    assert metrics["eval_step_accuracy"] >= 0.97
    assert metrics["eval_auroc"] >= 0.99
    assert metrics["eval_first_error_accuracy"] >= 0.9
    assert 0 < held_out["good_step_rate"] < 1 and metrics["held_out_split"] == "eval cards"
    manifest = read_manifest(recipe.output_dir)
    assert manifest.stage == "prm" and manifest.task == "reward" and manifest.extra == {"objective": "process"}
    report = (recipe.output_dir / "report.md").read_text()
    assert "held-out step accuracy" in report and "first-error accuracy" in report
    card = (recipe.output_dir / "README.md").read_text()
    assert "process-reward-model" in card and "P(step right)" in card

    # Read back as every stage reads it: the same P(right) per step as the stage measured on its held-out rows.
    from rlhf_pipeline.process_reward import ProcessRewardModel, aggregate

    scorer = ProcessRewardModel.from_stage(recipe.output_dir)
    rows = stepwise_rows(32, offset=1000, seed=1)[:6]
    read = scorer.step_probabilities([[{"role": "user", "content": row["prompt"]}] for row in rows],
                                     ["\n".join(row["steps"]) for row in rows])
    measured = [[1 / (1 + math.exp(-score)) for score in scores] for scores in held_out["scores"][:6]]
    assert [len(p) for p in read] == [len(row["steps"]) for row in rows]
    for mine, theirs in zip(read, measured, strict=True):
        assert mine == pytest.approx(theirs, abs=1e-4)
    # The model card's snippet reads the same numbers with plain transformers + peft.
    from tests.hub_stages import code_block

    namespace: dict = {}
    exec(compile(code_block(card, "python"), "model-card-snippet", "exec"), namespace)
    problem = [{"role": "user", "content": namespace["problem"]}]
    assert namespace["probabilities"] == pytest.approx(scorer.step_probabilities([problem], [namespace["answer"]])[0],
                                                       abs=1e-4)
    assert len(namespace["probabilities"]) == 3
    wrong = next(p for p, row in zip(read, rows, strict=True) if not all(row["labels"]))
    assert aggregate(wrong, "min") == min(wrong) < 0.5 and aggregate(wrong, "last") == wrong[-1]
    assert aggregate(wrong, "product") == pytest.approx(math.prod(wrong))
    assert aggregate(wrong, "dense") == pytest.approx(sum(math.log(p) for p in wrong))


def test_validate_refuses_cards_that_are_not_stepwise(make_recipe, tmp_path: Path) -> None:
    write_card(tmp_path, "pairs", preference_rows(8), "prompt_chosen_rejected", ["rm"])
    path = make_recipe("prm", ["pairs"], data={"train": ["pairs"]})
    with pytest.raises(RecipeError, match=r"data\.train\[0\]: card 'pairs' has format 'prompt_chosen_rejected', but "
                                          r"the prm stage takes math_shepherd, prm800k, stepwise there"):
        load_recipe(path)


def test_estimate_knows_the_prm_stage(make_recipe, tmp_path: Path) -> None:
    """One solution forwards one sequence with the RM's score head: half the activations of the rm stage's pairs."""
    from rlhf_pipeline.estimate import estimate_recipe

    write_card(tmp_path, "steps", stepwise_rows(8), "stepwise", ["prm"])
    write_card(tmp_path, "pairs", preference_rows(8), "prompt_chosen_rejected", ["rm"])
    process, pairwise = (estimate_recipe(make_recipe(stage, [card])) for stage, card in (("prm", "steps"),
                                                                                      ("rm", "pairs")))
    rows = {name: {row.name: row for row in e.rows} for name, e in (("prm", process), ("rm", pairwise))}
    assert process.setup.stage == "prm" and process.setup.memory_model.head == "score"
    assert rows["prm"]["activations"].detail == "8 × 128 tokens, checkpointed"
    assert rows["prm"]["activations"].bytes * 2 == rows["rm"]["activations"].bytes
    assert rows["prm"]["LoRA parameters"].bytes == rows["rm"]["LoRA parameters"].bytes  # adapter + score head
