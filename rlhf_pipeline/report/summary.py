"""A chain's summary report.md in the common parent of its stage folders, and its lines for the console."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from rlhf_pipeline.outputs import read_manifest, write_text_atomic
from rlhf_pipeline.report.sections import cost_cells, read_json, table
from rlhf_pipeline.report.stage import REPORT, headline, presentation


def report_dir_for(stage_dirs: Sequence[Path], fallback: Path) -> Path:
    """Where a chain's summary goes: the stages' common parent folder (see the package docstring)."""
    resolved = [Path(d).resolve() for d in stage_dirs]
    common = Path(os.path.commonpath(resolved))
    if common in resolved:
        common = common.parent
    return Path(fallback).resolve() if common == Path(common.anchor) else common


def write_summary_report(stage_dirs: Sequence[Path], report_dir: Path, title: str) -> Path:
    """One `report.md` over several stage folders: each stage's headline, wall time, peak memory and report link."""
    report_dir = Path(report_dir)
    rows: list[list[str]] = []
    warnings: list[str] = []
    figures: list[tuple[str, str]] = []
    for folder in stage_dirs:
        folder = Path(folder)
        manifest = read_manifest(folder)
        link = os.path.relpath(folder / REPORT, report_dir)
        if manifest is None:
            rows.append(["—", f"`{os.path.relpath(folder, report_dir)}`", "not finished", "—", "—", "—"])
            continue
        metrics = read_json(folder / "metrics.json") or manifest.metrics
        report_link = f"[report]({link})" if (folder / REPORT).is_file() else "—"
        shown = presentation(manifest.stage)
        rows.append([manifest.stage, f"`{os.path.relpath(folder, report_dir)}`", shown.headline(metrics),
                     *cost_cells(metrics.get("resources")), report_link])
        if shown.summary_note is not None and (note := shown.summary_note(folder, metrics)):
            warnings.append(note)
        if shown.summary_figure is not None and (folder / shown.summary_figure[0]).is_file():
            figures.append((os.path.relpath(folder / shown.summary_figure[0], report_dir), shown.summary_figure[1]))
    lines = [f"# {title}", "", *table(["stage", "folder", "headline", "wall time", "peak memory", "details"], rows)]
    if warnings:
        lines += ["## Warnings", "", *warnings, ""]
    for path, caption in figures:
        lines += [f"## {caption}", "", f"![{Path(path).stem}]({path})", ""]
    path = report_dir / REPORT
    write_text_atomic(path, "\n".join(lines).rstrip() + "\n")
    return path


def console_summary(stage_dirs: Sequence[Path], ran: Sequence[bool]) -> list[str]:
    """The chain at a glance for the terminal: each stage's wall time and peak memory (or "skipped"), headline."""
    lines = []
    for folder, this_run in zip(stage_dirs, ran, strict=True):
        manifest = read_manifest(folder)
        if manifest is None:
            continue
        metrics = read_json(Path(folder) / "metrics.json") or manifest.metrics
        wall, peak = cost_cells(metrics.get("resources")) if this_run else ("skipped", "")
        lines.append(f"  {manifest.stage:<6} {wall:>8} {peak:>9}  {headline(manifest.stage, metrics)}")
    return lines
