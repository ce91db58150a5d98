"""Stepwise formats: solutions as steps, each labelled good (1.0), bad (0.0) or with a soft label in [0, 1].

The canonical row is ``{"prompt": [messages], "steps": [str, ...], "labels": [float, ...]}``, one label per
step, what a process reward model (stages/prm.py) trains on; it is TRL's former stepwise type with the
steps under `steps` (a card maps TRL's `completions` column onto it). Two real datasets convert into it:

- PRM800K (OpenAI's raw JSONL): each step's chosen completion with its human rating, −1, 0 or +1; the card's
  `good_ratings` says which ratings count as good. A step where the labeler stopped (no chosen completion:
  the first error in phase 2) ends the solution, one row per rated alternative there; a human-written step
  (phase 1) is good; a step rated null ends the solution before it; `bad_problem` solutions are dropped.
- Math-Shepherd: `input` is the question then "Step 1: ... ки\\nStep 2: ... ки ..."; `label` is the same text
  with each `ки` replaced by `+` (good) or `-` (bad).

Each step is kept on one line (its own line breaks become spaces), as rlhf_pipeline.steps joins them.
Pure Python, like formats, which dispatches here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from rlhf_pipeline.data.rows import Message, Row, UnusableRow, parse_prompt, require_prompt, required_field

PRM800K_RATINGS = (-1, 0, 1)
SHEPHERD_TAG = "ки"
_SHEPHERD_LABELS = {"+": 1.0, "-": 0.0}
_FIRST_STEP = re.compile(r"\s*Step 1:")


def _one_line(step: Any) -> str:
    if not isinstance(step, str):
        raise UnusableRow("wrong_type")
    text = " ".join(step.split())
    if not text:
        raise UnusableRow("empty_step")
    return text


def _step_label(raw: Any) -> float:
    """True/False, 1/0, or a soft label (a share of rollouts that reached the right answer) in [0, 1]."""
    if isinstance(raw, bool):
        return float(raw)
    if isinstance(raw, (int, float)) and 0 <= raw <= 1:
        return float(raw)
    raise UnusableRow("bad_label")


def solution_row(prompt: list[Message], steps: Sequence[Any], labels: Sequence[Any]) -> Row:
    """A canonical stepwise row, refusing solutions with no steps or with a label count that is not the step count."""
    if not steps:
        raise UnusableRow("no_steps")
    if len(steps) != len(labels):
        raise UnusableRow("mismatched_labels")
    return {"prompt": require_prompt(prompt), "steps": [_one_line(step) for step in steps],
            "labels": [_step_label(label) for label in labels]}


def stepwise_row(row: Mapping) -> list[Row]:
    steps, labels = required_field(row, "steps"), required_field(row, "labels")
    if not isinstance(steps, (list, tuple)) or not isinstance(labels, (list, tuple)):
        raise UnusableRow("wrong_type")
    return [solution_row(parse_prompt(required_field(row, "prompt")), steps, labels)]


def prm800k_rows(row: Mapping, good_ratings: Sequence[int]) -> list[Row | UnusableRow]:
    """A PRM800K solution along its chosen completions; at the step where labelling stopped, one row per rated
    alternative (each shares the steps before it)."""
    question, label = required_field(row, "question"), required_field(row, "label")
    if not isinstance(question, Mapping) or not isinstance(label, Mapping):
        raise UnusableRow("wrong_type")
    if label.get("finish_reason") == "bad_problem":
        raise UnusableRow("bad_problem")
    prompt = parse_prompt(required_field(question, "problem"))
    steps, good, endings = [], [], []
    for step in required_field(label, "steps"):
        if not isinstance(step, Mapping):
            raise UnusableRow("wrong_type")
        completions = step.get("completions") or []
        chosen, human = step.get("chosen_completion"), step.get("human_completion")
        if chosen is not None and not (isinstance(chosen, int) and 0 <= chosen < len(completions)):
            raise UnusableRow("wrong_type")
        if chosen is not None:
            text, rating = completions[chosen].get("text"), completions[chosen].get("rating")
        elif human is not None:  # phase 1: a labeler's own step after every completion was rated −1
            text, rating = human.get("text") if isinstance(human, Mapping) else human, 1
        else:
            endings = [c for c in completions if c.get("rating") is not None]
            break
        if rating is None:
            break
        steps.append(text)
        good.append(_rating(rating) in good_ratings)
    if endings:
        return [_prm800k_ending(prompt, steps, good, ending, good_ratings) for ending in endings]
    return [solution_row(prompt, steps, good)]


def _rating(raw: Any) -> int:
    if isinstance(raw, bool) or raw not in PRM800K_RATINGS:
        raise UnusableRow("bad_label")
    return int(raw)


def _prm800k_ending(prompt: list[Message], steps: list[Any], good: list[bool], ending: Mapping,
                    good_ratings: Sequence[int]) -> Row | UnusableRow:
    try:
        return solution_row(prompt, [*steps, ending.get("text")], [*good, _rating(ending["rating"]) in good_ratings])
    except UnusableRow as unusable:
        return unusable


def math_shepherd_row(row: Mapping) -> list[Row]:
    """The question and its tagged steps from `input`, each step's label from the `+`/`-` at its tag in `label`."""
    text, labelled = required_field(row, "input"), required_field(row, "label")
    if not isinstance(text, str) or not isinstance(labelled, str):
        raise UnusableRow("wrong_type")
    pieces = text.split(SHEPHERD_TAG)
    if len(pieces) < 2 or pieces[-1].strip():
        raise UnusableRow("malformed_steps")  # no tag, or text after the last tag (a step without a label)
    labels, position = [], 0
    for piece in pieces[:-1]:
        position += len(piece)
        if labelled[position - len(piece):position] != piece or labelled[position:position + 1] not in \
                _SHEPHERD_LABELS:
            raise UnusableRow("mismatched_labels")
        labels.append(_SHEPHERD_LABELS[labelled[position]])
        position += 1
    first = _FIRST_STEP.search(pieces[0])
    if first is None:
        raise UnusableRow("malformed_steps")
    question = pieces[0][: first.start()]
    steps = [pieces[0][first.start():], *pieces[1:-1]]
    return [solution_row(parse_prompt(question.strip()), steps, labels)]
