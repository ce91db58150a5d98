"""A finished stage folder's report.md (and its plots), written after stage.json and rewritable any time."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.outputs import MARKER, read_manifest, write_text_atomic
from rlhf_pipeline.report.plots import Plots
from rlhf_pipeline.report.sections import SECTIONS, generic_section, headline, read_json

logger = logging.getLogger(__name__)

REPORT = "report.md"
_TITLES = {"sft": "Supervised fine-tuning", "label": "AI-feedback labelling", "rm": "Reward model", "ppo": "PPO",
           "eval": "Evaluation: policy vs baseline"}


def write_stage_report(output_dir: str | Path) -> Path:
    """Write `report.md` and its PNG plots into a finished stage folder; returns the report's path."""
    folder = Path(output_dir)
    manifest = read_manifest(folder)
    if manifest is None:
        raise PipelineError(f"{folder}: not a finished stage folder (no {MARKER}); nothing to report")
    metrics = read_json(folder / "metrics.json") or manifest.metrics
    plots = Plots(folder)
    section = SECTIONS.get(manifest.stage, generic_section)(folder, metrics, plots)
    earlier = [Path(stage_dir).name for stage_dir in manifest.lineage]
    title = _TITLES.get(manifest.stage, manifest.stage)
    lines = [f"# {title}" + (f" ({folder.name})" if folder.name != manifest.stage else ""), "",
             f"{headline(manifest.stage, metrics)}.", "",
             f"Finished {manifest.finished_at}; base model `{manifest.base_model.get('origin')}`"
             + (f", starting from {' → '.join(earlier)}" if earlier else "")
             + ". Numbers: `metrics.json`; recipe: `recipe.yaml`.", "", *section, *plots.note()]
    path = folder / REPORT
    write_text_atomic(path, "\n".join(lines).rstrip() + "\n")
    return path


def write_report_safely(write: Callable[[Path], Path], target: str | Path) -> Path | None:
    """Run a report writer after a stage or chain has finished: a failure warns, never undoes finished work."""
    try:
        return write(Path(target))
    except Exception as err:
        logger.warning("could not write the report for %s (%s: %s); the outputs are complete, and "
                       "`rlhf-pipeline report FOLDER` writes the report again", target, type(err).__name__, err)
        return None
