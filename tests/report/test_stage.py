"""Stage reports without matplotlib, and report failures that only warn."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from rlhf_pipeline.report import write_report_safely, write_stage_report


def test_without_matplotlib_reports_say_how_to_get_plots_and_failures_only_warn(
        chain: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "label"
    shutil.copytree(chain / "outputs" / "label", folder)
    for png in folder.glob("*.png"):
        png.unlink()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    text = write_stage_report(folder).read_text()
    assert "pip install matplotlib" in text and "![" not in text and not list(folder.glob("*.png"))
    assert "pairs from 24 prompts" in text  # the numbers are all there

    assert write_report_safely(write_stage_report, tmp_path / "missing") is None
    assert "could not write the report" in caplog.text and "rlhf-pipeline report" in caplog.text


@pytest.mark.parametrize(("stage", "answers"), [("label", "ranked.jsonl"), ("eval", "answers.jsonl")])
def test_the_report_links_the_file_of_every_sampled_answer_when_there_is_one(chain: Path, tmp_path: Path, stage: str,
                                                                             answers: str) -> None:
    link = f"Every sampled answer: [`{answers}`]({answers}), one row per prompt"
    text = (chain / "outputs" / stage / "report.md").read_text()
    assert link in text and (chain / "outputs" / stage / answers).is_file()
    folder = shutil.copytree(chain / "outputs" / stage, tmp_path / stage)
    (folder / answers).unlink()  # a folder written before the stage kept its answers: no dangling link
    assert "Every sampled answer" not in write_stage_report(folder).read_text()
