"""The answers files of the sampling stages read back, and eval.json's summaries recomputed from them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest


def read_answers(folder: Path, name: str = "answers.jsonl") -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / name).read_text().splitlines()]


def assert_eval_summaries_match_answers(record: dict[str, Any], rows: list[dict[str, Any]],
                                           columns: set[str]) -> None:
    """eval.json's numbers recomputed from answers.jsonl: each column's mean per model, the share of answers that
    finished, each policy's mean KL and its gains over the baseline; every answer has every column."""
    models = {"baseline": (record["baseline"], [row["baseline"] for row in rows])} | {
        name: (summary, [row["policies"][name] for row in rows]) for name, summary in record["policies"].items()}
    for name, (summary, answers) in models.items():
        expected = {"answer", "finished", *columns} | ({"kl"} if name != "baseline" else set())
        assert all(set(answer) == expected for answer in answers), name
        for column in expected - {"answer", "finished"}:
            assert summary[column]["mean"] == pytest.approx(np.mean([a[column] for a in answers])), (name, column)
        assert summary["eos_fraction"] == pytest.approx(np.mean([a["finished"] for a in answers])), name
        if name != "baseline":
            baseline = models["baseline"][1]
            for column in columns - {"length_tokens"}:
                gain = np.mean([a[column] - b[column] for a, b in zip(answers, baseline, strict=True)])
                assert summary[f"{column}_gain"]["mean"] == pytest.approx(gain), (name, column)
