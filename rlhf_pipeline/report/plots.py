"""The only place that plots: a stage's PNGs, drawn from its saved metrics on matplotlib's Agg canvas."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

_DPI = 110
_BASELINE = "tab:blue"
_CHOSEN, _REJECTED = "tab:green", "tab:red"
_PPO_PANELS = (("objective/scores", "score (shaped RM reward)"), ("objective/kl", "KL to reference (nats/answer)"),
               ("objective/entropy", "entropy (nats/token)"), ("response/length", "answer length (tokens)"),
               ("policy/clipfrac", "clip fraction"), ("response/eos_fraction", "answers with stop token"))
_ALERT_PANEL = {"max_kl": "objective/kl", "min_entropy": "objective/entropy", "max_length_drift": "response/length",
                "max_missing_eos_fraction": "response/eos_fraction", "max_reward_jump": "objective/scores"}


def _numeric(history: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the log entries that carry `key`."""
    points = [(entry["step"], entry[key]) for entry in history
              if isinstance(entry.get(key), (int, float)) and "step" in entry]
    return [p[0] for p in points], [p[1] for p in points]


class Plots:
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
        return [] if self.available else ["Plots need matplotlib: `pip install matplotlib`, then "
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


def plot_sft(history: list[dict[str, Any]], metrics: dict[str, Any]) -> Any:
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


def plot_rm_training(history: list[dict[str, Any]], held_out_accuracy: float | None = None) -> Any:
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


def plot_rm_rewards(held_out: dict[str, Any]) -> Any:
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


def plot_rule_rm(held_out: dict[str, Any]) -> Any:
    """A rule RM's held-out scores by true label, and the reliability of σ(score) as P(breaks the rule)."""
    scores, labels = held_out.get("scores") or [], held_out.get("labels") or []
    if not scores:
        return None
    bins = [b for b in held_out.get("calibration_bins", []) if b["count"]]
    figure, axes = _figure(2 if bins else 1, height=3.8)
    broken = [s for s, y in zip(scores, labels, strict=True) if y == 1]
    kept = [s for s, y in zip(scores, labels, strict=True) if y == 0]
    _compare_hist(axes[0], broken, kept, ("breaks the rule", "keeps it"), (_REJECTED, _CHOSEN),
                  "score (log-odds of a violation)")
    axes[0].axvline(0.0, color="gray", linestyle=":")
    axes[0].set_title(f"Held-out scores ({len(scores)} answers)")
    if bins:
        axis = axes[1]
        axis.plot([0.0, 1.0], [0.0, 1.0], color="gray", linestyle=":", label="perfect calibration")
        axis.bar([(b["low"] + b["high"]) / 2 for b in bins], [b["violation_rate"] for b in bins],
                 width=[b["high"] - b["low"] for b in bins], alpha=0.6, edgecolor="black", label="violation rate")
        axis.plot([b["mean_probability"] for b in bins], [b["violation_rate"] for b in bins], "o", color="black",
                  label="mean σ(score)")
        axis.set_xlim(0.0, 1.0)
        axis.set_ylim(0.0, 1.05)
        axis.set_xlabel("predicted P(breaks the rule) = σ(score)")
        axis.set_ylabel("share that breaks it")
        axis.set_title(f"Reliability (ECE {held_out.get('ece', float('nan')):.3f})")
        axis.legend(fontsize=8, loc="upper left")
        _grid(axis)
    return figure


def plot_ppo(history: list[dict[str, Any]], alerts: list[dict[str, Any]]) -> Any:
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


def plot_curves(history: list[dict[str, Any]], panels: Sequence[tuple[str, str]], x_label: str) -> Any:
    """One panel per logged key over optimizer steps (the TRL-wrapped policy stages), skipping absent keys."""
    present = [(key, title) for key, title in panels if _numeric(history, key)[0]]
    if not present:
        return None
    figure, axes = _figure(len(present))
    for axis, (key, title) in zip(axes, present, strict=True):
        steps, values = _numeric(history, key)
        axis.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=4)
        axis.set_title(title)
        axis.set_xlabel(x_label)
        _grid(axis, steps=True)
    return figure


def plot_eval(per_answer: dict[str, Any], judge: str, order: list[str]) -> Any:
    """Judge scores, RM rewards and lengths per answer: one box for the baseline and one for each policy.

    The policies come in `order`, the one `plot_eval_tradeoff` gets them in, so each keeps its colour.
    """
    baseline = per_answer.get("baseline", {})
    columns = [(column, label) for column, label in (("judge", f"judge score ({judge})"), ("reward", "RM reward"),
                                                      ("length_tokens", "answer length (tokens)"))
               if column in baseline]
    if not columns:
        return None
    models = {"baseline": baseline, **{name: per_answer["policies"][name] for name in order}}
    figure, axes = _figure(len(columns), height=3.6 + 0.1 * len(models))
    for axis, (column, label) in zip(axes, columns, strict=True):
        boxes = axis.boxplot([models[name][column] for name in models], tick_labels=list(models), patch_artist=True,
                             showmeans=True, medianprops={"color": "black"},
                             meanprops={"marker": "D", "markerfacecolor": "white", "markeredgecolor": "black"})
        for index, box in enumerate(boxes["boxes"]):
            box.set(facecolor=_BASELINE if index == 0 else f"C{index % 10}", alpha=0.45)
        axis.set_ylabel(label)
        axis.set_title(f"Held-out answers: {label.split(' (')[0]}")
        axis.tick_params(axis="x", labelrotation=30 if len(models) > 3 else 0)
        _grid(axis)
    return figure


def _error(block: dict[str, Any]) -> list[list[float]]:
    """A 95% interval as matplotlib's [[below], [above]] error bar around the mean."""
    return [[max(block["mean"] - block["ci95_low"], 0.0)], [max(block["ci95_high"] - block["mean"], 0.0)]]


def plot_eval_tradeoff(policies: dict[str, dict[str, Any]], judge: str) -> Any:
    """Each policy's gain over the baseline against its KL to the baseline, both with their 95% intervals."""
    panels = [(column, label) for column, label in (("judge", "judge score"), ("reward", "RM reward"))
              if policies and all(f"{column}_gain" in policy for policy in policies.values())]
    if not panels:
        return None
    figure, axes = _figure(len(panels), columns=2, height=4.2)
    for axis, (column, label) in zip(axes, panels, strict=True):
        axis.axhline(0.0, color="gray", linestyle=":")
        axis.plot([0.0], [0.0], "s", color=_BASELINE, markersize=8, label="baseline")
        for index, (name, policy) in enumerate(policies.items(), start=1):
            kl, gain = policy["kl"], policy[f"{column}_gain"]
            axis.errorbar([kl["mean"]], [gain["mean"]], xerr=_error(kl), yerr=_error(gain), fmt="o", markersize=7,
                          capsize=4, color=f"C{index % 10}", label=name)
            axis.annotate(name, (kl["mean"], gain["mean"]), textcoords="offset points", xytext=(6, 6), fontsize=9)
        axis.set_xlabel("KL(policy ‖ baseline), nats per answer")
        axis.set_ylabel(f"{label} gain (policy − baseline)")
        axis.set_title(f"{label[0].upper()}{label[1:]} gain vs KL, 95% intervals"
                       + (f"\njudge: {judge}" if column == "judge" else ""))
        axis.legend(fontsize=8)
        _grid(axis)
    return figure


def plot_best_of_n(rows: list[dict[str, Any]], judge: str) -> Any:
    """Judge score, reward and length of best-of-n against its KL bound, one point per n with 95% intervals."""
    panels = [(column, label) for column, label in (("judge", f"judge score ({judge})"), ("reward", "reward"),
                                                     ("length_tokens", "answer length (tokens)"))
              if rows and column in rows[0]]
    if not panels:
        return None
    figure, axes = _figure(len(panels), height=3.8)
    kl = [row["kl_bound"] for row in rows]
    for axis, (column, label) in zip(axes, panels, strict=True):
        means = [row[column]["mean"] for row in rows]
        errors = [[row[column]["mean"] - row[column]["ci95_low"] for row in rows],
                  [row[column]["ci95_high"] - row[column]["mean"] for row in rows]]
        axis.errorbar(kl, means, yerr=errors, fmt="o-", capsize=4, color=_BASELINE)
        for x, y, row in zip(kl, means, rows, strict=True):
            axis.annotate(f"n={row['n']}", (x, y), textcoords="offset points", xytext=(5, -12), fontsize=8)
        axis.set_xlabel("KL bound log n − (n−1)/n (nats)")
        axis.set_ylabel(label)
        axis.set_title(f"Best of n: {label.split(' (')[0]}, 95% intervals")
        _grid(axis)
    return figure


def plot_rankers(rankers: dict[str, list[dict[str, Any]]], judge: str) -> Any:
    """The judge score of the answer each reranker picks, against n (log scale), with 95% intervals."""
    if not rankers:
        return None
    figure, axes = _figure(1, columns=1, height=4.2)
    for name, rows in rankers.items():
        means = [row["judge"]["mean"] for row in rows]
        errors = [[m - row["judge"]["ci95_low"] for m, row in zip(means, rows, strict=True)],
                  [row["judge"]["ci95_high"] - m for m, row in zip(means, rows, strict=True)]]
        axes[0].errorbar([row["n"] for row in rows], means, yerr=errors, fmt="o-", capsize=3, label=name)
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("n (answers sampled per prompt)")
    axes[0].set_ylabel(f"judge ({judge}) of the picked answer")
    axes[0].set_title("Best of n per reranker, 95% intervals")
    axes[0].legend(fontsize=8)
    _grid(axes[0])
    return figure


def plot_label(ranked: list[dict[str, Any]], pairs: list[dict[str, Any]]) -> Any:
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


def plot_rounds(rounds: list[dict[str, Any]]) -> Any:
    """Iterated RLHF across rounds: the RM's held-out accuracy before and after each refresh, then each round's
    judge gain over the baseline (95% interval) and KL to it."""
    figure, (accuracy, gain, kl) = _figure(3)
    numbers = [row["round"] for row in rounds]
    for key, label, color in (("rm_before", "previous RM (before refresh)", _REJECTED),
                              ("rm_after", "refreshed RM (after)", _CHOSEN)):
        points = [(row["round"], row[key]) for row in rounds if row.get(key) is not None]
        if points:
            accuracy.plot(*zip(*points, strict=True), "o-", color=color, label=label)
            accuracy.legend(fontsize=8)
    accuracy.axhline(0.5, color="gray", linestyle=":")
    accuracy.set_title("RM accuracy on the new policy's held-out pairs")
    for row in (row for row in rounds if row.get("judge_gain")):
        gain.errorbar([row["round"]], [row["judge_gain"]["mean"]], yerr=_error(row["judge_gain"]), fmt="o",
                      capsize=4, color=_BASELINE)
    gain.axhline(0.0, color="gray", linestyle=":")
    gain.set_title("Judge gain over the baseline, 95% interval")
    for row in (row for row in rounds if row.get("kl")):
        kl.errorbar([row["round"]], [row["kl"]["mean"]], yerr=_error(row["kl"]), fmt="o", capsize=4, color="tab:purple")
    kl.set_title("KL(policy ‖ baseline), nats per answer")
    for axis in (accuracy, gain, kl):
        axis.set_xlabel("round")
        axis.set_xticks(numbers)
        _grid(axis)
    return figure
