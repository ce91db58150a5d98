"""Row-level building blocks shared by the format converters: fields, messages and preference pairs.

Kept apart from `formats` so that the converters of newer formats (`pairs`) can use them while
`formats` still dispatches to every converter, with imports pointing one way. Pure Python, like them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

Message = dict[str, str]
Row = dict[str, Any]

# ShareGPT-style spellings seen in the wild, mapped onto the roles chat templates expect.
_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}


class UnusableRow(ValueError):
    """Raised by the row converters; `reason` is the short snake_case key the drop is counted under."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def required_field(row: Mapping, key: str) -> Any:
    """A required value; absent and null are the same problem for the user (a wrong column mapping)."""
    value = row.get(key)
    if value is None:
        raise UnusableRow("missing_field")
    return value


def parse_message(raw: Any) -> Message:
    """One message as `{"role", "content"}`, accepting ShareGPT's `from`/`value` spelling too."""
    if not isinstance(raw, Mapping):
        raise UnusableRow("wrong_type")
    role = raw.get("role", raw.get("from"))
    content = raw.get("content", raw.get("value"))
    if not isinstance(role, str) or not isinstance(content, str):
        raise UnusableRow("wrong_type")
    return {"role": _ROLE_ALIASES.get(role.lower(), role.lower()), "content": content}


def parse_messages(raw: Any) -> list[Message]:
    if not isinstance(raw, (list, tuple)):
        raise UnusableRow("wrong_type")
    return [parse_message(item) for item in raw]


def parse_prompt(raw: Any) -> list[Message]:
    """A prompt given as a string is the user's single turn; a list is a conversation so far."""
    if isinstance(raw, str):
        return [{"role": "user", "content": raw}]
    return parse_messages(raw)


def split_at_last_answer(messages: list[Message]) -> tuple[list[Message], str]:
    """(history before the last assistant turn, that turn's text); later turns carry no answer and are cut."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise UnusableRow("no_assistant_turn")
    return messages[:last], messages[last]["content"]


def parse_answer(raw: Any) -> tuple[list[Message], str]:
    """An answer given as a string, or as a message list whose last assistant turn is the answer."""
    if isinstance(raw, str):
        return [], raw
    return split_at_last_answer(parse_messages(raw))


def assistant_turn(text: str) -> list[Message]:
    return [{"role": "assistant", "content": text}]


def require_prompt(prompt: list[Message]) -> list[Message]:
    """A reward or answer for nothing teaches nothing: some turn must say something."""
    if not any(message["content"].strip() for message in prompt):
        raise UnusableRow("empty_prompt")
    return prompt



def make_pair(prompt: list[Message], chosen: str, rejected: str) -> Row:
    """A canonical pair, refusing the rows that would teach the reward model nothing or nonsense."""
    if not chosen.strip() or not rejected.strip():
        raise UnusableRow("empty_answer")
    if chosen.strip() == rejected.strip():
        raise UnusableRow("identical_answers")
    return {"prompt": require_prompt(prompt), "chosen": assistant_turn(chosen), "rejected": assistant_turn(rejected)}


def shared_prompt(row: Mapping, histories: list[list[Message]]) -> list[Message]:
    """The conversation the answers reply to: their common history, else the row's own `prompt`.

    UltraFeedback-style rows repeat the user turn inside chosen/rejected *and* give it as a string
    `prompt`; TRL-style rows keep the history in `prompt` and only the answer in chosen/rejected.
    """
    if any(history != histories[0] for history in histories):
        raise UnusableRow("mismatched_history")
    if histories[0]:
        return histories[0]
    return parse_prompt(required_field(row, "prompt"))


def pair_from_answers(row: Mapping, chosen_raw: Any, rejected_raw: Any) -> list[Row]:
    """Two answers (strings or message lists) already put in order, as one pair on their shared prompt."""
    chosen_history, chosen = parse_answer(chosen_raw)
    rejected_history, rejected = parse_answer(rejected_raw)
    prompt = shared_prompt(row, [chosen_history, rejected_history])
    return [make_pair(prompt, chosen, rejected)]
