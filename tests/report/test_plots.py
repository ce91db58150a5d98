"""Every stage report shows its plots, and each is a real image."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from rlhf_pipeline.report import REPORT
from tests.report.conftest import STAGES, check_png


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_report_references_valid_plots(chain: Path, stage: str) -> None:
    folder = chain / "outputs" / stage
    text = (folder / REPORT).read_text()
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", text)
    assert linked, text
    assert set(linked) == {p.name for p in folder.glob("*.png")}  # every plot shown, no stray plot
    for name in linked:
        check_png(folder / name)
    assert "—" not in text.splitlines()[2]  # the headline has all its numbers
