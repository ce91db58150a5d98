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
  desirable (True) or undesirable (False), what KTO trains on; a preference pair unpairs into two of them.
- Prompt sets: ``{"prompt": [...]}`` for PPO, labelling and evaluation.

Pure Python on purpose: no torch or datasets import, so it is cheap to import and to test.
"""

from __future__ import annotations

import collections
import itertools
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

Message = dict[str, str]
Row = dict[str, Any]
RowConverter = Callable[[Mapping], "list[Row | UnusableRow]"]  # one input row -> its outputs or drop reasons
Finisher = Callable[[Row, Mapping], Row]  # applied to every kept output, with the input row it came from

SFT_FORMATS = {"messages", "prompt_completion"}
PREFERENCE_FORMATS = {"prompt_chosen_rejected", "chosen_rejected_messages", "hh_transcript", "ranking"}
LABELLED_FORMATS = {"prompt_completion_label"}
PROMPT_FORMATS = {"prompt_only"}
FORMATS = SFT_FORMATS | PREFERENCE_FORMATS | LABELLED_FORMATS | PROMPT_FORMATS

# Canonical column names each format understands, so a data card's `columns:` mapping can be checked
# before any data is read. Not all are required: ranking rows use either `ranked` or `answers`+`scores`.
CANONICAL_COLUMNS: dict[str, frozenset[str]] = {
    "messages": frozenset({"messages"}),
    "prompt_completion": frozenset({"prompt", "completion"}),
    "prompt_chosen_rejected": frozenset({"prompt", "chosen", "rejected", "margin"}),
    "chosen_rejected_messages": frozenset({"prompt", "chosen", "rejected", "margin"}),
    "hh_transcript": frozenset({"prompt", "chosen", "rejected", "margin"}),
    "ranking": frozenset({"prompt", "ranked", "answers", "scores"}),
    "prompt_completion_label": frozenset({"prompt", "completion", "label"}),
    "prompt_only": frozenset({"prompt"}),
}

MAX_BAD_ROWS_KEPT = 5

# ShareGPT-style spellings seen in the wild, mapped onto the roles chat templates expect.
_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}
_HH_MARKER = re.compile(r"(?:^|\n\n)(Human|Assistant):")


class UnusableRow(ValueError):
    """Raised by the row converters; `reason` is the short snake_case key the drop is counted under."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


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
    rows: Iterable[Mapping], fmt: str, margin_key: str | None = None, system_prompt: str | None = None
) -> Converted:
    """Rows of a preference format -> canonical prompt/chosen/rejected pairs.

    `margin_key` names the column holding a numeric margin (canonical name `margin` after the card's
    mapping). For `ranking` rows any non-None `margin_key` switches on margins equal to the score gap,
    which exist only when the row gives `scores`.
    """
    with_margin = margin_key is not None
    converters: dict[str, RowConverter] = {
        "prompt_chosen_rejected": _pair_from_prompt_chosen_rejected,
        "chosen_rejected_messages": _pair_from_message_lists,
        "hh_transcript": _pair_from_hh_transcripts,
        "ranking": lambda row: _pairs_from_ranking(row, with_margin),
    }
    convert_row = _pick(converters, fmt, "preference")
    add_system = _system_adder(system_prompt)

    def finish(pair: Row, row: Mapping) -> Row:
        if margin_key is not None and fmt != "ranking":
            pair = _with_margin(pair, row, margin_key)
        return add_system(pair, row)

    return _convert_all(rows, convert_row, finish)


def to_labelled(rows: Iterable[Mapping], fmt: str = "prompt_completion_label",
                system_prompt: str | None = None) -> Converted:
    """Rows of single answers with a desirable/undesirable label -> canonical labelled rows (KTO)."""
    converters: dict[str, RowConverter] = {"prompt_completion_label": _labelled_row}
    return _convert_all(rows, _pick(converters, fmt, "labelled"), _system_adder(system_prompt))


def unpair(pair: Row) -> list[Row]:
    """A canonical pair as two labelled answers: the chosen one desirable, the rejected one undesirable."""
    return [{"prompt": pair["prompt"], "completion": pair["chosen"], "label": True},
            {"prompt": pair["prompt"], "completion": pair["rejected"], "label": False}]


def to_prompts(
    rows: Iterable[Mapping], fmt: str = "prompt_only", system_prompt: str | None = None
) -> Converted:
    """Rows of a prompt set -> `{"prompt": [messages]}` rows ready for generation (PPO, label, eval)."""
    converters: dict[str, RowConverter] = {"prompt_only": _prompt_row}
    return _convert_all(rows, _pick(converters, fmt, "prompt"), _system_adder(system_prompt))


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


# --------------------------------------------------------------------------- messages and fields


def _field(row: Mapping, key: str) -> Any:
    """A required value; absent and null are the same problem for the user (a wrong column mapping)."""
    value = row.get(key)
    if value is None:
        raise UnusableRow("missing_field")
    return value


def _message(raw: Any) -> Message:
    """One message as `{"role", "content"}`, accepting ShareGPT's `from`/`value` spelling too."""
    if not isinstance(raw, Mapping):
        raise UnusableRow("wrong_type")
    role = raw.get("role", raw.get("from"))
    content = raw.get("content", raw.get("value"))
    if not isinstance(role, str) or not isinstance(content, str):
        raise UnusableRow("wrong_type")
    return {"role": _ROLE_ALIASES.get(role.lower(), role.lower()), "content": content}


def _messages(raw: Any) -> list[Message]:
    if not isinstance(raw, (list, tuple)):
        raise UnusableRow("wrong_type")
    return [_message(item) for item in raw]


def _prompt_messages(raw: Any) -> list[Message]:
    """A prompt given as a string is the user's single turn; a list is a conversation so far."""
    if isinstance(raw, str):
        return [{"role": "user", "content": raw}]
    return _messages(raw)


def _split_at_last_answer(messages: list[Message]) -> tuple[list[Message], str]:
    """(history before the last assistant turn, that turn's text); later turns carry no answer and are cut."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise UnusableRow("no_assistant_turn")
    return messages[:last], messages[last]["content"]


def _answer(raw: Any) -> tuple[list[Message], str]:
    """An answer given as a string, or as a message list whose last assistant turn is the answer."""
    if isinstance(raw, str):
        return [], raw
    return _split_at_last_answer(_messages(raw))


def _assistant(text: str) -> list[Message]:
    return [{"role": "assistant", "content": text}]


def _system_adder(system_prompt: str | None) -> Finisher:
    """A finisher that prepends the recipe's system prompt unless the data already brings its own."""

    def add_system(out: Row, _row: Mapping) -> Row:
        prompt = out["prompt"]
        if system_prompt is None or prompt[0]["role"] == "system":
            return out
        return {**out, "prompt": [{"role": "system", "content": system_prompt}, *prompt]}

    return add_system


def _require_prompt(prompt: list[Message]) -> list[Message]:
    """A reward or answer for nothing teaches nothing: some turn must say something."""
    if not any(message["content"].strip() for message in prompt):
        raise UnusableRow("empty_prompt")
    return prompt


# --------------------------------------------------------------------------- SFT


def _sft_row(prompt: list[Message], answer: str) -> Row:
    if not answer.strip():
        raise UnusableRow("empty_answer")
    return {"prompt": _require_prompt(prompt), "completion": _assistant(answer)}


def _sft_from_messages(row: Mapping) -> list[Row]:
    prompt, answer = _split_at_last_answer(_messages(_field(row, "messages")))
    return [_sft_row(prompt, answer)]


def _sft_from_prompt_completion(row: Mapping) -> list[Row]:
    prompt = _prompt_messages(_field(row, "prompt"))
    # A completion given as several messages trains on its last answer; the turns before it join the prompt.
    history, answer = _answer(_field(row, "completion"))
    return [_sft_row(prompt + history, answer)]


# --------------------------------------------------------------------------- preference pairs


def _pair(prompt: list[Message], chosen: str, rejected: str) -> Row:
    """A canonical pair, refusing the rows that would teach the reward model nothing or nonsense."""
    if not chosen.strip() or not rejected.strip():
        raise UnusableRow("empty_answer")
    if chosen.strip() == rejected.strip():
        raise UnusableRow("identical_answers")
    return {"prompt": _require_prompt(prompt), "chosen": _assistant(chosen), "rejected": _assistant(rejected)}


def _shared_prompt(row: Mapping, histories: list[list[Message]]) -> list[Message]:
    """The conversation the answers reply to: their common history, else the row's own `prompt`.

    UltraFeedback-style rows repeat the user turn inside chosen/rejected *and* give it as a string
    `prompt`; TRL-style rows keep the history in `prompt` and only the answer in chosen/rejected.
    """
    if any(history != histories[0] for history in histories):
        raise UnusableRow("mismatched_history")
    if histories[0]:
        return histories[0]
    return _prompt_messages(_field(row, "prompt"))


def _pair_from_answers(row: Mapping, chosen_raw: Any, rejected_raw: Any) -> list[Row]:
    chosen_history, chosen = _answer(chosen_raw)
    rejected_history, rejected = _answer(rejected_raw)
    prompt = _shared_prompt(row, [chosen_history, rejected_history])
    return [_pair(prompt, chosen, rejected)]


def _pair_from_prompt_chosen_rejected(row: Mapping) -> list[Row]:
    return _pair_from_answers(row, _field(row, "chosen"), _field(row, "rejected"))


def _pair_from_message_lists(row: Mapping) -> list[Row]:
    chosen, rejected = _field(row, "chosen"), _field(row, "rejected")
    if not isinstance(chosen, (list, tuple)) or not isinstance(rejected, (list, tuple)):
        raise UnusableRow("wrong_type")
    return _pair_from_answers(row, chosen, rejected)


def _with_margin(pair: Row, row: Mapping, margin_key: str) -> Row:
    margin = _field(row, margin_key)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)):
        raise UnusableRow("wrong_type")
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
    chosen = _split_at_last_answer(parse_hh_transcript(_hh_text(lead, _field(row, "chosen"))))
    rejected = _split_at_last_answer(parse_hh_transcript(_hh_text(lead, _field(row, "rejected"))))
    if chosen[0] != rejected[0]:
        raise UnusableRow("mismatched_history")
    return [_pair(chosen[0], chosen[1], rejected[1])]


def _hh_text(lead: str, continuation: Any) -> str:
    if not isinstance(continuation, str):
        raise UnusableRow("wrong_type")
    return lead + continuation


# --------------------------------------------------------------------------- rankings of K answers


def _ranked_answers(row: Mapping) -> tuple[list[Any], list[float] | None]:
    """Answers best first, and their scores when the row gives scores instead of an order."""
    if row.get("ranked") is not None:
        ranked = row["ranked"]
        if not isinstance(ranked, (list, tuple)):
            raise UnusableRow("wrong_type")
        return list(ranked), None
    answers, scores = _field(row, "answers"), _field(row, "scores")
    if not isinstance(answers, (list, tuple)) or not isinstance(scores, (list, tuple)):
        raise UnusableRow("wrong_type")
    if any(isinstance(s, bool) or not isinstance(s, (int, float)) for s in scores):
        raise UnusableRow("wrong_type")
    if len(answers) != len(scores):
        raise UnusableRow("malformed_ranking")
    order = sorted(range(len(answers)), key=lambda i: -scores[i])  # stable: equal scores keep row order
    return [answers[i] for i in order], [float(scores[i]) for i in order]


def _pairs_from_ranking(row: Mapping, with_margin: bool) -> list[Row | UnusableRow]:
    """K ranked answers -> K·(K−1)/2 pairs, better answer chosen; tied scores give no pair ("tie").

    Drops inside a ranking are counted per pair, since one bad answer spoils only the pairs it is in.
    """
    answers, scores = _ranked_answers(row)
    if len(answers) < 2:
        raise UnusableRow("too_few_answers")
    parsed = [_answer(answer) for answer in answers]
    prompt = _shared_prompt(row, [history for history, _ in parsed])
    texts = [text for _, text in parsed]
    outcomes: list[Row | UnusableRow] = []
    for better, worse in itertools.combinations(range(len(texts)), 2):
        if scores is not None and scores[better] == scores[worse]:
            outcomes.append(UnusableRow("tie"))
            continue
        try:
            pair = _pair(prompt, texts[better], texts[worse])
        except UnusableRow as unusable:
            outcomes.append(unusable)
            continue
        if with_margin and scores is not None:
            pair["margin"] = scores[better] - scores[worse]
        outcomes.append(pair)
    return outcomes


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
    prompt = _prompt_messages(_field(row, "prompt"))
    history, answer = _answer(_field(row, "completion"))
    return [_sft_row(prompt + history, answer) | {"label": _label(_field(row, "label"))}]


# --------------------------------------------------------------------------- prompt sets


def _prompt_row(row: Mapping) -> list[Row]:
    """A prompt the policy answers next, so it must not end on an assistant turn."""
    prompt = _require_prompt(_prompt_messages(_field(row, "prompt")))
    if prompt[-1]["role"] == "assistant":
        raise UnusableRow("ends_with_answer")
    return [{"prompt": prompt}]
