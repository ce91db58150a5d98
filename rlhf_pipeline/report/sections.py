"""Each stage's numbers as markdown: the one-line headline and the stage's section of its report.md.

The stages name theirs in their `Presentation` (stages/__init__.py); a stage without one gets the generic ones.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rlhf_pipeline.report.plots import (
    Plots,
    plot_best_of_n,
    plot_curves,
    plot_eval,
    plot_eval_tradeoff,
    plot_label,
    plot_ppo,
    plot_rm_rewards,
    plot_rm_training,
    plot_rule_rm,
    plot_sft,
)

# ------------------------------------------------------------------------------------------- formatting


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, (bool, int)):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}g}" if math.isfinite(value) else str(value)
    return str(value)


def interval(block: dict[str, Any] | None, signed: bool = False) -> str:
    """`mean [low, high]` of a summary block (sequence_summary or a gain), or — when absent."""
    if not block:
        return "—"
    sign = "+" if signed else ""
    return f"{block['mean']:{sign}.3f} [{block['ci95_low']:{sign}.3f}, {block['ci95_high']:{sign}.3f}]"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A markdown table, then the blank line that ends it; cells one line each, pipes escaped."""
    def cell(value: Any) -> str:
        return fmt(value).replace("|", "\\|").replace("\n", " ")

    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(cell(v) for v in row) + " |" for row in rows), ""]


def _short(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def read_json(path: Path) -> Any:
    """A JSON file a stage wrote, or None when it did not write one (reports work from what is there)."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ------------------------------------------------------------------------------------ stage sections


def sft_headline(metrics: dict[str, Any]) -> str:
    return (f"eval loss {fmt(metrics.get('eval_loss_before'))} → {fmt(metrics.get('eval_loss'))}, "
            f"perplexity {fmt(metrics.get('perplexity_before'))} → {fmt(metrics.get('perplexity'))}, "
            f"{fmt(metrics.get('global_steps'))} steps")


def label_headline(metrics: dict[str, Any]) -> str:
    counts = metrics.get("counts", {})
    if metrics.get("writes") == "classification":
        return (f"{fmt(counts.get('violations'))} of {fmt(counts.get('classified'))} answers break the rule "
                f"({fmt(counts.get('violation_rate'))}), from {fmt(counts.get('prompts'))} prompts")
    return (f"{fmt(counts.get('pairs'))} pairs from {fmt(counts.get('prompts'))} prompts "
            f"({fmt(counts.get('answers'))} answers), mean judge score {fmt(metrics.get('mean_judge_score'))}")


def rm_headline(metrics: dict[str, Any]) -> str:
    held_out = metrics.get("eval", {})
    if metrics.get("objective") == "classification":
        return (f"rule classifier: held-out accuracy {fmt(metrics.get('eval_accuracy'))} on "
                f"{fmt(held_out.get('answers'))} answers (base rate {fmt(metrics.get('eval_base_rate'))}), "
                f"AUROC {fmt(metrics.get('eval_auroc'))}, ECE {fmt(metrics.get('eval_ece'))}, "
                f"Brier {fmt(metrics.get('eval_brier'))}")
    before = metrics.get("before")
    refreshed = f"{fmt(before['eval_accuracy'])} before the refresh → " if before else ""
    return (f"held-out accuracy {refreshed}{fmt(metrics.get('eval_accuracy'))} on {fmt(held_out.get('pairs'))} "
            "pairs, "
            f"margin {fmt(metrics.get('eval_mean_margin'))}, ECE {fmt(metrics.get('eval_ece'))}, "
            f"Brier {fmt(metrics.get('eval_brier'))}")


def ppo_headline(metrics: dict[str, Any]) -> str:
    first, final = metrics.get("first", {}), metrics.get("final", {})
    line = (f"score {fmt(first.get('objective/scores'))} → {fmt(final.get('objective/scores'))}, "
            f"KL {fmt(final.get('objective/kl'))}, {fmt(metrics.get('global_steps'))} steps")
    alerts = sum(len(entry["alerts"]) for entry in metrics.get("alerts") or [])
    if alerts:
        line += f", {alerts} health alert(s)"
    if metrics.get("stopped_early"):
        line += f"; **stopped early at step {metrics['stop']['step']}**"
    return line


_EARLIER_EVAL = ("recorded by an earlier rlhf-pipeline, before one eval compared several policies: re-run the eval "
                 "stage (`rlhf-pipeline run PIPELINE --from eval`) to report it")


def eval_policy_line(policy: dict[str, Any]) -> str:
    """A policy's gains over the baseline, win rates and KL in one line (the headline's, and the eval log's)."""
    parts = [f"{label} gain {interval(policy[f'{column}_gain'], signed=True)}, win rate "
             f"{policy[f'{column}_gain']['win_rate']:.3f}"
             for column, label in (("judge", "judge"), ("reward", "RM")) if f"{column}_gain" in policy]
    return "; ".join([*parts, f"KL {policy['kl']['mean']:.3f} nats/answer"])


def eval_headline(metrics: dict[str, Any]) -> str:
    """The best policy by mean judge gain (the only one, when one was compared)."""
    policies = metrics.get("policies")
    if policies is None:
        return _EARLIER_EVAL
    best = max(policies, key=lambda name: policies[name]["judge_gain"]["mean"])
    line = eval_policy_line(policies[best])
    return line if len(policies) == 1 else f"best of {len(policies)} by judge gain: {best}, {line}"


Panels = Sequence[tuple[str, str]]  # (logged key, what it is)


def curves_headline(panels: Panels) -> Callable[[dict[str, Any]], str]:
    """First → last logged value of a stage's main keys (the TRL-wrapped policy stages), and its steps."""
    def headline(metrics: dict[str, Any]) -> str:
        first, final = metrics.get("first", {}), metrics.get("final", {})
        parts = [f"{title} {fmt(first.get(key))} → {fmt(final.get(key))}" for key, title in panels[:2]]
        return ", ".join([*parts, f"{fmt(metrics.get('global_steps'))} steps"])
    return headline


def curves_section(panels: Panels, plot_name: str) -> Callable[[Path, dict[str, Any], Plots], list[str]]:
    """A stage's logged keys first → last, its held-out evaluation, and one plot panel per key."""
    def section(folder: Path, metrics: dict[str, Any], plots: Plots) -> list[str]:
        first, final = metrics.get("first", {}), metrics.get("final", {})
        lines = table(["", "first logged value", "last logged value"],
                      [[f"{title} (`{key}`)", first.get(key), final.get(key)] for key, title in panels])
        held_out = {key: value for key, value in (metrics.get("eval") or {}).items()
                    if isinstance(value, (int, float))}
        if held_out:
            lines += ["Held-out evaluation after training:", "",
                      *table(["metric", "value"], sorted(held_out.items()))]
        lines += [f"{metrics.get('global_steps')} optimizer steps of {metrics.get('global_batch_size')} examples.", ""]
        return lines + plots.add(plot_name, "Training", plot_curves, metrics.get("log_history") or [], panels,
                                 "optimizer step")
    return section


def generic_headline(metrics: dict[str, Any]) -> str:
    scalars = [f"{key} {fmt(value)}" for key, value in metrics.items() if isinstance(value, (int, float))]
    return ", ".join(scalars[:4])


def ppo_summary_note(folder: Path, metrics: dict[str, Any]) -> str | None:
    """The chain summary's warning when PPO raised health alerts (or stopped on one)."""
    if not metrics.get("alerts"):
        return None
    count = sum(len(entry["alerts"]) for entry in metrics["alerts"])
    stop = " and stopped early at step " + str(metrics["stop"]["step"]) if metrics.get("stopped_early") else ""
    return f"- PPO (`{folder.name}`) raised {count} health alert(s){stop}; see its report."


def data_rows(metrics: dict[str, Any]) -> list[list[Any]]:
    data = metrics.get("data") or {}
    if not data:
        return []
    dropped = ", ".join(f"{reason} {count}" for reason, count in (data.get("rows_dropped") or {}).items()) or "none"
    sides = "; ".join(f"{name} {part['rows']} rows of {part['prompts']} prompts"
                      for name, part in (data.get("splits") or {}).items())
    return [["data rows kept / read", f"{data.get('rows_kept')} / {data.get('rows_read')}"],
            ["rows dropped", dropped], *([["splits (held out by prompt)", sides]] if sides else [])]


def sft_section(folder: Path, metrics: dict[str, Any], plots: Plots) -> list[str]:
    history = metrics.get("log_history") or []
    rows = [["eval loss (before → after)",
             f"{fmt(metrics.get('eval_loss_before'))} → {fmt(metrics.get('eval_loss'))}"],
            ["perplexity (before → after)",
             f"{fmt(metrics.get('perplexity_before'))} → {fmt(metrics.get('perplexity'))}"],
            ["train loss (mean over the run)", metrics.get("train_loss")],
            ["optimizer steps", metrics.get("global_steps")], ["global batch size", metrics.get("global_batch_size")],
            *data_rows(metrics)]
    return [*table(["", "value"], rows), *plots.add("sft_loss.png", "SFT loss", plot_sft, history, metrics)]


def label_section(folder: Path, metrics: dict[str, Any], plots: Plots) -> list[str]:
    counts = metrics.get("counts", {})
    answers = counts.get("answers") or 0
    rows = [["judge", metrics.get("judge")], ["prompts", counts.get("prompts")], ["answers sampled", answers],
            ["answers that ended with the stop token",
             f"{counts.get('finished_answers')} ({counts.get('finished_answers', 0) / max(answers, 1):.0%})"]]
    if metrics.get("writes") == "classification":
        rows += [["answers classified (empty ones left out)", counts.get("classified")],
                 ["answers that break the rule", f"{counts.get('violations')} ({counts.get('violation_rate', 0):.0%})"],
                 *data_rows(metrics)]
        return [*table(["", "value"], rows), "The labelled answers are in `classified.jsonl`, described by "
                "`data_card.yaml` (format `classification`, label 1 = breaks the rule).", ""]
    rows += [["preference pairs kept", counts.get("pairs")],
             ["pairs dropped (judge gap below min_gap)", counts.get("dropped_below_min_gap")],
             ["mean judge score", metrics.get("mean_judge_score")], *data_rows(metrics)]
    ranked, pairs = _read_jsonl(folder / "ranked.jsonl"), _read_jsonl(folder / "preferences.jsonl")
    lines = [*table(["", "value"], rows), *plots.add("label.png", "Judge scores", plot_label, ranked, pairs)]
    if pairs:
        lines += ["## Example pairs", "", *table(["chosen", "rejected", "judge gap"],
                                                 [[_short(p["chosen"], 120), _short(p["rejected"], 120),
                                                   p.get("judge_gap")] for p in pairs[:5]])]
    return [*lines, "The pairs are in `preferences.jsonl`, described by `data_card.yaml`.", ""]


def rm_section(folder: Path, metrics: dict[str, Any], plots: Plots) -> list[str]:
    held_out, stats = metrics.get("eval", {}), metrics.get("reward_stats", {})
    if metrics.get("objective") == "classification":
        return _rule_rm_section(metrics, held_out, stats, plots)
    rows = [["held-out pairs", held_out.get("pairs")], ["pairwise accuracy", metrics.get("eval_accuracy")],
            ["mean margin r(chosen) − r(rejected)", metrics.get("eval_mean_margin")],
            ["expected calibration error (ECE)", held_out.get("ece")],
            ["Brier score of σ(margin)", held_out.get("brier")], ["log loss", held_out.get("log_loss")],
            ["mean reward chosen / rejected",
             f"{fmt(held_out.get('chosen_reward_mean'))} / {fmt(held_out.get('rejected_reward_mean'))}"],
            ["training reward mean / std (PPO normalises with these)",
             f"{fmt(stats.get('mean'))} / {fmt(stats.get('std'))}"],
            ["optimizer steps", metrics.get("global_steps")], *data_rows(metrics)]
    history = metrics.get("log_history") or []
    return [*table(["", "value"], rows),
            *plots.add("rm_training.png", "RM training", plot_rm_training, history, metrics.get("eval_accuracy")),
            *plots.add("rm_rewards.png", "Held-out rewards and calibration", plot_rm_rewards, held_out)]


def _rule_rm_section(metrics: dict[str, Any], held_out: dict[str, Any], stats: dict[str, Any],
                     plots: Plots) -> list[str]:
    """A rule reward model's numbers: σ(score) is the probability that an answer breaks the rule."""
    rows = [["held-out answers", held_out.get("answers")],
            ["base rate (share that breaks the rule)", held_out.get("base_rate")],
            ["accuracy (σ(score) > 0.5)", metrics.get("eval_accuracy")], ["AUROC", held_out.get("auroc")],
            ["expected calibration error (ECE)", held_out.get("ece")],
            ["Brier score of σ(score)", held_out.get("brier")], ["log loss", held_out.get("log_loss")],
            ["mean σ(score) / base rate", f"{fmt(held_out.get('mean_probability'))} / "
                                          f"{fmt(held_out.get('base_rate'))}"],
            ["mean score breaking / keeping the rule",
             f"{fmt(held_out.get('violation_score_mean'))} / {fmt(held_out.get('kept_score_mean'))}"],
            ["training score mean / std", f"{fmt(stats.get('mean'))} / {fmt(stats.get('std'))}"],
            ["optimizer steps", metrics.get("global_steps")], *data_rows(metrics)]
    history = metrics.get("log_history") or []
    return ["A rule reward model (a classifier): σ(score) is the probability that an answer breaks the rule.", "",
            *table(["", "value"], rows),
            *plots.add("rm_training.png", "RM training", plot_curves, history,
                       [("loss", "binary cross-entropy (train batches)")], "optimizer step"),
            *plots.add("rm_rule.png", "Held-out scores and calibration", plot_rule_rm, held_out)]


def ppo_section(folder: Path, metrics: dict[str, Any], plots: Plots) -> list[str]:
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
    signals = [key for key in final if key.startswith("reward/")]  # the recipe's reward signals, one each
    keys = ("objective/scores", "objective/raw_scores", *signals, "objective/kl", "objective/entropy",
            "response/length", "response/eos_fraction", "policy/clipfrac", "val/clipfrac", "loss/value",
            "val/explained_variance")
    lines += table(["", f"first log (step {first.get('step', '—')})", f"last log (step {final.get('step', '—')})"],
                    [[key, first.get(key), final.get(key)] for key in keys])
    lines += [f"{metrics.get('global_steps')} PPO steps of {metrics.get('global_batch_size')} prompts; reward model "
              f"`{metrics.get('reward_model')}`.", ""]
    lines += plots.add("ppo_training.png", "PPO training", plot_ppo, history, alerts)
    if signals:
        lines += plots.add("ppo_signals.png", "Reward signals (mean per answer)", plot_curves, history,
                           [(key, key.removeprefix("reward/")) for key in signals], "PPO step")
    lines += ["## Health alerts", ""]
    if alerts:
        flat = [[entry["step"], a["monitor"], fmt(a["value"], 6), fmt(a["threshold"], 6), a["message"]]
                for entry in alerts for a in entry["alerts"]]
        lines += table(["step", "monitor", "value", "threshold", "message"], flat[:30])
        if len(flat) > 30:
            lines += [f"… and {len(flat) - 30} more in metrics.json.", ""]
    else:
        lines += ["None (thresholds: `training.max_kl`, `min_entropy`, `max_length_drift`, "
                  "`max_missing_eos_fraction`, `max_reward_jump`).", ""]
    samples = [entry for entry in history if "samples" in entry]
    if samples:
        last = samples[-1]
        lines += [f"## Samples at step {last['step']}", "",
                  *table(["prompt", "response", "RM score"],
                          [[_short(s["prompt"], 100), _short(s["response"]), s["score"]] for s in last["samples"]])]
    return lines


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s" if seconds < 600 else f"{seconds / 60:.1f} min"


def cost_cells(resources: dict[str, Any] | None) -> list[str]:
    """A stage run's wall time and peak memory (its `metrics.resources`) as two cells; — where not recorded."""
    if not resources:
        return ["—", "—"]
    cuda = resources.get("peak_cuda_gib")
    return [_duration(resources["wall_seconds"]),
            f"{resources['peak_rss_gib']:.2f} GiB" + (f" (CUDA {cuda:.2f} GiB)" if cuda is not None else "")]


def _method(name: str, record: dict[str, Any]) -> str:
    """A compared model's row label: its name, and the stage that made it when that says more."""
    stage = record.get("stage")
    return name if stage in (None, name) else f"{name} ({stage})"


def _median_p90(block: dict[str, Any] | None) -> str:
    return f"{fmt(block.get('median'))} / {fmt(block.get('p90'))}" if block else "—"


def _record(gain: dict[str, Any] | None) -> str:
    return f"{gain['wins']} / {gain['ties']} / {gain['losses']}" if gain else "—"


def eval_section(folder: Path, metrics: dict[str, Any], plots: Plots) -> list[str]:
    full = read_json(folder / "eval.json") or metrics
    if "policies" not in full:
        return [f"This eval was {_EARLIER_EVAL}.", ""]
    baseline = full["baseline"]
    policies = dict(sorted(full["policies"].items(), key=lambda item: -item[1]["judge_gain"]["mean"]))  # best first
    scored = [(column, label) for column, label in (("judge", "judge"), ("reward", "RM")) if column in baseline]
    lines = [f"{full.get('prompts')} held-out prompts, judge `{full.get('judge')}`, baseline `{baseline.get('path')}`. "
             "Gains are policy − baseline on the same prompts, with bootstrap 95% intervals; KL(policy ‖ baseline) "
             "is in nats per answer, a Monte-Carlo estimate on the policy's own samples; distinct-2 is the share "
             "of distinct token bigrams over all of a model's answers; wall time and peak memory are those of the "
             "stage that made the model (its stage.json).", ""]
    header = ["method", *(f"{label} gain [95% CI]" for _, label in scored), "judge win rate", "KL [95% CI]",
              "length (tokens)", "distinct-2", "stop token", "wall time", "peak memory"]

    def traits(record: dict[str, Any]) -> list[str]:
        return [f"{record['length_tokens']['mean']:.1f}", f"{record['distinct_2']:.3f}",
                f"{record['eos_fraction']:.2f}", *cost_cells(record.get("resources"))]

    rows = [[_method("baseline", baseline), *("—" for _ in scored), "—", "0", *traits(baseline)]]
    rows += [[_method(name, policy), *(interval(policy[f"{column}_gain"], signed=True) for column, _ in scored),
              f"{policy['judge_gain']['win_rate']:.2f}", interval(policy["kl"]), *traits(policy)]
             for name, policy in policies.items()]
    lines += table(header, rows)
    scores = [[_method(name, record), *(interval(record[column]) for column, _ in scored),
               _median_p90(record["length_tokens"]), _median_p90(record.get("kl")),
               *(_record(record.get(f"{column}_gain")) for column, _ in scored)]
              for name, record in {"baseline": baseline, **policies}.items()]
    lines += ["Per answer: scores as mean [95% CI], length and KL as median / p90, and the paired record against "
              "the baseline:", "",
              *table(["", *(f"{label} score" for _, label in scored), "length median / p90", "KL median / p90",
                      *(f"{label} wins / ties / losses" for _, label in scored)], scores)]
    lines += _signal_table(full.get("signals") or {}, baseline, policies)
    lines += plots.add("eval_tradeoff.png", "Gain vs KL to the baseline", plot_eval_tradeoff, policies,
                       full.get("judge"))
    lines += plots.add("eval.png", "Scores per answer", plot_eval, full.get("per_answer") or {}, full.get("judge"),
                       list(policies))
    examples = full.get("examples") or []
    if examples:
        limit = max(60, 320 // (len(policies) + 1))
        lines += ["## Samples", "", *table(["prompt", "baseline", *policies],
                                            [[_short(e["prompt"], 100), _short(e["baseline"], limit),
                                              *(_short(e["policies"][name], limit) for name in policies)]
                                             for e in examples])]
    return lines


def _signal_table(signals: dict[str, Any], baseline: dict[str, Any], policies: dict[str, Any]) -> list[str]:
    """Each reward signal's mean per model and its gain over the baseline: which signal a policy moved."""
    if not signals:
        return []
    rows = [[name, f"{signal['use']} ({signal['weight']:g})", interval(baseline[f"signal/{name}"]),
             *(f"{interval(policy[f'signal/{name}'])}; {interval(policy[f'signal/{name}_gain'], signed=True)}"
               for policy in policies.values())]
            for name, signal in signals.items()]
    return ["Reward signals (`reward:` section): the mean per answer [95% CI] and each policy's gain over the "
            "baseline. A penalty or veto signal's mean is the share of answers that break its rule.", "",
            *table(["signal", "use (weight)", "baseline", *(f"{name}; gain" for name in policies)], rows)]


def best_of_n_headline(metrics: dict[str, Any]) -> str:
    """Best of the largest n against best of 1: judge and reward, with the gains' intervals, and the KL bound."""
    rows = metrics.get("by_n") or []
    if len(rows) < 2:
        return generic_headline(metrics)
    first, last = rows[0], rows[-1]
    return (f"best of {last['n']} vs 1: judge {first['judge']['mean']:.3f} → {last['judge']['mean']:.3f} (gain "
            f"{interval(last['judge_gain'], signed=True)}), reward {first['reward']['mean']:.3f} → "
            f"{last['reward']['mean']:.3f}, KL bound {last['kl_bound']:.2f} nats")


def best_of_n_section(folder: Path, metrics: dict[str, Any], plots: Plots) -> list[str]:
    full = read_json(folder / "best_of_n.json") or metrics
    rows = full.get("by_n") or []
    if not rows:
        return []
    signals = sorted(key for key in rows[0] if key.startswith("signal/"))
    lines = [f"{full.get('prompts')} prompts × {full.get('n_max')} answers sampled from `{full.get('policy')}`; "
             f"reward `{' + '.join(full.get('reward') or [])}` picks the best, judge `{full.get('judge')}` measures "
             "it. Best of n is the exact average over every n-subset of the sampled answers (not the first n); "
             "intervals are 95% bootstrap over prompts; gains are paired against best of 1 on the same prompts; "
             "KL bound = log n − (n−1)/n nats (Stiennon et al. 2020, Gao et al. 2022).", ""]
    header = ["n", "KL bound (nats)", "judge [95% CI]", "judge gain [95% CI]", "reward [95% CI]",
              "reward gain [95% CI]", *(f"{name} [95% CI]" for name in signals), "length (tokens)"]
    lines += table(header, [[row["n"], f"{row['kl_bound']:.3f}", interval(row["judge"]),
                             interval(row.get("judge_gain"), signed=True), interval(row["reward"]),
                             interval(row.get("reward_gain"), signed=True),
                             *(interval(row[name]) for name in signals), f"{row['length_tokens']['mean']:.1f}"]
                            for row in rows])
    lines += plots.add("best_of_n.png", "Best-of-n vs its KL bound", plot_best_of_n, rows, full.get("judge"))
    if card := full.get("sft_card"):
        lines += [f"The best answer of {card['rows']} prompts (of those that ended with the stop token) is in "
                  f"`demonstrations.jsonl`, described by `data_card.yaml` (an sft recipe can name it); "
                  f"{card['prompts_without_a_finished_answer']} prompts had no such answer"
                  + (f", {card['prompts_below_min_reward']} only answers below the minimum reward."
                     if "prompts_below_min_reward" in card else "."), ""]
    examples = full.get("examples") or []
    if examples:
        lines += [f"## Samples: the first answer and the best of {full.get('n_max')}", "",
                  *table(["prompt", "first answer", "judge", f"best of {full.get('n_max')}", "judge"],
                         [[_short(e["prompt"], 100), _short(e["first"], 140), f"{e['first_judge']:.3f}",
                           _short(e["best"], 140), f"{e['best_judge']:.3f}"] for e in examples])]
    return lines


def generic_section(folder: Path, metrics: dict[str, Any], plots: Plots) -> list[str]:
    rows = [[key, value] for key, value in metrics.items() if isinstance(value, (int, float, str)) or value is None]
    history = metrics.get("log_history") or []
    return [*table(["metric", "value"], rows), *plots.add("training.png", "Training", plot_rm_training, history)]
