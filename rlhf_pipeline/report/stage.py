"""A finished stage folder's report.md (and its plots), written after stage.json and rewritable any time."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.outputs import MARKER, read_manifest, write_text_atomic
from rlhf_pipeline.report.plots import Plots
from rlhf_pipeline.report.sections import generic_headline, generic_section, read_json
from rlhf_pipeline.stages import Presentation, get_stage

logger = logging.getLogger(__name__)

REPORT = "report.md"


def presentation(stage: str) -> Presentation:
    """How the stage presents a finished run; a stage this install no longer has gets the generic one."""
    try:
        return get_stage(stage).presentation
    except PipelineError:
        return Presentation(title=stage, headline=generic_headline, section=generic_section)


def headline(stage: str, metrics: dict) -> str:
    """One line of a stage's most telling numbers, for the pipeline summary and the console."""
    return presentation(stage).headline(metrics)


def write_stage_report(output_dir: str | Path) -> Path:
    """Write `report.md` and its PNG plots into a finished stage folder; returns the report's path."""
    folder = Path(output_dir)
    manifest = read_manifest(folder)
    if manifest is None:
        raise PipelineError(f"{folder}: not a finished stage folder (no {MARKER}); nothing to report")
    metrics = read_json(folder / "metrics.json") or manifest.metrics
    plots = Plots(folder)
    shown = presentation(manifest.stage)
    section = shown.section(folder, metrics, plots)
    earlier = [Path(stage_dir).name for stage_dir in manifest.lineage]
    lines = [f"# {shown.title}" + (f" ({folder.name})" if folder.name != manifest.stage else ""), "",
             f"{shown.headline(metrics)}.", "",
             f"Finished {manifest.finished_at}; base model `{manifest.base_model.get('origin')}`"
             + (f", starting from {' → '.join(earlier)}" if earlier else "")
             + ". Numbers: `metrics.json`; recipe: `recipe.yaml`.", "", *sampling_lines(metrics),
             *_answers_link(folder, shown), *section,
             *plots.note()]
    path = folder / REPORT
    write_text_atomic(path, "\n".join(lines).rstrip() + "\n")
    return path


def _answers_link(folder: Path, shown: Presentation) -> list[str]:
    """The line linking the stage's file of every sampled answer, when it wrote one."""
    if shown.answers is None or not (folder / shown.answers[0]).is_file():
        return []
    name, holds = shown.answers
    return [f"Every sampled answer: [`{name}`]({name}), {holds}.", ""]


def sampling_lines(metrics: dict) -> list[str]:
    """Which engine sampled the stage's answers and how fast (its `resources.sampling`), when it sampled."""
    record = (metrics.get("resources") or {}).get("sampling")
    if not record:
        return []
    speed = f"{record['tokens_per_second']:g} tokens/s" if record.get("tokens_per_second") else "no tokens"
    syncs = (f"; {record['syncs']} policy version(s) synced in {record['sync_seconds']:g} s, engine start-up "
             f"{record['startup_seconds']:g} s" if record["engine"] != "hf" else "")
    return [f"Sampled with {record['engine']}: {record['sampled_tokens']} tokens in {record['sampling_seconds']:g} s "
            f"({speed}){syncs}.", ""]


def write_report_safely(write: Callable[[Path], Path], target: str | Path) -> Path | None:
    """Run a report writer after a stage or chain has finished: a failure warns, never undoes finished work."""
    try:
        return write(Path(target))
    except Exception as err:
        logger.warning("could not write the report for %s (%s: %s); the outputs are complete, and "
                       "`rlhf-pipeline report FOLDER` writes the report again", target, type(err).__name__, err)
        return None
