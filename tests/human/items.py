"""Items for the human-feedback tests: every answer names its prompt and original index ("p2-a1"), so a test can
tell from the written files alone whether the shown order was undone correctly."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path


def answer(item: int, index: int) -> str:
    return f"Answer p{item}-a{index}: it is fine."


def write_items(path: Path, count: int = 4, answers: int = 3, judge_picks: Sequence[int] | None = None) -> Path:
    """A label stage's ranked.jsonl look-alike; the machine judge prefers answer `judge_picks[i]` of item i (the
    last answer of every item by default)."""
    picks = judge_picks or [answers - 1] * count
    rows = [{"prompt": [{"role": "user", "content": f"Prompt number {i}?"}],
             "answers": [answer(i, j) for j in range(answers)],
             "scores": [1.0 if j == picks[i] else 0.0 for j in range(answers)]}
            for i in range(count)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_ab_items(path: Path, count: int = 4) -> Path:
    rows = [{"prompt": f"AB prompt {i}?", "policy": f"policy answer {i}", "baseline": f"baseline answer {i}"}
            for i in range(count)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
