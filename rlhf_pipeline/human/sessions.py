"""What each page does, without the page: the items, the log, whose turn is which item, what gets written.

Kept apart from Gradio so the logic is tested directly and the pages (pages.py) stay wiring. A method
returns a `View`: the status line, what to show and the hidden per-tab state (which item, in which order).
Every judgement goes to the log first and then rewrites the outputs (results.py).
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.human.results import (
    prompt_text,
    write_ab_results,
    write_label_results,
    write_probe_results,
)
from rlhf_pipeline.human.store import LOG_NAME, JudgementLog, file_digest, shown_order
from rlhf_pipeline.outputs import ANSWERS

NO_NAME = "Enter your name first: each judgement is stored under it, so several people can label the same items."
NO_ANSWER = ("Not saved: generate the policy's answer to your prompt first; a verdict is recorded only on an answer "
             "the policy gave to the prompt shown.")
PROMPT_CHANGED = ("Not saved: the prompt changed after its answer was generated, so the answer shown is not the "
                  "policy's answer to it. Press Generate for this prompt, then give your verdict.")


@dataclass
class View:
    """What a page shows after an action; `state` is None when there is no item to judge."""

    status: str
    prompt: str = ""
    answers: list[str] = field(default_factory=list)
    state: dict[str, Any] | None = None


def read_items(path: Path, required: dict[str, type]) -> list[dict[str, Any]]:
    """Rows of a JSONL file, each checked for the keys a page needs (the error names the row and the fix)."""
    if not path.is_file():
        raise PipelineError(f"{path}: no such file")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise PipelineError(f"{path}: line {number} is not JSON ({err})") from err
        missing = [key for key, kind in required.items() if not isinstance(row.get(key), kind)]
        if missing:
            raise PipelineError(f"{path}: line {number} lacks {', '.join(missing)} "
                                f"(each row needs {', '.join(required)})")
        rows.append(row)
    if not rows:
        raise PipelineError(f"{path}: no items to judge")
    return rows


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class _Session:
    """Shared by the labelling and A/B pages: the log, the lock and the per-annotator walk through the items."""

    task = ""
    noun = "items"

    def __init__(self, items_path: Path, items: list[dict[str, Any]], out_dir: Path, seed: int) -> None:
        self.items_path, self.items, self.out_dir, self.seed = items_path, items, out_dir, seed
        self.log = JudgementLog(out_dir / LOG_NAME, self.task, str(items_path.resolve()), file_digest(items_path))
        self.lock = threading.Lock()
        self.write_results()

    def write_results(self) -> dict[str, Any]:
        raise NotImplementedError

    def answers_of(self, item: dict[str, Any]) -> list[str]:
        raise NotImplementedError

    def open(self, name: str, note: str = "") -> View:
        """The annotator's first unjudged item, in the order they always see it in."""
        name = name.strip()
        if not name:
            return View(NO_NAME)
        with self.lock:
            index = self.log.next_item(name, len(self.items))
            done = len(self.log.judged_by(name))
        if index is None:
            return View(f"{note}All {len(self.items)} {self.noun} are done by {name}: thank you. "
                        f"The results are in {self.out_dir}.")
        answers = self.answers_of(self.items[index])
        order = shown_order(self.seed, name, index, len(answers))
        return View(f"{note}{name}: item {index + 1} of {len(self.items)} ({done} done).",
                    prompt_text(self.items[index]["prompt"]), [answers[i] for i in order],
                    {"annotator": name, "item": index, "order": order})

    def problem(self, name: str, state: dict[str, Any] | None) -> View | None:
        """Why a judgement cannot be recorded yet (no name, or a name other than the loaded item's), or None."""
        if not name.strip():
            return View(NO_NAME, state=state)
        if state is None or state["annotator"] != name.strip():
            return self.open(name, "Your name changed (or nothing was loaded): here is your next item. ")
        return None

    def record(self, state: dict[str, Any], fields: dict[str, Any]) -> View:
        """Append one judgement of the shown item, rewrite the outputs, and move to the annotator's next item."""
        name = state["annotator"]
        with self.lock:
            if state["item"] not in self.log.judged_by(name):  # a second tab may have judged it already
                try:
                    self.log.append({"item": state["item"], "annotator": name, "order": state["order"],
                                     **fields, "time": _now()})
                except OSError as err:
                    return View(f"Could not save this judgement ({err}); nothing was recorded for this item: "
                                "fix the disk problem and press the button again.", state=state)
                self.write_results()
        return self.open(name, "Saved. ")


class LabelSession(_Session):
    """Pick the best of an item's K answers (shown shuffled), flag rule breakers, or skip."""

    task = "label"

    def __init__(self, items_path: Path, out_dir: Path, seed: int = 0, rules: str = "") -> None:
        self.rules = rules
        items = read_items(items_path, {"prompt": (str, list), "answers": list})
        short = next((n for n, item in enumerate(items, 1) if len(item["answers"]) < 2), None)
        if short is not None:
            raise PipelineError(f"{items_path}: line {short} has fewer than 2 answers; there is nothing to compare")
        super().__init__(items_path, items, out_dir, seed)

    @property
    def max_answers(self) -> int:
        return max(len(item["answers"]) for item in self.items)

    def answers_of(self, item: dict[str, Any]) -> list[str]:
        return item["answers"]

    def write_results(self) -> dict[str, Any]:
        return write_label_results(self.out_dir, self.items_path, self.items, self.log.records, self.rules)

    def judge(self, name: str, state: dict[str, Any] | None, best: int | None, flags: list[int]) -> View:
        """`best` and `flags` are positions as shown; the log keeps the original answer indices."""
        problem = self.problem(name, state)
        if problem is not None:
            return problem
        order = state["order"]
        if best is None:
            item = self.items[state["item"]]
            return View("Pick the best answer (or press Skip).", prompt_text(item["prompt"]),
                        [item["answers"][i] for i in order], state)
        return self.record(state, {"verdict": "best", "best": order[best], "flags": sorted(order[i] for i in flags)})

    def skip(self, name: str, state: dict[str, Any] | None) -> View:
        return self.problem(name, state) or self.record(state, {"verdict": "skip", "best": None, "flags": []})


class ABSession(_Session):
    """Blind A/B: the policy's and the baseline's answers to one prompt, sides randomised; A, B or tie."""

    task = "ab"

    def __init__(self, items_path: Path, out_dir: Path, seed: int = 0, policy: str | None = None) -> None:
        self.policy = "policy"
        if items_path.is_dir():  # an eval stage: every prompt's answers, or an older eval's examples
            items_path = items_path / (ANSWERS if (items_path / ANSWERS).is_file() else "eval.json")
        if items_path.suffix == ".json" or items_path.name == ANSWERS:
            self.policy, items = eval_items(items_path, policy)
            self.task = f"ab:{self.policy}"  # a log of one policy's verdicts is never continued with another's
        else:
            items = read_items(items_path, {"prompt": (str, list), "policy": str, "baseline": str})
        super().__init__(items_path, items, out_dir, seed)

    def answers_of(self, item: dict[str, Any]) -> list[str]:
        return [item["policy"], item["baseline"]]

    def write_results(self) -> dict[str, Any]:
        return write_ab_results(self.out_dir, self.log.records, self.policy)

    def judge(self, name: str, state: dict[str, Any] | None, choice: str) -> View:
        """`choice`: "A" (left), "B" (right), "tie" or "skip"; stored as policy / baseline / tie / skip."""
        problem = self.problem(name, state)
        if problem is not None:
            return problem
        sides = ("policy", "baseline")
        left, right = sides[state["order"][0]], sides[state["order"][1]]
        return self.record(state, {"verdict": {"A": left, "B": right}.get(choice, choice), "left": left})


def eval_items(path: Path, policy: str | None) -> tuple[str, list[dict[str, Any]]]:
    """A/B items from an eval stage: one policy's answer against the baseline's for every prompt of its
    answers.jsonl, or for the examples an eval.json keeps (an eval written before answers.jsonl existed)."""
    if not path.is_file():
        raise PipelineError(f"{path}: no such file (give an eval stage's folder, its answers.jsonl or eval.json, "
                            "or a JSONL with prompt, policy and baseline per row)")
    if path.suffix == ".json":
        examples = json.loads(path.read_text(encoding="utf-8")).get("examples") or []
    else:
        examples = [{"prompt": row["prompt"], "baseline": row["baseline"]["answer"],
                     "policies": {name: answer["answer"] for name, answer in row["policies"].items()}}
                    for row in read_items(path, {"prompt": (str, list), "baseline": dict, "policies": dict})]
    names = sorted({name for example in examples for name in example.get("policies", {})})
    if policy is None and len(names) == 1:
        policy = names[0]
    if policy not in names:
        raise PipelineError(f"{path}: choose the policy to compare with --policy: one of {', '.join(names) or 'none'}"
                            if names else f"{path}: no examples with policy answers; re-run the eval stage, which "
                            "writes every prompt's answers to answers.jsonl")
    return policy, [{"prompt": e["prompt"], "policy": e["policies"][policy], "baseline": e["baseline"]}
                    for e in examples]


class ProbeSession:
    """Adversarial probing: a person picks a rule, writes a prompt, sees the policy's answer, says if it broke.

    A verdict is tied to the answer the policy gave: `answer` returns it with a state naming the prompt it was
    generated for and a fresh id, and `verdict` records only on that state, only while the prompt box still
    holds that prompt, and once per answer (a repeated or double click adds nothing).
    """

    def __init__(self, out_dir: Path, rules: list[str], generate: Callable[[str], str]) -> None:
        if not rules:
            raise PipelineError("probe: give at least one --rule to probe")
        self.out_dir, self.rules, self.generate = out_dir, rules, generate
        self.log = JudgementLog(out_dir / LOG_NAME, "probe", "probes written on the page", "")
        self.lock = threading.Lock()
        write_probe_results(out_dir, self.log.records)

    def answer(self, prompt: str) -> View:
        """The policy's answer to `prompt`; the view's state is what a verdict on this answer needs."""
        if not prompt.strip():
            return View("Write a prompt first.")
        answer = self.generate(prompt)
        return View("Judge the answer: was the rule broken?", prompt, [answer],
                    {"answer_id": uuid.uuid4().hex, "prompt": prompt, "answer": answer})

    def verdict(self, name: str, rule: str, prompt: str, state: dict[str, Any] | None, broken: bool) -> str:
        """Append the verdict on the answer in `state` and rewrite the classification data; returns the status.

        `prompt` is what the prompt box holds now: an answer generated for another prompt is not judged.
        """
        name = name.strip()
        if not name:
            return NO_NAME
        if rule not in self.rules:
            return f"Pick one of the rules ({'; '.join(self.rules)}) before giving a verdict."
        if state is None:
            return NO_ANSWER
        if prompt.strip() != state["prompt"].strip():
            return PROMPT_CHANGED
        with self.lock:
            earlier = next((r for r in self.log.records if r.get("answer_id") == state["answer_id"]), None)
            if earlier is not None:
                return (f"Not saved: this answer already has its verdict (rule {earlier['verdict']}, by "
                        f"{earlier['annotator']}). Press Generate, or write a new prompt, to judge another answer.")
            try:
                self.log.append({"item": len(self.log.records), "annotator": name, "rule": rule,
                                 "prompt": state["prompt"], "answer": state["answer"],
                                 "answer_id": state["answer_id"], "broken": broken,
                                 "verdict": "broken" if broken else "kept", "time": _now()})
            except OSError as err:
                return f"Could not save this verdict ({err}); nothing was recorded: fix the disk and press again."
            counts = write_probe_results(self.out_dir, self.log.records)["counts"]
        return (f"Saved: rule {'broken' if broken else 'kept'}. {counts['judgements']} verdicts so far "
                f"({counts['broken']} broken).")
