"""The pipeline summary links every stage's report and shows what each stage cost."""

from __future__ import annotations

import re
from pathlib import Path

from rlhf_pipeline.report import REPORT
from tests.report.conftest import STAGES


def test_pipeline_summary_links_every_stage_report(chain: Path) -> None:
    summary = (chain / "outputs" / REPORT).read_text()
    links = re.findall(r"\[report\]\(([^)]+)\)", summary)
    assert links == [f"{stage}/{REPORT}" for stage in STAGES]
    assert "held-out accuracy" in summary and "eval/eval_tradeoff.png" in summary
    rows = [line for line in summary.splitlines() if line.startswith(("| sft |", "| ppo |", "| eval |"))]
    assert len(rows) == 3 and all(re.search(r"\| [\d.]+ s \| [\d.]+ GiB \| \[report\]", row) for row in rows), rows
