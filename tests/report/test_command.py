"""`rlhf-pipeline report`: one stage folder, or a folder of them and its summary."""

from __future__ import annotations

import shutil
from pathlib import Path

from rlhf_pipeline.cli import main
from rlhf_pipeline.report import REPORT


def test_report_command_rewrites_a_stage_or_a_folder_of_stages(chain: Path, tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    for stage in ("label", "eval"):  # small folders without weights: a report needs none
        shutil.copytree(chain / "outputs" / stage, run_dir / stage)
        (run_dir / stage / REPORT).unlink()
    assert main(["report", str(run_dir / "label")]) == 0
    assert (run_dir / "label" / REPORT).is_file() and not (run_dir / REPORT).exists()
    assert main(["report", str(run_dir)]) == 0
    summary = (run_dir / REPORT).read_text()
    assert "[report](label/report.md)" in summary and "[report](eval/report.md)" in summary
    assert str(run_dir / REPORT) in capsys.readouterr().out
    assert main(["report", str(tmp_path)]) == 2  # neither a stage folder nor a folder of them
    assert "no stage.json" in capsys.readouterr().err
