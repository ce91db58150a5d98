"""Reports a person can look at: `report.md` and PNG plots in every stage folder, one summary per chain.

    rlhf-pipeline report outputs/smollm2-135m/ppo   # one stage folder
    rlhf-pipeline report outputs/smollm2-135m       # every stage folder in it, then the summary

Each stage writes its report when it finishes (`stages/common.finish_outputs`) and `run` writes the summary
at the end of the chain. Both read only what the stages wrote (stage.json, metrics.json, eval.json, the
label stage's JSONL files), so `rlhf-pipeline report` can rewrite them at any time without torch.

- sft: eval loss and perplexity before/after, data; `sft_loss.png`: train loss (+ token accuracy), eval loss.
- label: answers, pairs, judge; `label.png`: judge scores of all answers, judge gaps of the kept pairs.
- rm: accuracy, margin, calibration (ECE, Brier); `rm_training.png`: loss and accuracy per step;
  `rm_rewards.png`: chosen vs rejected rewards on the held-out pairs, reliability diagram.
- ppo: first vs last log, health alerts, early stop, samples; `ppo_training.png`: score, KL, entropy,
  length, clip fractions and stop-token share per step, alerts marked.
- eval: gains and win rates with 95% intervals, KL, samples; `eval.png`: baseline vs policy judge scores,
  rewards and lengths.

The pipeline summary is `report.md` in the common parent folder of the stage outputs (for the demo,
`outputs/smollm2-135m/`); if that parent is itself a stage folder, its parent; if the stages share only the
filesystem root, the pipeline recipe's folder. Plots need matplotlib (the `demo` and `dev` extras); without
it the reports are written without plots and say how to get them.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.outputs import MARKER, StageManifest, read_manifest, write_text_atomic

logger = logging.getLogger(__name__)

REPORT = "report.md"
_TITLES = {"sft": "Supervised fine-tuning", "label": "AI-feedback labelling", "rm": "Reward model", "ppo": "PPO",
           "eval": "Evaluation: policy vs baseline"}
_DPI = 110
_BASELINE, _POLICY = "tab:blue", "tab:orange"
_CHOSEN, _REJECTED = "tab:green", "tab:red"
_PPO_PANELS = (("objective/scores", "score (shaped RM reward)"), ("objective/kl", "KL to reference (nats/answer)"),
               ("objective/entropy", "entropy (nats/token)"), ("response/length", "answer length (tokens)"),
               ("policy/clipfrac", "clip fraction"), ("response/eos_fraction", "answers with stop token"))
_ALERT_PANEL = {"max_kl": "objective/kl", "min_entropy": "objective/entropy", "max_length_drift": "response/length",
                "max_missing_eos_fraction": "response/eos_fraction", "max_reward_jump": "objective/scores"}


# ------------------------------------------------------------------------------------------- formatting


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, (bool, int)):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}g}" if math.isfinite(value) else str(value)
    return str(value)


def _interval(block: dict[str, Any] | None, signed: bool = False) -> str:
    """`mean [low, high]` of a summary block (sequence_summary or a gain), or — when absent."""
    if not block:
        return "—"
    sign = "+" if signed else ""
    return f"{block['mean']:{sign}.3f} [{block['ci95_low']:{sign}.3f}, {block['ci95_high']:{sign}.3f}]"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    def cell(value: Any) -> str:
        return _fmt(value).replace("|", "\\|").replace("\n", " ")

    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(cell(v) for v in row) + " |" for row in rows), ""]


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _numeric(history: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the log entries that carry `key`."""
    points = [(entry["step"], entry[key]) for entry in history
              if isinstance(entry.get(key), (int, float)) and "step" in entry]
    return [p[0] for p in points], [p[1] for p in points]


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------- plots


class _Plots:
    """Writes a stage's PNGs (matplotlib's Agg canvas, no pyplot state) and the markdown that shows them."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            self.available = False
        else:
            self.available = True

    def add(self, name: str, title: str, draw: Callable[..., Any], *data: Any) -> list[str]:
        """Draw `draw(*data)` (a Figure, or None when there is nothing to plot) into `name`; its markdown."""
        if not self.available:
            return []
        figure = draw(*data)
        if figure is None:
            return []
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        FigureCanvasAgg(figure)
        path = self.folder / name
        scratch = path.with_name(f".{name}.tmp")
        figure.savefig(scratch, dpi=_DPI, format="png")
        os.replace(scratch, path)
        return [f"![{title}]({name})", ""]

    def note(self) -> list[str]:
        return [] if self.available else ["_Plots need matplotlib: `pip install matplotlib`, then "
                                          f"`rlhf-pipeline report {self.folder}`._", ""]


def _figure(panels: int, columns: int = 3, height: float = 3.2) -> tuple[Any, list[Any]]:
    from matplotlib.figure import Figure

    columns = min(columns, panels)
    rows = math.ceil(panels / columns)
    figure = Figure(figsize=(4.4 * columns, height * rows), layout="constrained")
    axes = list(figure.subplots(rows, columns, squeeze=False).ravel())
    for extra in axes[panels:]:
        extra.set_visible(False)
    return figure, axes[:panels]


def _grid(axis: Any, steps: bool = False) -> None:
    """Light grid, plain tick labels (no offset), integer ticks on step axes."""
    from matplotlib.ticker import MaxNLocator

    axis.grid(alpha=0.3)
    axis.ticklabel_format(axis="y", useOffset=False)
    if steps:
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))


def _shared_bins(*groups: Sequence[float], bins: int = 20) -> Any:
    import numpy as np

    values = np.concatenate([np.asarray(g, dtype=float) for g in groups if len(g)])
    values = values[np.isfinite(values)]
    if values.size == 0:
        return bins
    low, high = float(values.min()), float(values.max())
    if high - low < 1e-9:
        low, high = low - 0.5, high + 0.5
    return np.linspace(low, high, bins + 1)


def _compare_hist(axis: Any, first: Sequence[float], second: Sequence[float], labels: tuple[str, str],
                  colors: tuple[str, str], xlabel: str) -> None:
    bins = _shared_bins(first, second)
    for values, label, color in ((first, labels[0], colors[0]), (second, labels[1], colors[1])):
        if not len(values):
            continue
        mean = sum(values) / len(values)
        axis.hist(values, bins=bins, alpha=0.35, color=color)
        axis.hist(values, bins=bins, histtype="step", linewidth=1.8, color=color,
                  label=f"{label}: n={len(values)}, mean {mean:.3g}")
        axis.axvline(mean, color=color, linestyle="--", linewidth=1.5)
    axis.set_xlabel(xlabel)
    axis.set_ylabel("count")
    axis.legend(fontsize=8)
    _grid(axis)


def _plot_sft(history: list[dict[str, Any]], metrics: dict[str, Any]) -> Any:
    steps, losses = _numeric(history, "loss")
    if not steps:
        return None
    acc_steps, accuracy = _numeric(history, "mean_token_accuracy")
    figure, axes = _figure(2 if acc_steps else 1, height=3.6)
    axis = axes[0]
    axis.plot(steps, losses, marker="o" if len(steps) < 30 else None, label="train loss")
    eval_points = dict(zip(*_numeric(history, "eval_loss"), strict=True))  # evaluations logged during training
    for step, key in ((0, "eval_loss_before"), (metrics.get("global_steps"), "eval_loss")):
        if metrics.get(key) is not None and step is not None:
            eval_points.setdefault(step, metrics[key])
    if eval_points:
        steps_eval = sorted(eval_points)
        axis.plot(steps_eval, [eval_points[s] for s in steps_eval], "s--", color="tab:red", markersize=7,
                  label="held-out eval loss (step 0 = before training)")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss (answer tokens)")
    axis.set_title("SFT loss")
    axis.legend(fontsize=8)
    _grid(axis, steps=True)
    if acc_steps:
        axes[1].plot(acc_steps, accuracy, marker="o" if len(acc_steps) < 30 else None, color="tab:green")
        axes[1].set_xlabel("optimizer step")
        axes[1].set_ylabel("next-token accuracy")
        axes[1].set_title("SFT token accuracy (train batches)")
        _grid(axes[1], steps=True)
    return figure


def _plot_rm_training(history: list[dict[str, Any]], held_out_accuracy: float | None = None) -> Any:
    steps, losses = _numeric(history, "loss")
    if not steps:
        return None
    acc_steps, accuracy = _numeric(history, "accuracy")
    figure, axes = _figure(2 if acc_steps else 1, height=3.6)
    marker = "o" if len(steps) < 30 else None
    axes[0].plot(steps, losses, marker=marker)
    axes[0].axhline(math.log(2), color="gray", linestyle=":", label="chance (log 2)")
    axes[0].set_title("RM pairwise loss (train batches)")
    axes[0].set_ylabel("−log σ(r⁺ − r⁻)")
    axes[0].legend(fontsize=8)
    if acc_steps:
        axes[1].plot(acc_steps, accuracy, marker=marker, color="tab:green", label="train batches")
        if held_out_accuracy is not None:
            axes[1].scatter([acc_steps[-1]], [held_out_accuracy], marker="*", s=220, color="black", zorder=3,
                            label=f"held-out pairs, final ({held_out_accuracy:.3f})")
        axes[1].axhline(0.5, color="gray", linestyle=":", label="chance")
        axes[1].set_ylim(-0.02, 1.02)
        axes[1].set_title("RM pairwise accuracy")
        axes[1].set_ylabel("accuracy")
        axes[1].legend(fontsize=8)
    for axis in axes:
        axis.set_xlabel("optimizer step")
        _grid(axis, steps=True)
    return figure


def _plot_rm_rewards(held_out: dict[str, Any]) -> Any:
    chosen, rejected = held_out.get("chosen_rewards") or [], held_out.get("rejected_rewards") or []
    if not chosen:
        return None
    bins = [b for b in held_out.get("calibration_bins", []) if b["count"]]
    figure, axes = _figure(2 if bins else 1, height=3.8)
    _compare_hist(axes[0], chosen, rejected, ("chosen", "rejected"), (_CHOSEN, _REJECTED), "reward")
    axes[0].set_title(f"Held-out rewards ({len(chosen)} pairs)")
    if bins:
        axis = axes[1]
        axis.plot([0.5, 1.0], [0.5, 1.0], color="gray", linestyle=":", label="perfect calibration")
        centers = [(b["low"] + b["high"]) / 2 for b in bins]
        widths = [b["high"] - b["low"] for b in bins]
        axis.bar(centers, [b["accuracy"] for b in bins], width=widths, alpha=0.6, edgecolor="black",
                 label="accuracy in bin")
        axis.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o", color="black",
                  label="mean confidence")
        for center, b in zip(centers, bins, strict=True):
            axis.annotate(str(b["count"]), (center, min(b["accuracy"] + 0.03, 1.0)), ha="center", fontsize=7)
        axis.set_xlim(0.5, 1.0)
        axis.set_ylim(0.0, 1.05)
        axis.set_xlabel("confidence max(p, 1 − p), p = σ(r⁺ − r⁻)")
        axis.set_ylabel("share of pairs ranked correctly")
        axis.set_title(f"Reliability (ECE {held_out.get('ece', float('nan')):.3f})")
        axis.legend(fontsize=8, loc="lower right")
        _grid(axis)
    return figure


def _plot_ppo(history: list[dict[str, Any]], alerts: list[dict[str, Any]]) -> Any:
    numeric = [entry for entry in history if "objective/scores" in entry]
    if not numeric:
        return None
    figure, axes = _figure(len(_PPO_PANELS))
    marker = "o" if len(numeric) < 30 else None
    for axis, (key, title) in zip(axes, _PPO_PANELS, strict=True):
        steps, values = _numeric(numeric, key)
        axis.plot(steps, values, marker=marker, markersize=4, label=key.split("/")[-1])
        if key == "objective/scores":
            _, spread = _numeric(numeric, "objective/scores_std")
            if len(spread) == len(values):
                axis.fill_between(steps, [v - s for v, s in zip(values, spread, strict=True)],
                                  [v + s for v, s in zip(values, spread, strict=True)], alpha=0.2,
                                  label="± std over answers")
        if key == "policy/clipfrac":
            val_steps, val_values = _numeric(numeric, "val/clipfrac")
            axis.plot(val_steps, val_values, marker=marker, markersize=4, label="value clipfrac")
        if key == "response/eos_fraction":
            axis.set_ylim(-0.02, 1.02)
        axis.set_title(title)
        axis.set_xlabel("PPO step")
        _grid(axis, steps=True)
    panel = dict(zip((key for key, _ in _PPO_PANELS), axes, strict=True))
    first_length = numeric[0].get("response/length")
    for entry in alerts:
        for axis in axes:
            axis.axvline(entry["step"], color="red", linestyle="--", alpha=0.6)
        for alert in entry["alerts"]:
            axis = panel.get(_ALERT_PANEL.get(alert["monitor"], ""), axes[0])
            threshold = alert["threshold"]
            lines = {"max_kl": [threshold], "min_entropy": [threshold],
                     "max_missing_eos_fraction": [1 - threshold],
                     "max_length_drift": [first_length * (1 - threshold), first_length * (1 + threshold)]
                     if first_length is not None else []}.get(alert["monitor"], [])
            for y in lines:
                axis.axhline(y, color="red", linestyle=":", alpha=0.8)
    if alerts:
        axes[0].plot([], [], color="red", linestyle="--", label="health alert")
    for axis in axes:
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7)
    return figure


def _plot_eval(per_answer: dict[str, dict[str, list[float]]], judge: str) -> Any:
    columns = [(column, label) for column, label in (("judge", f"judge score ({judge})"), ("reward", "RM reward"),
                                                      ("length_tokens", "answer length (tokens)"))
               if column in per_answer.get("baseline", {})]
    if not columns:
        return None
    figure, axes = _figure(len(columns), height=3.6)
    for axis, (column, label) in zip(axes, columns, strict=True):
        _compare_hist(axis, per_answer["baseline"][column], per_answer["policy"][column],
                      ("baseline (SFT)", "policy (PPO)"), (_BASELINE, _POLICY), label)
        axis.set_title(f"Held-out answers: {label.split(' (')[0]}")
    return figure


def _plot_label(ranked: list[dict[str, Any]], pairs: list[dict[str, Any]]) -> Any:
    scores = [s for row in ranked for s in row.get("scores", [])]
    if not scores:
        return None
    gaps = [p["judge_gap"] for p in pairs if "judge_gap" in p]
    figure, axes = _figure(2 if gaps else 1, height=3.6)
    axes[0].hist(scores, bins=_shared_bins(scores), color="tab:purple", alpha=0.75)
    axes[0].set_title(f"Judge scores of all {len(scores)} sampled answers")
    axes[0].set_xlabel("judge score")
    axes[0].set_ylabel("answers")
    if gaps:
        axes[1].hist(gaps, bins=_shared_bins(gaps), color="tab:green", alpha=0.75)
        axes[1].set_title(f"Judge gap of the {len(gaps)} kept pairs")
        axes[1].set_xlabel("score(chosen) − score(rejected)")
        axes[1].set_ylabel("pairs")
    for axis in axes:
        _grid(axis)
    return figure


# ------------------------------------------------------------------------------------ stage sections


def headline(stage: str, metrics: dict[str, Any]) -> str:
    """One line of a stage's most telling numbers, for the pipeline summary and the console."""
    if stage == "sft":
        return (f"eval loss {_fmt(metrics.get('eval_loss_before'))} → {_fmt(metrics.get('eval_loss'))}, "
                f"perplexity {_fmt(metrics.get('perplexity_before'))} → {_fmt(metrics.get('perplexity'))}, "
                f"{_fmt(metrics.get('global_steps'))} steps")
    if stage == "label":
        counts = metrics.get("counts", {})
        return (f"{_fmt(counts.get('pairs'))} pairs from {_fmt(counts.get('prompts'))} prompts "
                f"({_fmt(counts.get('answers'))} answers), mean judge score {_fmt(metrics.get('mean_judge_score'))}")
    if stage == "rm":
        held_out = metrics.get("eval", {})
        return (f"held-out accuracy {_fmt(metrics.get('eval_accuracy'))} on {_fmt(held_out.get('pairs'))} pairs, "
                f"margin {_fmt(metrics.get('eval_mean_margin'))}, ECE {_fmt(metrics.get('eval_ece'))}, "
                f"Brier {_fmt(metrics.get('eval_brier'))}")
    if stage == "ppo":
        first, final = metrics.get("first", {}), metrics.get("final", {})
        line = (f"score {_fmt(first.get('objective/scores'))} → {_fmt(final.get('objective/scores'))}, "
                f"KL {_fmt(final.get('objective/kl'))}, {_fmt(metrics.get('global_steps'))} steps")
        alerts = sum(len(entry["alerts"]) for entry in metrics.get("alerts") or [])
        if alerts:
            line += f", {alerts} health alert(s)"
        if metrics.get("stopped_early"):
            line += f"; **stopped early at step {metrics['stop']['step']}**"
        return line
    if stage == "eval":
        parts = [f"{column} gain {_interval(metrics[f'{column}_gain'], signed=True)}, win rate "
                 f"{_fmt(metrics[f'{column}_gain'].get('win_rate', metrics.get(f'{column}_win_rate')), 3)}"
                 for column in ("reward", "judge") if f"{column}_gain" in metrics]
        if "kl" in metrics:
            parts.append(f"KL {metrics['kl']['mean']:.3f} nats/answer")
        return "; ".join(parts)
    scalars = [f"{key} {_fmt(value)}" for key, value in metrics.items() if isinstance(value, (int, float))]
    return ", ".join(scalars[:4])


def _data_rows(metrics: dict[str, Any]) -> list[list[Any]]:
    data = metrics.get("data") or {}
    if not data:
        return []
    dropped = ", ".join(f"{reason} {count}" for reason, count in (data.get("rows_dropped") or {}).items()) or "none"
    return [["data rows kept / read", f"{data.get('rows_kept')} / {data.get('rows_read')}"],
            ["rows dropped", dropped]]


def _sft_section(folder: Path, metrics: dict[str, Any], plots: _Plots) -> list[str]:
    history = metrics.get("log_history") or []
    rows = [["eval loss (before → after)",
             f"{_fmt(metrics.get('eval_loss_before'))} → {_fmt(metrics.get('eval_loss'))}"],
            ["perplexity (before → after)",
             f"{_fmt(metrics.get('perplexity_before'))} → {_fmt(metrics.get('perplexity'))}"],
            ["train loss (mean over the run)", metrics.get("train_loss")],
            ["optimizer steps", metrics.get("global_steps")], ["global batch size", metrics.get("global_batch_size")],
            *_data_rows(metrics)]
    return [*_table(["", "value"], rows), *plots.add("sft_loss.png", "SFT loss", _plot_sft, history, metrics)]


def _label_section(folder: Path, metrics: dict[str, Any], plots: _Plots) -> list[str]:
    counts = metrics.get("counts", {})
    answers = counts.get("answers") or 0
    rows = [["judge", metrics.get("judge")], ["prompts", counts.get("prompts")], ["answers sampled", answers],
            ["answers that ended with the stop token",
             f"{counts.get('finished_answers')} ({counts.get('finished_answers', 0) / max(answers, 1):.0%})"],
            ["preference pairs kept", counts.get("pairs")],
            ["pairs dropped (judge gap below min_gap)", counts.get("dropped_below_min_gap")],
            ["mean judge score", metrics.get("mean_judge_score")], *_data_rows(metrics)]
    ranked, pairs = _read_jsonl(folder / "ranked.jsonl"), _read_jsonl(folder / "preferences.jsonl")
    lines = [*_table(["", "value"], rows), *plots.add("label.png", "Judge scores", _plot_label, ranked, pairs)]
    if pairs:
        lines += ["## Example pairs", "", *_table(["chosen", "rejected", "judge gap"],
                                                 [[_short(p["chosen"], 120), _short(p["rejected"], 120),
                                                   p.get("judge_gap")] for p in pairs[:5]])]
    return [*lines, "The pairs are in `preferences.jsonl`, described by `data_card.yaml`; every scored answer is "
            "in `ranked.jsonl`.", ""]


def _rm_section(folder: Path, metrics: dict[str, Any], plots: _Plots) -> list[str]:
    held_out, stats = metrics.get("eval", {}), metrics.get("reward_stats", {})
    rows = [["held-out pairs", held_out.get("pairs")], ["pairwise accuracy", metrics.get("eval_accuracy")],
            ["mean margin r(chosen) − r(rejected)", metrics.get("eval_mean_margin")],
            ["expected calibration error (ECE)", held_out.get("ece")],
            ["Brier score of σ(margin)", held_out.get("brier")], ["log loss", held_out.get("log_loss")],
            ["mean reward chosen / rejected",
             f"{_fmt(held_out.get('chosen_reward_mean'))} / {_fmt(held_out.get('rejected_reward_mean'))}"],
            ["training reward mean / std (PPO normalises with these)",
             f"{_fmt(stats.get('mean'))} / {_fmt(stats.get('std'))}"],
            ["optimizer steps", metrics.get("global_steps")], *_data_rows(metrics)]
    history = metrics.get("log_history") or []
    return [*_table(["", "value"], rows),
            *plots.add("rm_training.png", "RM training", _plot_rm_training, history, metrics.get("eval_accuracy")),
            *plots.add("rm_rewards.png", "Held-out rewards and calibration", _plot_rm_rewards, held_out)]


def _ppo_section(folder: Path, metrics: dict[str, Any], plots: _Plots) -> list[str]:
    history = metrics.get("log_history") or []
    alerts = [entry for entry in history if "alerts" in entry]
    first, final = metrics.get("first", {}), metrics.get("final", {})
    lines: list[str] = []
    if metrics.get("stopped_early"):
        stop = metrics["stop"]
        lines += [f"**Stopped early at step {stop['step']}** (`early_stop_on_alert`): "
                  + "; ".join(a["message"] for a in stop["alerts"])
                  + ". The policy of that step is this stage's adapter; the checkpoint is "
                  + f"`{Path(stop['checkpoint']).name}`.",
                  ""]
    keys = ("objective/scores", "objective/raw_scores", "objective/kl", "objective/entropy", "response/length",
            "response/eos_fraction", "policy/clipfrac", "val/clipfrac", "loss/value", "val/explained_variance")
    lines += _table(["", f"first log (step {first.get('step', '—')})", f"last log (step {final.get('step', '—')})"],
                    [[key, first.get(key), final.get(key)] for key in keys])
    lines += [f"{metrics.get('global_steps')} PPO steps of {metrics.get('global_batch_size')} prompts; reward model "
              f"`{metrics.get('reward_model')}`.", ""]
    lines += plots.add("ppo_training.png", "PPO training", _plot_ppo, history, alerts)
    lines += ["## Health alerts", ""]
    if alerts:
        flat = [[entry["step"], a["monitor"], _fmt(a["value"], 6), _fmt(a["threshold"], 6), a["message"]]
                for entry in alerts for a in entry["alerts"]]
        lines += _table(["step", "monitor", "value", "threshold", "message"], flat[:30])
        if len(flat) > 30:
            lines += [f"… and {len(flat) - 30} more in metrics.json.", ""]
    else:
        lines += ["None (thresholds: `training.max_kl`, `min_entropy`, `max_length_drift`, "
                  "`max_missing_eos_fraction`, `max_reward_jump`).", ""]
    samples = [entry for entry in history if "samples" in entry]
    if samples:
        last = samples[-1]
        lines += [f"## Samples at step {last['step']}", "",
                  *_table(["prompt", "response", "RM score"],
                          [[_short(s["prompt"], 100), _short(s["response"]), s["score"]] for s in last["samples"]])]
    return lines


def _eval_section(folder: Path, metrics: dict[str, Any], plots: _Plots) -> list[str]:
    full = _read_json(folder / "eval.json") or metrics
    rows = []
    for key, label in (("reward", "RM reward"), ("judge", "judge score"), ("length_tokens", "answer length (tokens)")):
        if key in full.get("baseline", {}):
            base, pol = full["baseline"][key], full["policy"][key]
            rows.append([f"{label}: mean [95% CI]", _interval(base), _interval(pol)])
            rows.append([f"{label}: median / p90", f"{_fmt(base.get('median'))} / {_fmt(base.get('p90'))}",
                         f"{_fmt(pol.get('median'))} / {_fmt(pol.get('p90'))}"])
    rows.append(["answers ending with the stop token", f"{full['baseline']['eos_fraction']:.2f}",
                 f"{full['policy']['eos_fraction']:.2f}"])
    lines = [f"{full.get('prompts')} held-out prompts, judge `{full.get('judge')}`.", "",
             *_table(["", "baseline (SFT)", "policy (PPO)"], rows)]
    gains = []
    for column, label in (("reward", "RM reward"), ("judge", "judge score")):
        gain = full.get(f"{column}_gain")
        if gain:
            win = gain.get("win_rate", full.get(f"{column}_win_rate"))
            win_ci = (f" [{gain['win_rate_ci95_low']:.2f}, {gain['win_rate_ci95_high']:.2f}]"
                      if "win_rate_ci95_low" in gain else "")
            record = f"{gain['wins']} / {gain['ties']} / {gain['losses']}" if "wins" in gain else "—"
            gains.append([label, _interval(gain, signed=True), f"{win:.2f}{win_ci}", record])
    if gains:
        lines += ["Paired comparison, policy − baseline on the same prompts (bootstrap 95% intervals):", "",
                  *_table(["", "gain [95% CI]", "win rate [95% CI]", "wins / ties / losses"], gains)]
    kl = full.get("kl")
    if kl:
        lines += [f"KL(policy ‖ baseline) per answer: {_interval(kl)} nats (median {_fmt(kl.get('median'))}, "
                  f"p90 {_fmt(kl.get('p90'))}); Monte-Carlo estimate on the policy's samples.", ""]
    lines += plots.add("eval.png", "Baseline vs policy", _plot_eval, full.get("per_answer") or {}, full.get("judge"))
    examples = full.get("examples") or []
    if examples:
        lines += ["## Samples", "", *_table(["prompt", "baseline (SFT)", "policy (PPO)"],
                                            [[_short(e["prompt"], 100), _short(e["baseline"]), _short(e["policy"])]
                                             for e in examples])]
    return lines


def _generic_section(folder: Path, metrics: dict[str, Any], plots: _Plots) -> list[str]:
    rows = [[key, value] for key, value in metrics.items() if isinstance(value, (int, float, str)) or value is None]
    history = metrics.get("log_history") or []
    return [*_table(["metric", "value"], rows), *plots.add("training.png", "Training", _plot_rm_training, history)]


_SECTIONS: dict[str, Callable[[Path, dict[str, Any], _Plots], list[str]]] = {
    "sft": _sft_section, "label": _label_section, "rm": _rm_section, "ppo": _ppo_section, "eval": _eval_section,
}


# ------------------------------------------------------------------------------------------- public


def write_stage_report(output_dir: str | Path) -> Path:
    """Write `report.md` and its PNG plots into a finished stage folder; returns the report's path."""
    folder = Path(output_dir)
    manifest = read_manifest(folder)
    if manifest is None:
        raise PipelineError(f"{folder}: not a finished stage folder (no {MARKER}); nothing to report")
    metrics = _read_json(folder / "metrics.json") or manifest.metrics
    plots = _Plots(folder)
    section = _SECTIONS.get(manifest.stage, _generic_section)(folder, metrics, plots)
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


def report_dir_for(stage_dirs: Sequence[Path], fallback: Path) -> Path:
    """Where a chain's summary goes: the stages' common parent folder (see the module docstring)."""
    resolved = [Path(d).resolve() for d in stage_dirs]
    common = Path(os.path.commonpath(resolved))
    if common in resolved:
        common = common.parent
    return Path(fallback).resolve() if common == Path(common.anchor) else common


def write_summary_report(stage_dirs: Sequence[Path], report_dir: Path, title: str) -> Path:
    """One `report.md` over several stage folders: each stage's headline and a link to its report."""
    report_dir = Path(report_dir)
    rows, warnings, eval_plot = [], [], None
    for folder in stage_dirs:
        folder = Path(folder)
        manifest = read_manifest(folder)
        link = os.path.relpath(folder / REPORT, report_dir)
        if manifest is None:
            rows.append(["—", f"`{os.path.relpath(folder, report_dir)}`", "not finished", "—"])
            continue
        metrics = _read_json(folder / "metrics.json") or manifest.metrics
        report_link = f"[report]({link})" if (folder / REPORT).is_file() else "—"
        rows.append([manifest.stage, f"`{os.path.relpath(folder, report_dir)}`", headline(manifest.stage, metrics),
                     report_link])
        if manifest.stage == "ppo" and metrics.get("alerts"):
            count = sum(len(entry["alerts"]) for entry in metrics["alerts"])
            stop = " and stopped early at step " + str(metrics["stop"]["step"]) if metrics.get("stopped_early") else ""
            warnings.append(f"- PPO (`{folder.name}`) raised {count} health alert(s){stop}; see its report.")
        if manifest.stage == "eval" and (folder / "eval.png").is_file():
            eval_plot = os.path.relpath(folder / "eval.png", report_dir)
    lines = [f"# {title}", "", *_table(["stage", "folder", "headline", "details"], rows)]
    if warnings:
        lines += ["## Warnings", "", *warnings, ""]
    if eval_plot:
        lines += ["## Baseline vs policy on held-out prompts", "", f"![eval]({eval_plot})", ""]
    path = report_dir / REPORT
    write_text_atomic(path, "\n".join(lines).rstrip() + "\n")
    return path


def console_summary(stage_dirs: Sequence[Path], seconds: Sequence[float | None]) -> list[str]:
    """The chain at a glance for the terminal: each stage's wall time (or "skipped") and headline."""
    lines = []
    for folder, took in zip(stage_dirs, seconds, strict=True):
        manifest = read_manifest(folder)
        if manifest is None:
            continue
        metrics = _read_json(Path(folder) / "metrics.json") or manifest.metrics
        when = "skipped" if took is None else f"{took:5.0f} s"
        lines.append(f"  {manifest.stage:<6} {when:>8}  {headline(manifest.stage, metrics)}")
    return lines


def write_pipeline_report(pipeline_recipe_path: str | Path) -> Path:
    """The summary of a pipeline recipe's stages, in the common parent of their output folders."""
    from rlhf_pipeline.pipeline import read_pipeline
    from rlhf_pipeline.recipe import load_recipe

    name, steps = read_pipeline(pipeline_recipe_path)
    stage_dirs = [load_recipe(step.recipe, step.overrides, stage=step.stage).output_dir for step in steps]
    report_dir = report_dir_for(stage_dirs, Path(pipeline_recipe_path).parent)
    return write_summary_report(stage_dirs, report_dir, f"Pipeline {name}")


def write_report_safely(write: Callable[[Path], Path], target: str | Path) -> Path | None:
    """Run a report writer after a stage or chain has finished: a failure warns, never undoes finished work."""
    try:
        return write(Path(target))
    except Exception as err:
        logger.warning("could not write the report for %s (%s: %s); the outputs are complete, and "
                       "`rlhf-pipeline report FOLDER` writes the report again", target, type(err).__name__, err)
        return None


# --------------------------------------------------------------------------------------------- CLI


def _stage_folders(folder: Path) -> list[Path]:
    """Finished stage folders directly inside `folder`, in the order they finished."""
    found = [(read_manifest(p), p) for p in folder.iterdir() if p.is_dir() and (p / MARKER).is_file()]
    return [p for manifest, p in sorted(found, key=lambda item: (_finished_at(item[0]), item[1].name))]


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
