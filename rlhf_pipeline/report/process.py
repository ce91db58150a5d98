"""The numbers of checkable-answer work as markdown: the prm stage, step labels, and best-of-n's rerankers.

Kept beside sections.py (the other stages' headlines and sections), which these reuse.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rlhf_pipeline.report.plots import Plots, plot_curves, plot_rankers
from rlhf_pipeline.report.sections import (
    best_of_n_section,
    data_rows,
    fmt,
    interval,
    label_headline,
    label_section,
    read_json,
    table,
)


def prm_headline(metrics: dict[str, Any]) -> str:
    held_out = metrics.get("eval") or {}
    if not held_out:
        return "—"
    return (f"held-out step accuracy {fmt(held_out.get('accuracy'), 3)} on {held_out.get('steps')} steps "
            f"({held_out.get('solutions')} solutions), AUROC {fmt(held_out.get('auroc'), 3)}, first-error accuracy "
            f"{fmt(held_out.get('first_error_accuracy'), 3)}")


def prm_section(folder: Path, metrics: dict[str, Any], plots: Plots) -> list[str]:
    held_out = metrics.get("eval") or {}
    rows = [["held-out solutions / steps", f"{held_out.get('solutions')} / {held_out.get('steps')}"],
            ["held out as", metrics.get("held_out_split")],
            ["good steps (label ≥ 0.5) / solutions with no wrong step",
             f"{fmt(held_out.get('good_step_rate'), 3)} / {fmt(held_out.get('solutions_all_good'), 3)}"],
            ["step accuracy (σ(score) ≥ 0.5 ⇔ good)", held_out.get("accuracy")],
            ["AUROC (good steps above wrong ones)", held_out.get("auroc")],
            ["first-error accuracy (first step below 0.5 = first wrong step, or neither)",
             held_out.get("first_error_accuracy")],
            ["expected calibration error (ECE)", held_out.get("ece")], ["Brier score", held_out.get("brier")],
            ["optimizer steps", metrics.get("global_steps")], *data_rows(metrics)]
    history = metrics.get("log_history") or []
    return ["A process reward model: σ(score) at the token that ends a step is the probability that the step is "
            "right.", "", *table(["", "value"], rows),
            *plots.add("prm_training.png", "PRM training", plot_curves, history,
                       [("loss", "binary cross-entropy at step ends (train batches)")], "optimizer step")]


def label_report_headline(metrics: dict[str, Any]) -> str:
    """The label stage's headline; with `writes: steps`, its solutions, right answers and step labels."""
    counts = metrics.get("counts") or {}
    if metrics.get("writes") != "steps":
        return label_headline(metrics)
    mc = metrics.get("mc_vs_verifier") or {}
    versus = (f"; Math-Shepherd labels vs the verifier: agreement {fmt(mc.get('agreement'), 3)}, wrong-step recall "
              f"{fmt((mc.get('wrong') or {}).get('recall'), 3)}" if mc else "")
    return (f"{counts.get('solutions')} solutions of {counts.get('prompts')} prompts, {counts.get('steps')} steps "
            f"labelled by {metrics.get('step_labels')} ({fmt(counts.get('good_steps'), 3)} good); right answers "
            f"{fmt(counts.get('right_answers'), 3)}{versus}")


def label_report_section(folder: Path, metrics: dict[str, Any], plots: Plots) -> list[str]:
    return step_label_lines(metrics) if metrics.get("writes") == "steps" else label_section(folder, metrics, plots)


def step_label_lines(metrics: dict[str, Any]) -> list[str]:
    """The label stage's step labels: counts, and Math-Shepherd labels measured against the step verifier."""
    counts = metrics.get("counts") or {}
    lines = [f"{counts.get('solutions')} sampled solutions (with at least one step) of {counts.get('prompts')} "
             f"prompts, {counts.get('steps')} steps; the final answer is right in "
             f"{fmt(counts.get('right_answers'), 3)} of them (judge `{metrics.get('judge')}`). Step labels in the "
             f"card: {metrics.get('step_labels')} ({fmt(counts.get('good_steps'), 3)} of the steps good). The "
             f"{counts.get('held_out_prompts')} held-out prompts' {counts.get('held_out_solutions')} solutions are "
             "in `stepwise_eval.jsonl`; every solution's outcome (label 1 = wrong answer) is in `outcomes.jsonl`, "
             "with its step labels of every kind in `solutions.jsonl`.", ""]
    agreement = metrics.get("mc_vs_verifier")
    if agreement:
        rows = [[name, block.get("precision"), block.get("recall"), block.get("support")]
                for name, block in agreement.items() if isinstance(block, dict) and "precision" in block]
        lines += [f"Math-Shepherd labels ({agreement.get('rollouts')} rollouts per step prefix, "
                  f"{agreement.get('steps')} steps of {agreement.get('solutions')} solutions) against the step "
                  f"verifier: agreement {fmt(agreement.get('agreement'), 3)}; mean soft label on steps the verifier "
                  f"calls good / wrong {fmt(agreement.get('soft_on_good'), 3)} / "
                  f"{fmt(agreement.get('soft_on_wrong'), 3)}.", "",
                  *table(["class (MC label vs verifier)", "precision", "recall", "verifier steps"], rows)]
    return lines


def rankers_section(folder: Path, metrics: dict[str, Any], plots: Plots) -> list[str]:
    """best_of_n_section, then one judge column per reranker (each signal alone, majority vote, the oracle)."""
    lines = best_of_n_section(folder, metrics, plots)
    full = read_json(folder / "best_of_n.json") or metrics
    rankers = full.get("rankers") or {}
    if not rankers:
        return lines
    names = list(rankers)
    n_values = [row["n"] for row in next(iter(rankers.values()))]
    lines += [f"## Rerankers on the same samples: judge `{full.get('judge')}` of the answer each one picks", "",
              "Each signal of the reward ranks alone; `majority` picks the most frequent final answer "
              "(self-consistency; ties shared), `oracle` ranks by the judge itself (for a right/wrong judge: "
              "pass@n). Intervals are 95% bootstrap over prompts.", "",
              *table(["n", *names], [[n, *(interval(rankers[name][i]["judge"]) for name in names)]
                                     for i, n in enumerate(n_values)])]
    n_max = n_values[-1]
    gains = {name: rankers[name][-1].get("gain_over") or {} for name in names}
    if any(gains.values()):
        rows = [[name, *(interval(gains[name].get(other), signed=True) for other in names)] for name in names]
        lines += [f"Paired differences at n = {n_max} (row minus column), 95% bootstrap over prompts:", "",
                  *table(["", *names], rows)]
    lines += plots.add("best_of_n_rankers.png", "Best-of-n per reranker", plot_rankers, rankers, full.get("judge"))
    return lines
