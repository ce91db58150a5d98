"""Convert raw dataset rows into the conversational forms TRL trainers accept.

The caller (the data-card loader) has already renamed columns to the canonical names; this module only
reshapes rows. Every row that cannot be used is dropped *and counted by reason*, with the indices of the
first few such rows, so the log can say "dropped 12 rows: empty_answer (rows 3, 17, ...)" instead of
silently training on less data than the user thinks.

Canonical shapes (lists of ``{"role", "content"}`` messages, which every TRL trainer renders with the
model's own chat template):

- SFT: ``{"prompt": [...], "completion": [{"role": "assistant", "content": ...}]}``. The loss is taken on
  the completion only, so a multi-turn conversation trains on its *last* assistant answer; the earlier
  answers are context. (Training on every answer would need one row per answer; that is not done here.)
- Preference: ``{"prompt": [...], "chosen": [assistant], "rejected": [assistant]}`` plus an optional
  float ``"margin"`` that the reward trainer adds to the pairwise loss.
- Labelled answers: ``{"prompt": [...], "completion": [assistant], "label": bool}``: one answer marked
  desirable (True) or undesirable (False), what KTO trains on; preference pairs unpair into them (`unpair`).
- Classified answers: ``{"prompt": [...], "completion": [assistant], "label": 1 | 0}``: 1 when the answer
  breaks a rule, what a rule reward model (Sparrow) learns to predict. Datasets that label the other way
  (``is_safe``) are flipped here, by the card's ``violation_when``.
- Prompt sets: ``{"prompt": [...]}`` for PPO, labelling and evaluation, with ``"reference"`` (the right answer,
  or a worked solution ending in it) when the card has one: what an outcome check compares answers with.
- Stepwise solutions: ``{"prompt": [...], "steps": [str, ...], "labels": [float, ...]}``, each step labelled
  good (1.0), bad (0.0) or softly, what a process reward model trains on (converters in `steps`).

Pure Python on purpose: no torch or datasets import, so it is cheap to import and to test.
The row-level helpers live in `rows`; the converters that order or expand answers (rankings,
labelled pairs, nested completions) in `pairs`.
"""

from __future__ import annotations

import collections
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from rlhf_pipeline.data.pairs import pair_from_label, pairs_from_completions, pairs_from_ranking
from rlhf_pipeline.data.rows import (
    Message,
    Row,
    UnusableRow,
    assistant_turn,
    make_pair,
    pair_from_answers,
    parse_answer,
    parse_messages,
    parse_prompt,
    require_prompt,
    required_field,
    shared_prompt,
    split_at_last_answer,
)
from rlhf_pipeline.data.steps import math_shepherd_row, prm800k_rows, stepwise_row

RowConverter = Callable[[Mapping], "list[Row | UnusableRow]"]  # one input row -> its outputs or drop reasons
Finisher = Callable[[Row, Mapping], Row]  # applied to every kept output, with the input row it came from

SFT_FORMATS = {"messages", "prompt_completion"}
PREFERENCE_FORMATS = {"prompt_chosen_rejected", "chosen_rejected_messages", "hh_transcript", "ranking",
                      "pair_with_label", "nested_completions"}
SCORED_FORMATS = {"ranking", "nested_completions"}  # margins come from score gaps, not from a column
LABELLED_FORMATS = {"prompt_completion_label"}
CLASSIFICATION_FORMATS = {"classification"}
PROMPT_FORMATS = {"prompt_only"}
STEPWISE_FORMATS = {"stepwise", "prm800k", "math_shepherd"}
FORMATS = (SFT_FORMATS | PREFERENCE_FORMATS | LABELLED_FORMATS | CLASSIFICATION_FORMATS | PROMPT_FORMATS
           | STEPWISE_FORMATS)
EXPANDING_FORMATS = {"ranking", "nested_completions"}  # one input row gives several examples (every ordered pair)

# Canonical column names each format understands, so a data card's `columns:` mapping can be checked
# before any data is read. Not all are required: ranking rows use either `ranked` or `answers`+`scores`.
CANONICAL_COLUMNS: dict[str, frozenset[str]] = {
    "messages": frozenset({"messages"}),
    "prompt_completion": frozenset({"prompt", "completion"}),
    "prompt_chosen_rejected": frozenset({"prompt", "chosen", "rejected", "margin"}),
    "chosen_rejected_messages": frozenset({"prompt", "chosen", "rejected", "margin"}),
    "hh_transcript": frozenset({"prompt", "chosen", "rejected", "margin"}),
    "ranking": frozenset({"prompt", "ranked", "answers", "scores"}),
    "pair_with_label": frozenset({"prompt", "answer_a", "answer_b", "label"}),
    "nested_completions": frozenset({"prompt", "completions"}),
    "prompt_completion_label": frozenset({"prompt", "completion", "label"}),
    "classification": frozenset({"prompt", "answer", "label"}),
    "prompt_only": frozenset({"prompt", "reference"}),
    "stepwise": frozenset({"prompt", "steps", "labels"}),
    "prm800k": frozenset({"question", "label"}),
    "math_shepherd": frozenset({"input", "label"}),
}


def output_columns(fmt: str, with_margin: bool = False) -> dict[str, str]:
    """The canonical columns a format converts to, with their types ("messages": a list of {role, content};
    "float" may be null: a ranked row without scores has no margin; "strings"/"floats": lists), for the tables
    the loader writes."""
    answer = {"prompt": "messages", "completion": "messages"}
    if fmt in SFT_FORMATS:
        return answer
    if fmt in PREFERENCE_FORMATS:
        return {"prompt": "messages", "chosen": "messages", "rejected": "messages"} | (
            {"margin": "float"} if with_margin else {})
    if fmt in LABELLED_FORMATS:
        return answer | {"label": "bool"}
    if fmt in CLASSIFICATION_FORMATS:
        return answer | {"label": "int"}
    if fmt in PROMPT_FORMATS:
        return {"prompt": "messages", "reference": "string"}  # a reference (the right answer) may be null
    if fmt in STEPWISE_FORMATS:
        return {"prompt": "messages", "steps": "strings", "labels": "floats"}
    raise ValueError(f"format {fmt!r}: declare its canonical columns in formats.output_columns")


MAX_BAD_ROWS_KEPT = 5
_HH_MARKER = re.compile(r"(?:^|\n\n)(Human|Assistant):")


@dataclass
class Converted:
    """Rows kept plus why the others were dropped, so the caller can log or refuse a mostly-bad dataset."""

    rows: list[Row] = field(default_factory=list)
    dropped: collections.Counter[str] = field(default_factory=collections.Counter)
    first_bad_rows: dict[str, list[int]] = field(default_factory=dict)
    n_input: int = 0  # input rows read; a ranking row yields several output rows

    @property
    def n_dropped(self) -> int:
        return sum(self.dropped.values())

    def drop(self, index: int, reason: str) -> None:
        """Count one unusable row (or, for rankings, one unusable pair) under `reason`."""
        self.dropped[reason] += 1
        indices = self.first_bad_rows.setdefault(reason, [])
        if len(indices) < MAX_BAD_ROWS_KEPT and index not in indices:
            indices.append(index)


# --------------------------------------------------------------------------- public converters


def to_sft(rows: Iterable[Mapping], fmt: str, system_prompt: str | None = None) -> Converted:
    """Rows of an SFT format -> canonical prompt/completion rows (loss on the last assistant answer)."""
    converters: dict[str, RowConverter] = {
        "messages": _sft_from_messages,
        "prompt_completion": _sft_from_prompt_completion,
    }
    return _convert_all(rows, _pick(converters, fmt, "SFT"), _system_adder(system_prompt))


def to_preference(
    rows: Iterable[Mapping], fmt: str, margin_key: str | None = None, system_prompt: str | None = None,
    first_preferred_when: int | None = None, answer_key: str = "response", score_key: str = "overall_score",
) -> Converted:
    """Rows of a preference format -> canonical prompt/chosen/rejected pairs.

    `margin_key` names the column holding a numeric margin (canonical name `margin` after the card's
    mapping). For the scored formats any non-None `margin_key` switches on margins equal to the score
    gap, which exist only when the row gives scores. `first_preferred_when` is the `pair_with_label`
    label value meaning `answer_a` is preferred; `answer_key`/`score_key` name the fields inside each
    `nested_completions` record.
    """
    with_margin = margin_key is not None
    if fmt == "pair_with_label" and first_preferred_when is None:
        raise ValueError("pair_with_label needs first_preferred_when: the label value that means answer_a wins")
    converters: dict[str, RowConverter] = {
        "prompt_chosen_rejected": _pair_from_prompt_chosen_rejected,
        "chosen_rejected_messages": _pair_from_message_lists,
        "hh_transcript": _pair_from_hh_transcripts,
        "ranking": lambda row: pairs_from_ranking(row, with_margin),
        "pair_with_label": lambda row: pair_from_label(row, first_preferred_when),
        "nested_completions": lambda row: pairs_from_completions(row, with_margin, answer_key, score_key),
    }
    convert_row = _pick(converters, fmt, "preference")
    add_system = _system_adder(system_prompt)

    def finish(pair: Row, row: Mapping) -> Row:
        if margin_key is not None and fmt not in SCORED_FORMATS:
            pair = _with_margin(pair, row, margin_key)
        return add_system(pair, row)

    return _convert_all(rows, convert_row, finish)


def to_labelled(rows: Iterable[Mapping], fmt: str = "prompt_completion_label",
                system_prompt: str | None = None) -> Converted:
    """Rows of single answers with a desirable/undesirable label -> canonical labelled rows (KTO)."""
    converters: dict[str, RowConverter] = {"prompt_completion_label": _labelled_row}
    return _convert_all(rows, _pick(converters, fmt, "labelled"), _system_adder(system_prompt))


def to_classified(rows: Iterable[Mapping], violation_when: bool, fmt: str = "classification",
                  system_prompt: str | None = None) -> Converted:
    """Rows of answers labelled by a rule -> canonical classified rows, label 1 when the answer breaks it.

    `violation_when` is the parsed label value that means a violation (True for our convention, False for
    datasets whose column says "safe"). A row whose `answer` and `label` are lists of equal length (a card
    mapping several columns, such as PKU-SafeRLHF's two responses) gives one classified answer per position.
    """
    converters: dict[str, RowConverter] = {"classification": lambda row: _classified_rows(row, violation_when)}
    return _convert_all(rows, _pick(converters, fmt, "classification"), _system_adder(system_prompt))


AMBIGUOUS_ANSWER = "chosen_and_rejected"  # the drop reason of an answer `unpair` cannot label


def unpair(pairs: list[Row]) -> tuple[list[tuple[int, Row]], list[int]]:
    """Preference pairs as labelled single answers (KTO): each distinct (prompt, answer) once, with one label.

    An answer chosen in some pair and rejected in none is desirable; rejected and never chosen, undesirable. A
    ranking's middle answer is both (chosen over a worse one, rejected for a better one): it has no consistent
    label and is dropped. With one pair per prompt (best against worst) every pair gives its two answers.
    Returns each labelled answer with the index of the first pair it is in, and, for every dropped answer, the
    index of the first pair it is in.
    """
    first_pair: dict[tuple[str, str], int] = {}
    roles: dict[tuple[str, str], set[bool]] = {}
    answers: dict[tuple[str, str], Row] = {}
    for index, pair in enumerate(pairs):
        prompt = json.dumps(pair["prompt"], sort_keys=True)
        for side, desirable in (("chosen", True), ("rejected", False)):
            key = (prompt, pair[side][-1]["content"].strip())
            first_pair.setdefault(key, index)
            roles.setdefault(key, set()).add(desirable)
            answers.setdefault(key, {"prompt": pair["prompt"], "completion": pair[side]})
    labelled = [(first_pair[key], answers[key] | {"label": next(iter(labels))})
                for key, labels in roles.items() if len(labels) == 1]
    return labelled, [first_pair[key] for key, labels in roles.items() if len(labels) == 2]


def to_prompts(
    rows: Iterable[Mapping], fmt: str = "prompt_only", system_prompt: str | None = None
) -> Converted:
    """Rows of a prompt set -> `{"prompt": [messages]}` rows ready for generation (PPO, label, eval)."""
    converters: dict[str, RowConverter] = {"prompt_only": _prompt_row}
    return _convert_all(rows, _pick(converters, fmt, "prompt"), _system_adder(system_prompt))


def to_stepwise(rows: Iterable[Mapping], fmt: str, good_ratings: list[int] | None = None,
                system_prompt: str | None = None) -> Converted:
    """Rows of a stepwise format -> canonical stepwise rows; `good_ratings` are PRM800K's ratings that mean good."""
    if fmt == "prm800k" and not good_ratings:
        raise ValueError("prm800k needs good_ratings: the step ratings (-1, 0, 1) that count as good")
    converters: dict[str, RowConverter] = {
        "stepwise": stepwise_row,
        "prm800k": lambda row: prm800k_rows(row, good_ratings or []),
        "math_shepherd": math_shepherd_row,
    }
    return _convert_all(rows, _pick(converters, fmt, "stepwise"), _system_adder(system_prompt))


# --------------------------------------------------------------------------- the shared loop


def _pick(converters: dict[str, RowConverter], fmt: str, kind: str) -> RowConverter:
    """Fail at once on an unknown format, naming the ones that exist for this kind of stage."""
    if fmt not in converters:
        raise ValueError(f"unknown {kind} format {fmt!r}; expected one of {sorted(converters)}")
    return converters[fmt]


def _convert_all(rows: Iterable[Mapping], convert_row: RowConverter, finish: Finisher) -> Converted:
    """Run a per-row converter over all rows, keeping results and counting every drop by reason."""
    result = Converted()
    for index, row in enumerate(rows):
        result.n_input += 1
        for outcome in _outcomes(row, convert_row, finish):
            if isinstance(outcome, UnusableRow):
                result.drop(index, outcome.reason)
            else:
                result.rows.append(outcome)
    return result


def _outcomes(row: Any, convert_row: RowConverter, finish: Finisher) -> list[Row | UnusableRow]:
    """What one input row becomes: usually one row or one reason, several for a ranking."""
    try:
        if not isinstance(row, Mapping):
            raise UnusableRow("wrong_type")
        return [o if isinstance(o, UnusableRow) else finish(o, row) for o in convert_row(row)]
    except UnusableRow as unusable:
        return [unusable]


# --------------------------------------------------------------------------- finishers


def _system_adder(system_prompt: str | None) -> Finisher:
    """A finisher that prepends the recipe's system prompt unless the data already brings its own."""

    def add_system(out: Row, _row: Mapping) -> Row:
        prompt = out["prompt"]
        if system_prompt is None or prompt[0]["role"] == "system":
            return out
        return {**out, "prompt": [{"role": "system", "content": system_prompt}, *prompt]}

    return add_system


# --------------------------------------------------------------------------- SFT


def _sft_row(prompt: list[Message], answer: str) -> Row:
    if not answer.strip():
        raise UnusableRow("empty_answer")
    return {"prompt": require_prompt(prompt), "completion": assistant_turn(answer)}


def _sft_from_messages(row: Mapping) -> list[Row]:
    prompt, answer = split_at_last_answer(parse_messages(required_field(row, "messages")))
    return [_sft_row(prompt, answer)]


def _sft_from_prompt_completion(row: Mapping) -> list[Row]:
    prompt = parse_prompt(required_field(row, "prompt"))
    # A completion given as several messages trains on its last answer; the turns before it join the prompt.
    history, answer = parse_answer(required_field(row, "completion"))
    return [_sft_row(prompt + history, answer)]


# --------------------------------------------------------------------------- preference pairs


def _pair_from_prompt_chosen_rejected(row: Mapping) -> list[Row]:
    return pair_from_answers(row, required_field(row, "chosen"), required_field(row, "rejected"))


def _pair_from_message_lists(row: Mapping) -> list[Row]:
    chosen, rejected = required_field(row, "chosen"), required_field(row, "rejected")
    if not isinstance(chosen, (list, tuple)) or not isinstance(rejected, (list, tuple)):
        raise UnusableRow("wrong_type")
    return pair_from_answers(row, chosen, rejected)


def _with_margin(pair: Row, row: Mapping, margin_key: str) -> Row:
    margin = required_field(row, margin_key)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)):
        raise UnusableRow("wrong_type")
    if not math.isfinite(margin):
        raise UnusableRow("non_finite_score")
    return {**pair, "margin": float(margin)}


# --------------------------------------------------------------------------- Anthropic-HH transcripts


def parse_hh_transcript(text: Any) -> list[Message]:
    """Split "\\n\\nHuman: ...\\n\\nAssistant: ..." into messages; text before the first marker is bad."""
    if not isinstance(text, str):
        raise UnusableRow("wrong_type")
    pieces = _HH_MARKER.split(text)  # [before, role, content, role, content, ...]
    if len(pieces) < 3 or pieces[0].strip():
        raise UnusableRow("malformed_transcript")
    speakers, contents = pieces[1::2], pieces[2::2]
    return [
        {"role": "user" if speaker == "Human" else "assistant", "content": content.strip()}
        for speaker, content in zip(speakers, contents, strict=True)
    ]


def _pair_from_hh_transcripts(row: Mapping) -> list[Row]:
    """Both transcripts share every turn before the last Assistant turn; that turn is the answer.

    A `prompt` column, when present, is the shared beginning of both transcripts (the
    `prompt` + continuation shape some HH derivatives use) and is prepended to each.
    """
    lead = row.get("prompt") or ""
    if not isinstance(lead, str):
        raise UnusableRow("wrong_type")
    chosen = split_at_last_answer(parse_hh_transcript(_hh_text(lead, required_field(row, "chosen"))))
    rejected = split_at_last_answer(parse_hh_transcript(_hh_text(lead, required_field(row, "rejected"))))
    if chosen[0] != rejected[0]:
        raise UnusableRow("mismatched_history")
    return [make_pair(chosen[0], chosen[1], rejected[1])]


def _hh_text(lead: str, continuation: Any) -> str:
    if not isinstance(continuation, str):
        raise UnusableRow("wrong_type")
    return lead + continuation


# --------------------------------------------------------------------------- rankings of K answers


# --------------------------------------------------------------------------- labelled answers

_LABEL_SPELLINGS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False,
                    "desirable": True, "undesirable": False, "good": True, "bad": False}


def _label(raw: Any) -> bool:
    """True/False, 1/0 or their usual spellings; anything else is not a label we can trust."""
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, (int, float)) and raw in (0, 1):
        return bool(raw)
    if isinstance(raw, str) and raw.strip().lower() in _LABEL_SPELLINGS:
        return _LABEL_SPELLINGS[raw.strip().lower()]
    raise UnusableRow("bad_label")


def _labelled_row(row: Mapping) -> list[Row]:
    prompt = parse_prompt(required_field(row, "prompt"))
    history, answer = parse_answer(required_field(row, "completion"))
    return [_sft_row(prompt + history, answer) | {"label": _label(required_field(row, "label"))}]


# --------------------------------------------------------------------------- classified answers (rule RMs)


def _classified_rows(row: Mapping, violation_when: bool) -> list[Row | UnusableRow]:
    """One classified answer, or one per position when `label` is a list; each bad answer is dropped alone."""
    labels = required_field(row, "label")
    if not isinstance(labels, list):
        return [_classified(row, required_field(row, "answer"), labels, violation_when)]
    answers = required_field(row, "answer")
    if not isinstance(answers, list) or len(answers) != len(labels):
        raise UnusableRow("wrong_type")
    outcomes: list[Row | UnusableRow] = []
    for answer, label in zip(answers, labels, strict=True):
        try:
            outcomes.append(_classified(row, answer, label, violation_when))
        except UnusableRow as unusable:
            outcomes.append(unusable)
    return outcomes


def _classified(row: Mapping, answer_raw: Any, label: Any, violation_when: bool) -> Row:
    if answer_raw is None or label is None:
        raise UnusableRow("missing_field")
    history, answer = parse_answer(answer_raw)
    prompt = shared_prompt(row, [history])
    return _sft_row(prompt, answer) | {"label": int(_label(label) == violation_when)}


# --------------------------------------------------------------------------- prompt sets


def _prompt_row(row: Mapping) -> list[Row]:
    """A prompt the policy answers next, so it must not end on an assistant turn; its reference, if any."""
    prompt = require_prompt(parse_prompt(required_field(row, "prompt")))
    if prompt[-1]["role"] == "assistant":
        raise UnusableRow("ends_with_answer")
    reference = row.get("reference")
    if reference is not None and (isinstance(reference, bool) or not isinstance(reference, (str, int, float))):
        raise UnusableRow("wrong_type")
    return [{"prompt": prompt} | ({"reference": str(reference)} if reference is not None else {})]
