"""Multi-step arithmetic word problems with checkable steps: the shipped verifiable task, and its verifiers.

    python -m rlhf_pipeline.tasks.arithmetic data/arithmetic --seed 0    # rewrites the shipped files

"Tom has 23 apples. He buys 48 more. Then he gives away 17. How many apples does Tom have now?" is solved
one step per line, each step `a op b = c`, then a last line "The answer is N." (2 or 3 operations, a start up
to 50, amounts up to 30):

    23 + 48 = 71
    71 - 17 = 54
    The answer is 54.

The generator is seeded and writes three files whose problems are disjoint by their arithmetic (the start
and every operation, whatever the names and items): SFT demonstrations (prompt, completion), RL prompts and
held-out problems (prompt, reference = the worked solution), each with a card in data_cards/.

Verifiers: `steps` (a reward function: 1 when every step is true arithmetic on numbers of the problem or of
earlier steps and the last line restates the last result) and `step_labels` (the label stage's step
verifier: each step right or wrong against the reference's worked solution; the first wrong step makes
every later one wrong, as PRM800K stops at the first error). The outcome check is tasks/answers.py's.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rlhf_pipeline.steps import join_steps, split_steps
from rlhf_pipeline.tasks.answers import final_answer, reference_answer

NAMES = (("Tom", "he"), ("Anna", "she"), ("Ben", "he"), ("Maria", "she"), ("Sam", "he"), ("Lucy", "she"),
         ("Omar", "he"), ("Grace", "she"), ("Leo", "he"), ("Nina", "she"), ("Jack", "he"), ("Emma", "she"),
         ("Ravi", "he"), ("Sofia", "she"), ("Max", "he"), ("Chloe", "she"))
ITEMS = ("apples", "marbles", "stickers", "coins", "stamps", "shells", "cards", "beads", "pencils", "books",
         "crayons", "buttons")
GAINS = ("buys {n} more", "finds {n} more", "gets {n} more from a friend", "wins {n} more")
LOSSES = ("gives away {n}", "loses {n}", "sells {n}", "trades away {n}")
LINKS = ("Then", "After that", "Later", "Next")
SPLITS = {"sft": 600, "prompts": 320, "heldout": 200}  # problems per file


@dataclass(frozen=True)
class Problem:
    """A start and a chain of additions and subtractions, told as a story about someone's items."""

    name: str
    pronoun: str
    items: str
    start: int
    operations: tuple[tuple[str, int], ...]  # ("+", 48), ("-", 17), ...
    wordings: tuple[str, ...]  # one verb phrase per operation
    links: tuple[str, ...]

    @property
    def arithmetic(self) -> tuple[int, tuple[tuple[str, int], ...]]:
        """What makes two problems the same problem, whatever the story around it."""
        return self.start, self.operations

    def text(self) -> str:
        sentences = [f"{self.name} has {self.start} {self.items}."]
        for index, (wording, (_, amount)) in enumerate(zip(self.wordings, self.operations, strict=True)):
            subject = self.pronoun.capitalize() if index == 0 else f"{self.links[index - 1]} {self.pronoun}"
            sentences.append(f"{subject} {wording.format(n=amount)}.")
        sentences.append(f"How many {self.items} does {self.name} have now?")
        return " ".join(sentences)

    def steps(self) -> list[str]:
        total, lines = self.start, []
        for operator, amount in self.operations:
            result = total + amount if operator == "+" else total - amount
            lines.append(f"{total} {operator} {amount} = {result}")
            total = result
        return [*lines, f"The answer is {total}."]

    def solution(self) -> str:
        return join_steps(self.steps())


def make_problem(rng: random.Random, max_start: int = 50, max_amount: int = 30) -> Problem:
    """A problem of 2 or 3 operations on numbers up to two digits whose running total never drops below 1.

    Sized for SmolLM2-135M after SFT (held-out accuracy well above 0 and well below 1); 2-4 operations on numbers
    up to 99 left it at 20% greedy, too little for RL to build on in the demo's budget.
    """
    name, pronoun = rng.choice(NAMES)
    start = total = rng.randint(10, max_start)
    operations, wordings = [], []
    for _ in range(rng.randint(2, 3)):
        if total > 11 and rng.random() < 0.5:
            amount = rng.randint(2, min(total - 1, max_amount))
            operations.append(("-", amount))
            wordings.append(rng.choice(LOSSES))
            total -= amount
        else:
            amount = rng.randint(2, max_amount)
            operations.append(("+", amount))
            wordings.append(rng.choice(GAINS))
            total += amount
    links = tuple(rng.choice(LINKS) for _ in operations[1:])
    return Problem(name, pronoun, rng.choice(ITEMS), start, tuple(operations), tuple(wordings), links)


def generate(seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, list[Problem]]:
    """Problems per split, each arithmetic (start and operations) in one split only."""
    rng = random.Random(seed)
    sizes = sizes or SPLITS
    seen: set[tuple[int, tuple[tuple[str, int], ...]]] = set()
    splits: dict[str, list[Problem]] = {}
    for split, count in sizes.items():
        splits[split] = []
        while len(splits[split]) < count:
            problem = make_problem(rng)
            if problem.arithmetic not in seen:
                seen.add(problem.arithmetic)
                splits[split].append(problem)
    return splits


def write_files(folder: Path, seed: int = 0) -> dict[str, Path]:
    """The shipped JSONL files: sft.jsonl (prompt, completion), prompts.jsonl and heldout.jsonl (prompt, reference)."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, problems in generate(seed).items():
        key = "completion" if split == "sft" else "reference"
        path = folder / f"{split}.jsonl"
        path.write_text("".join(json.dumps({"prompt": p.text(), key: p.solution()}) + "\n" for p in problems))
        written[split] = path
    return written


# ------------------------------------------------------------------------------------------------ verifiers

_STEP = re.compile(r"\s*(-?\d+)\s*([-+*x×])\s*(-?\d+)\s*=\s*(-?\d+)\s*\.?\s*")
_ANSWER_LINE = re.compile(r"\s*the answer is:?\s*\S+?\.?\s*", re.IGNORECASE)


def parse_step(line: str) -> tuple[int, str, int, int] | None:
    """(a, operator, b, c) of a step `a op b = c`; None for any other line."""
    match = _STEP.fullmatch(line)
    if match is None:
        return None
    a, operator, b, c = match.groups()
    return int(a), {"x": "*", "×": "*"}.get(operator, operator), int(b), int(c)


def holds(a: int, operator: str, b: int, c: int) -> bool:
    return {"+": a + b, "-": a - b, "*": a * b}[operator] == c


def problem_text(prompt: object) -> str:
    """The problem a chat prompt asks (its last user turn), or the prompt itself when a string."""
    if isinstance(prompt, str):
        return prompt
    return next((m["content"] for m in reversed(prompt) if m.get("role") == "user"), "")  # type: ignore[union-attr]


def _gold_results(reference: str | None) -> set[int] | None:
    """The results of a worked reference solution's steps; None when the reference shows no steps."""
    if not reference:
        return None
    results = {step[3] for step in map(parse_step, split_steps(reference)) if step is not None}
    return results or None


def step_labels(problem: object, solution: str, reference: str | None = None) -> list[bool]:
    """Per step (line) of `solution`: whether it is right.

    A step `a op b = c` is right when it holds, a and b are numbers of the problem or results of earlier
    steps, and, with a worked reference, c is one of the reference's results; the line "The answer is N."
    is right when N is the last result (and the reference's answer). Any other line is wrong, and so is
    every step after the first wrong one.
    """
    available = {int(n) for n in re.findall(r"\d+", problem_text(problem))}
    gold = _gold_results(reference)
    right_answer = reference_answer(reference) if reference else None
    labels: list[bool] = []
    last: int | None = None
    for line in split_steps(solution):
        step = parse_step(line)
        if step is not None:
            a, _, b, c = step
            good = holds(*step) and a in available and b in available and (gold is None or c in gold)
            available.add(c)
            last = c
        elif _ANSWER_LINE.fullmatch(line):
            stated = final_answer(line)
            good = last is not None and stated == str(last) and right_answer in (None, stated)
        else:
            good = False
        labels.append(good and all(labels))
    return labels


def steps(prompts: Sequence[object], answers: Sequence[str]) -> list[float]:
    """1.0 when an answer's process verifies (every step true arithmetic on available numbers, the last line
    restating the last result), else 0.0. Without the reference it cannot tell a wrong operation from a
    right one: that is what the outcome check is for."""
    scores = []
    for prompt, answer in zip(prompts, answers, strict=True):
        labels = step_labels(prompt, answer)
        scores.append(float(bool(labels) and all(labels) and _ANSWER_LINE.fullmatch(split_steps(answer)[-1])
                            is not None))
    return scores


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="where to write sft.jsonl, prompts.jsonl and heldout.jsonl")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for split, path in write_files(args.folder, args.seed).items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()
