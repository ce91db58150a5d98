"""A chain's summary report.md in the common parent of its stage folders, and its lines for the console.

A chain with rounds (iterated RLHF, rlhf_pipeline/rounds.py) also gets one row per round, in both, and
`rounds.png`: the RM's held-out accuracy before and after each refresh, and each round's judge gain and KL.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlhf_pipeline.outputs import read_manifest, round_number, write_text_atomic
from rlhf_pipeline.report.plots import Plots, plot_rounds
from rlhf_pipeline.report.sections import cost_cells, read_json, table
from rlhf_pipeline.report.stage import REPORT, headline, presentation


def report_dir_for(stage_dirs: Sequence[Path], fallback: Path) -> Path:
    """Where a chain's summary goes: the stages' common parent folder (see the package docstring)."""
    resolved = [Path(d).resolve() for d in stage_dirs]
    common = Path(os.path.commonpath(resolved))
    if common in resolved:
        common = common.parent
    return Path(fallback).resolve() if common == Path(common.anchor) else common


_ROUND_HEADER = ["round", "new pairs", "RM accuracy before refresh", "after", "held-out pairs",
                 "judge gain over baseline [95% CI]", "judge", "RM reward", "KL (nats/answer)"]


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _gain(block: dict[str, Any] | None) -> str:
    return "—" if not block else f"{block['mean']:+.3f} [{block['ci95_low']:+.3f}, {block['ci95_high']:+.3f}]"


def round_measures(stage_dirs: Sequence[Path]) -> list[dict[str, Any]]:
    """One row per round (stage folders inside `round-<k>`): new pairs, the RM before/after its refresh, and the
    eval's judge gain over the baseline (with its 95% interval), judge score, RM reward and KL of the round's policy."""
    rows: dict[int, dict[str, Any]] = {}
    for folder in map(Path, stage_dirs):
        manifest = read_manifest(folder)
        if (number := round_number(folder)) is None or manifest is None:
            continue
        row = rows.setdefault(number, {"round": number})
        metrics = read_json(folder / "metrics.json") or manifest.metrics
        if manifest.stage == "label":
            row["new_pairs"] = metrics.get("counts", {}).get("pairs")
        elif manifest.stage == "rm":
            row |= {"rm_before": (metrics.get("before") or {}).get("eval_accuracy"),
                    "rm_after": metrics.get("eval_accuracy"), "rm_pairs": metrics.get("eval", {}).get("pairs")}
        elif manifest.stage == "eval" and metrics.get("policies"):
            policy = next(iter(metrics["policies"].values()))
            row |= {"judge_gain": policy.get("judge_gain"), "judge": policy.get("judge", {}).get("mean"),
                    "reward": policy.get("reward", {}).get("mean"), "kl": policy.get("kl")}
    return [rows[number] for number in sorted(rows)]


def rounds_section(rounds: Sequence[dict[str, Any]], plots: Plots) -> list[str]:
    """The rounds' table and plot: the RM's accuracy on the new policy's pairs before and after its refresh (the
    previous RM, then the refreshed one, on the same held-out pairs), and the round's policy against the baseline."""
    if not rounds:
        return []
    rows = [[row["round"], row.get("new_pairs"), _number(row.get("rm_before")), _number(row.get("rm_after")),
             row.get("rm_pairs"), _gain(row.get("judge_gain")), _number(row.get("judge")), _number(row.get("reward")),
             _number((row.get("kl") or {}).get("mean"))] for row in rounds]
    return ["## Rounds", "", "RM accuracy: on the held-out pairs sampled from the round's starting policy, by the "
            "previous round's reward model (before) and by the refreshed one (after). Judge, RM reward and KL: the "
            "round's policy on the eval stage's held-out prompts; each round's RM reward is its own RM's.", "",
            *table(_ROUND_HEADER, rows), *plots.add("rounds.png", "Across rounds", plot_rounds, list(rounds)),
            *plots.note()]


def console_rounds(stage_dirs: Sequence[Path]) -> list[str]:
    """The rounds' measures for the terminal, one line per round."""
    return [f"  round {row['round']}: {row.get('new_pairs', '—')} new pairs; RM accuracy "
            f"{_number(row.get('rm_before'))} -> {_number(row.get('rm_after'))} on {row.get('rm_pairs', '—')} "
            f"held-out pairs; judge gain {_gain(row.get('judge_gain'))}, "
            f"KL {_number((row.get('kl') or {}).get('mean'))}"
            for row in round_measures(stage_dirs)]


def write_summary_report(stage_dirs: Sequence[Path], report_dir: Path, title: str) -> Path:
    """One `report.md` over several stage folders: each stage's headline, wall time, peak memory and report link,
    and a row per round when some are rounds' (`round_measures`)."""
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
    lines += rounds_section(round_measures(stage_dirs), Plots(report_dir))
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
