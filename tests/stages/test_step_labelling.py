"""Step labels (label with `writes: steps`): Math-Shepherd's estimate against an exact enumeration of a toy policy,
its agreement with a verifier, and the label stage writing stepwise and outcome cards on the tiny model."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import yaml

from rlhf_pipeline.errors import RecipeError
from rlhf_pipeline.stages import label, load_recipe
from rlhf_pipeline.stages.step_labelling import agreement, mc_step_labels
from rlhf_pipeline.steps import split_steps
from rlhf_pipeline.tasks.answers import outcome
from rlhf_pipeline.tasks.arithmetic import generate, step_labels
from tests.stages.conftest import write_card, write_recipe

PROBLEMS = generate(0, {"toy": 3})["toy"]  # three seeded problems of 2-4 operations


def toy_continue(problem, prefix: str) -> list[str]:
    """Every continuation a toy policy can write after `prefix`, equally likely: each remaining operation is done
    right or off by one, independently (2^r continuations for r operations left)."""
    done = len(split_steps(prefix))
    total = int(split_steps(prefix)[-1].split(" = ")[1])
    left = problem.operations[done:]
    out = []
    for slips in itertools.product([False, True], repeat=len(left)):
        lines, running = [], total
        for (operator, amount), slip in zip(left, slips, strict=True):
            result = (running + amount if operator == "+" else running - amount) + slip
            lines.append(f"{running} {operator} {amount} = {result}")
            running = result
        out.append("\n".join([*lines, f"The answer is {running}."]))
    return out


def exact_label(problem, steps: list[str], i: int) -> float:
    """P(a continuation of the first i+1 steps reaches the right answer), by enumerating the toy policy."""
    chat = [{"role": "user", "content": problem.text()}]
    if i == len(steps) - 1:
        return outcome([chat], ["\n".join(steps)], [problem.solution()])[0]
    prefix = "\n".join(steps[: i + 1]) + "\n"
    continuations = toy_continue(problem, prefix)
    return sum(outcome([chat] * len(continuations), [prefix + c for c in continuations],
                       [problem.solution()] * len(continuations))) / len(continuations)


def test_math_shepherd_labels_equal_an_exact_enumeration_of_a_toy_policy() -> None:
    rollouts = 8  # 2^3 continuations at most: each prefix's list, cycled, is exactly its distribution
    solutions, chats = [], []
    for problem in PROBLEMS:
        right = split_steps(problem.solution())
        slipped = [right[0].rsplit(" ", 1)[0] + f" {int(right[0].rsplit(' ', 1)[1]) + 1}", *right[1:]]
        for steps in (right, slipped):
            solutions.append(steps)
            chats.append([{"role": "user", "content": problem.text()}])
    owners = [problem for problem in PROBLEMS for _ in range(2)]
    references = {chat[0]["content"]: p.solution() for chat, p in zip(chats, owners, strict=True)}

    def complete(prompts, prefixes, k):
        problems = {p.text(): p for p in PROBLEMS}
        return [(toy_continue(problems[chat[0]["content"]], prefix) * k)[:k] for chat, prefix in zip(prompts, prefixes,
                                                                                                      strict=True)]

    def check(prompts, answers):
        return outcome(prompts, answers, [references[chat[0]["content"]] for chat in prompts])

    labels = mc_step_labels(chats, solutions, complete, check, rollouts)
    expected = [[exact_label(problem, steps, i) for i in range(len(steps))]
                for problem, steps in zip(owners, solutions, strict=True)]
    assert labels == expected
    right_solution = labels[0]
    assert right_solution[-1] == 1.0 and 0 < right_solution[0] < 1  # a right prefix can still go wrong
    slipped, problem = solutions[1], owners[1]
    assert labels[1][0] == 0.0  # nothing reaches the right answer from the slipped step
    # The slipped solution's later steps copy the right numbers, so rollouts from them can reach the right answer:
    # MC credits steps that follow an error, which the verifier calls wrong (the noise MC labels carry).
    assert labels[1][-1] == 1.0 and step_labels(problem.text(), "\n".join(slipped), problem.solution()) == [
        False] * len(slipped)


def test_agreement_counts_precision_and_recall_per_class() -> None:
    mc = [[1.0, 0.5, 0.0], [0.0, 0.25]]  # hard: good, good, wrong | wrong, good
    verifier = [[True, False, False], [False, False]]
    result = agreement(mc, verifier)
    assert result["steps"] == 5 and result["agreement"] == pytest.approx(3 / 5)
    assert result["good"] == {"precision": pytest.approx(1 / 3), "recall": 1.0, "support": 1}
    assert result["wrong"] == {"precision": 1.0, "recall": pytest.approx(2 / 4), "support": 4}
    assert result["soft_on_good"] == 1.0 and result["soft_on_wrong"] == pytest.approx((0.5 + 0.0 + 0.0 + 0.25) / 4)


def _arithmetic_cards(folder: Path) -> None:
    problems = generate(3, {"x": 8})["x"]
    write_card(folder, "problems", [{"prompt": p.text(), "reference": p.solution()} for p in problems], "prompt_only",
               ["label"])


def test_label_writes_step_labelled_solutions_and_outcomes(tmp_path: Path, tiny_model_dir: Path) -> None:
    _arithmetic_cards(tmp_path)
    path = write_recipe(tmp_path, tiny_model_dir, "label", ["problems"], name="label",
                        judge={"type": "callable", "function": "rlhf_pipeline.tasks.answers:outcome"},
                        data={"train": ["problems"], "eval_split": 0.0, "max_length": 256})
    recipe_text = yaml.safe_load(path.read_text())
    recipe_text["labelling"] = recipe_text.pop("training") | {
        "writes": "steps", "step_verifier": "rlhf_pipeline.tasks.arithmetic:step_labels", "mc_rollouts": 2,
        "num_samples": 2, "max_new_tokens": 12, "eval_split": 0.25}
    for key in ("num_train_epochs", "per_device_train_batch_size", "per_device_eval_batch_size", "learning_rate",
                "logging_steps", "save_steps", "eval_strategy", "report_to"):
        recipe_text["labelling"].pop(key)
    path.write_text(yaml.safe_dump(recipe_text))
    recipe = load_recipe(path)
    metrics = label.run(recipe)

    out = recipe.output_dir
    counts = metrics["counts"]
    assert metrics["step_labels"] == "verifier" and counts["prompts"] == 8 and counts["held_out_prompts"] == 2
    solutions = [json.loads(line) for line in (out / "solutions.jsonl").read_text().splitlines()]
    assert len(solutions) == counts["solutions"] and counts["steps"] == sum(len(split_steps(s["answer"]))
                                                                            for s in solutions)
    for solution in solutions:  # the verifier's labels, as the task's verifier gives them
        chat = solution["prompt"]
        reference = next(p.solution() for p in generate(3, {"x": 8})["x"] if p.text() == chat[-1]["content"])
        assert solution["labels"]["verifier"] == [float(g) for g in step_labels(chat, solution["answer"], reference)]
        assert len(solution["labels"]["mc_soft"]) == len(solution["labels"]["verifier"])
    stepwise = [json.loads(line) for line in (out / "stepwise.jsonl").read_text().splitlines()]
    held = [json.loads(line) for line in (out / "stepwise_eval.jsonl").read_text().splitlines()]
    assert len(stepwise) + len(held) == len(solutions) == counts["solutions"]
    assert not {json.dumps(r["prompt"]) for r in stepwise} & {json.dumps(r["prompt"]) for r in held}  # by problem
    outcomes = [json.loads(line) for line in (out / "outcomes.jsonl").read_text().splitlines()]
    assert all(row["label"] == int(not s["right"]) for row, s in zip(outcomes, [s for s in solutions if json.dumps(
        s["prompt"]) in {json.dumps(r["prompt"]) for r in stepwise}], strict=True))
    card = yaml.safe_load((out / "data_card.yaml").read_text())
    assert card["format"] == "stepwise" and card["size"]["rows"] == len(stepwise)
    assert yaml.safe_load((out / "data_card_outcomes.yaml").read_text())["format"] == "classification"
    assert metrics["mc_vs_verifier"]["steps"] == counts["steps"]
    assert "solutions of 8 prompts" in (out / "report.md").read_text()

    # The card it wrote is what a prm recipe names.
    prm_path = write_recipe(tmp_path, tiny_model_dir, "prm", [str(out / "data_card.yaml")], name="prm",
                            data={"train": [str(out / "data_card.yaml")], "eval": [str(out / "data_card_eval.yaml")]})
    assert [c.format for c in load_recipe(prm_path).cards] == ["stepwise", "stepwise"]


def test_writes_steps_needs_a_way_to_label_steps(tmp_path: Path, tiny_model_dir: Path) -> None:
    _arithmetic_cards(tmp_path)
    base = {"stage": "label", "model": {"name_or_path": str(tiny_model_dir)}, "data": {"train": ["problems"]},
            "judge": {"type": "callable", "function": "rlhf_pipeline.tasks.answers:outcome"}}
    for labelling, message in [
        ({"writes": "steps"}, r"labelling\.step_verifier: writes: steps labels steps with a step verifier"),
        ({"writes": "steps", "mc_rollouts": 2, "step_labels": "verifier"}, r"labelling\.step_labels: one of mc_hard, "
                                                                            r"mc_soft"),
        ({"writes": "steps", "step_verifier": "no_such_module:f"}, r"labelling\.step_verifier: 'no_such_module:f'"),
    ]:
        path = tmp_path / "label.yaml"
        path.write_text(yaml.safe_dump(base | {"labelling": {"output_dir": str(tmp_path / "out")} | labelling}))
        with pytest.raises(RecipeError, match=message):
            load_recipe(path)
