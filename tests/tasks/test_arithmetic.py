"""The arithmetic task: its seeded generator and shipped files, the step parser and the verifiers on hand-made
right, wrong and malformed solutions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rlhf_pipeline.tasks.answers import outcome
from rlhf_pipeline.tasks.arithmetic import SPLITS, generate, main, parse_step, step_labels, steps

REPO = Path(__file__).resolve().parents[2]
PROBLEM = "Tom has 23 apples. He buys 48 more. Then he gives away 17. How many apples does Tom have now?"
REFERENCE = "23 + 48 = 71\n71 - 17 = 54\nThe answer is 54."
PROMPT = [{"role": "user", "content": PROBLEM}]


def test_the_shipped_files_are_what_the_seeded_script_writes(tmp_path: Path) -> None:
    main([str(tmp_path), "--seed", "0"])
    for name in ("sft", "prompts", "heldout"):
        shipped = REPO / "data" / "arithmetic" / f"{name}.jsonl"
        assert (tmp_path / f"{name}.jsonl").read_bytes() == shipped.read_bytes()


def test_splits_are_disjoint_by_arithmetic_and_every_reference_verifies() -> None:
    splits = generate(0)
    assert {name: len(problems) for name, problems in splits.items()} == SPLITS
    seen = [{problem.arithmetic for problem in problems} for problems in splits.values()]
    assert sum(map(len, seen)) == len(set().union(*seen)) == sum(SPLITS.values())  # no problem in two splits
    shipped = [json.loads(line) for line in (REPO / "data" / "arithmetic" / "heldout.jsonl").read_text().splitlines()]
    texts = {row["prompt"] for row in shipped}
    assert len(texts) == 200 and not texts & {p.text() for p in splits["sft"] + splits["prompts"]}
    for problem in splits["heldout"] + splits["sft"][:50]:
        solution = problem.solution()
        assert 3 <= len(solution.splitlines()) <= 4  # 2 or 3 steps and the answer line
        assert step_labels(problem.text(), solution, solution) == [True] * len(solution.splitlines())
        assert steps([problem.text()], [solution]) == [1.0]
        assert all(int(line.split(" = ")[1]) >= 1 for line in solution.splitlines()[:-1])


def test_parse_step_reads_a_op_b_equals_c_and_nothing_else() -> None:
    assert parse_step("71 - 17 = 54") == (71, "-", 17, 54)
    assert parse_step(" 12 x 3 = 36.") == (12, "*", 3, 36)
    assert parse_step("12 × 3 = 36") == (12, "*", 3, 36)
    for line in ("The answer is 54.", "71 - 17 is 54", "71 - = 54", "seventy-one minus 17 = 54", ""):
        assert parse_step(line) is None, line


@pytest.mark.parametrize(("solution", "labels", "verifies", "right"), [
    (REFERENCE, [True, True, True], 1.0, 1.0),
    # an arithmetic slip: every later step is wrong too, however true its own arithmetic
    ("23 + 48 = 61\n61 - 17 = 44\nThe answer is 44.", [False, False, False], 0.0, 0.0),
    # true arithmetic, wrong operation (adds what was given away): only the reference can tell
    ("23 + 48 = 71\n71 + 17 = 88\nThe answer is 88.", [True, False, False], 1.0, 0.0),
    # a number from nowhere
    ("23 + 50 = 73\n73 - 19 = 54\nThe answer is 54.", [False, False, False], 0.0, 1.0),
    # the answer line disagrees with the last result
    ("23 + 48 = 71\n71 - 17 = 54\nThe answer is 55.", [True, True, False], 0.0, 0.0),
    # malformed: prose, a missing answer line, an empty answer
    ("I add them up and get 54.\nThe answer is 54.", [False, False], 0.0, 1.0),
    ("23 + 48 = 71\n71 - 17 = 54", [True, True], 0.0, 0.0),
    ("", [], 0.0, 0.0),
])
def test_step_verifier_and_reward_functions_on_hand_made_solutions(solution: str, labels: list[bool],
                                                                   verifies: float, right: float) -> None:
    assert step_labels(PROBLEM, solution, REFERENCE) == labels
    assert steps([PROMPT], [solution]) == [verifies]
    assert outcome([PROMPT], [solution], [REFERENCE]) == [right]


def test_without_a_reference_the_step_verifier_checks_arithmetic_and_sources_only() -> None:
    wrong_operation = "23 + 48 = 71\n71 + 17 = 88\nThe answer is 88."
    assert step_labels(PROBLEM, wrong_operation) == [True, True, True]
    assert step_labels(PROMPT, wrong_operation, REFERENCE) == [True, False, False]  # a chat prompt works too
