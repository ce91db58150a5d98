"""`rlhf-pipeline report RUN_DIR`: rewrite the reports of a stage folder, or of a folder of them."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.outputs import MARKER, ROUND_PREFIX, StageManifest, read_manifest
from rlhf_pipeline.report.stage import write_stage_report
from rlhf_pipeline.report.summary import write_summary_report


def _stage_folders(folder: Path) -> list[Path]:
    """Finished stage folders directly inside `folder` or in its rounds' folders, in the order they finished."""
    candidates = [*folder.iterdir(), *(p for rounds in folder.glob(f"{ROUND_PREFIX}*") if rounds.is_dir()
                                       for p in rounds.iterdir())]
    found = [(read_manifest(p), p) for p in candidates if p.is_dir() and (p / MARKER).is_file()]
    return [p for manifest, p in sorted(found, key=lambda item: (_finished_at(item[0]), str(item[1])))]


def _finished_at(manifest: StageManifest | None) -> str:
    return manifest.finished_at if manifest else ""


def _report_command(args: argparse.Namespace) -> int:
    folder = Path(args.run_dir)
    if not folder.is_dir():
        raise PipelineError(f"{folder}: no such folder")
    if (folder / MARKER).is_file():
        print(write_stage_report(folder))
        return 0
    stages = _stage_folders(folder)
    if not stages:
        raise PipelineError(f"{folder}: neither a finished stage folder (no {MARKER}) nor a folder of them")
    for stage in stages:
        print(write_stage_report(stage))
    print(write_summary_report(stages, folder, f"Run {folder.resolve().name}"))
    return 0


def add_commands(subparsers: Any) -> None:
    """`rlhf-pipeline report RUN_DIR`."""
    parser = subparsers.add_parser(
        "report", help="(re)write report.md and plots of a stage folder or of a folder of stage folders",
        description="Rewrite a finished stage's report.md and PNG plots from its saved metrics; given a folder of "
                    "stage folders, rewrite each one's and a summary report.md in that folder. No weights are loaded.",
        epilog="example: rlhf-pipeline report outputs/smollm2-135m",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a finished stage's output folder, or a folder of them")
    parser.set_defaults(handler=_report_command)
