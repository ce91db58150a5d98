"""Held-out comparison of two policies (SFT vs PPO): reward, judge score with a 95% interval, KL, length.

    rlhf-pipeline eval recipes/smollm2-135m/eval.yaml

`model.name_or_path` is the baseline (the SFT output) and `evaluation.policy` the policy under test
(the PPO output). Both answer the same held-out prompts with the same sampling settings and seed; the
KL is the Monte-Carlo estimate of KL(policy‖baseline) per answer on the policy's own samples, under the
sampling temperature. Writes `eval.json`, `eval.md` and `eval.png`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_pipeline.data.formats import FORMATS
from rlhf_pipeline.judges import JudgeSpec
from rlhf_pipeline.stages import Stage

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from rlhf_pipeline.generation import Sample
    from rlhf_pipeline.recipe import Recipe


@dataclass
class EvalConfig:
    """What to compare and how to sample."""

    output_dir: str
    policy: str
    reward_model: str | None = None
    max_new_tokens: int = 48
    temperature: float = 0.7
    top_p: float = 1.0
    batch_size: int = 16
    seed: int = 1234
    bootstrap_samples: int = 2000
    num_examples: int = 6


def answer_logprob(model: PreTrainedModel, samples: list[Sample], temperature: float) -> list[float]:
    """log π(answer | prompt) summed over answer tokens, under the sampling temperature."""
    import torch

    from rlhf_pipeline.ppo.formulas import logprobs_from_logits

    totals = []
    with torch.no_grad():
        for sample in samples:
            ids = torch.tensor([sample.prompt_ids + sample.answer_ids])
            logits = model(input_ids=ids, use_cache=False).logits[0, len(sample.prompt_ids) - 1 : -1]
            labels = ids[0, len(sample.prompt_ids):]
            totals.append(float(logprobs_from_logits(logits / max(temperature, 1e-6), labels).sum()))
    return totals


def _policy_report(samples: list[Sample], rewards: list[float] | None, judged: list[float],
                   config: EvalConfig) -> dict[str, Any]:
    from rlhf_pipeline.stats import summary

    report = {"judge": summary(judged, config.bootstrap_samples, config.seed),
              "length_tokens": summary([len(s.answer_ids) for s in samples], 200, config.seed),
              "eos_fraction": sum(s.finished for s in samples) / len(samples)}
    if rewards is not None:
        report["reward"] = summary(rewards, config.bootstrap_samples, config.seed)
    return report


def _markdown(report: dict[str, Any], examples: list[dict[str, str]]) -> str:
    rows = ["| | baseline | policy |", "|---|---|---|"]
    for key, label in (("reward", "mean RM reward"), ("judge", "mean judge score"),
                       ("length_tokens", "mean answer length (tokens)")):
        if key in report["baseline"]:
            cells = [f"{report[p][key]['mean']:.3f} [{report[p][key]['ci95_low']:.3f}, "
                     f"{report[p][key]['ci95_high']:.3f}]" for p in ("baseline", "policy")]
            rows.append(f"| {label} | {cells[0]} | {cells[1]} |")
    rows.append(f"| answers ending in EOS | {report['baseline']['eos_fraction']:.2f} | "
                f"{report['policy']['eos_fraction']:.2f} |")
    gain = report["judge_gain"]
    lines = [f"# Evaluation on {report['prompts']} held-out prompts", "", *rows, "",
             f"Judge gain (policy - baseline): {gain['mean']:+.3f}, 95% CI [{gain['ci95_low']:+.3f}, "
             f"{gain['ci95_high']:+.3f}]; win rate {report['judge_win_rate']:.2f}.",
             f"KL(policy || baseline): {report['kl']['mean']:.2f} nats per answer.", "", "## Samples", ""]
    for example in examples:
        lines += [f"**Prompt:** {example['prompt']}", "", f"- baseline: {example['baseline']}",
                  f"- policy: {example['policy']}", ""]
    return "\n".join(lines)


def _plot(path: Path, baseline: list[float], policy: list[float], judge: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    bins = [i / 10 for i in range(-10, 11)] if judge == "vader" else 20
    axis.hist(baseline, bins=bins, alpha=0.6, label="baseline (SFT)")
    axis.hist(policy, bins=bins, alpha=0.6, label="policy (PPO)")
    axis.set_xlabel(f"judge score ({judge})")
    axis.set_ylabel("answers")
    axis.set_title("Held-out answers: judge scores")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run(recipe: Recipe) -> dict[str, Any]:
    """Sample both policies on the held-out prompts, score them, and write the comparison."""
    from rlhf_pipeline.data.loading import load_datasets
    from rlhf_pipeline.distributed import say
    from rlhf_pipeline.generation import sample_answers
    from rlhf_pipeline.judges import load_judge
    from rlhf_pipeline.outputs import write_json
    from rlhf_pipeline.reward import RewardModel
    from rlhf_pipeline.stages.common import finish_outputs, finished_manifest, load_policy
    from rlhf_pipeline.stats import summary

    config = EvalConfig(**recipe.config)
    baseline = load_policy(recipe)
    policy = load_policy(recipe, config.policy)
    datasets, _ = load_datasets(recipe, baseline.tokenizer, prompts_only=True)
    prompts = [row["prompt"] for split in datasets.values() for row in split]
    settings = (1, config.max_new_tokens, config.temperature, config.top_p, config.batch_size, config.seed)
    samples = {name: [s[0] for s in sample_answers(loaded.model, loaded.tokenizer, prompts, *settings, name)]
               for name, loaded in (("baseline", baseline), ("policy", policy))}
    say("eval: scoring")
    kl = [p - b for p, b in zip(answer_logprob(policy.model, samples["policy"], config.temperature),
                                answer_logprob(baseline.model, samples["policy"], config.temperature), strict=True)]
    judge = load_judge(recipe.sections["judge"])
    scorer = RewardModel.from_stage(config.reward_model) if config.reward_model else None
    texts = {name: [s.text for s in group] for name, group in samples.items()}
    judged = {name: judge(prompts, texts[name]) for name in texts}
    rewards = {name: scorer.score(prompts, texts[name]) if scorer else None for name in texts}
    report: dict[str, Any] = {name: _policy_report(samples[name], rewards[name], judged[name], config)
                              for name in samples}
    gains = [p - b for p, b in zip(judged["policy"], judged["baseline"], strict=True)]
    report |= {"prompts": len(prompts), "judge": recipe.sections["judge"].name, "kl": summary(kl, 200, config.seed),
               "judge_gain": summary(gains, config.bootstrap_samples, config.seed),
               "judge_win_rate": sum(g > 0 for g in gains) / len(gains) + 0.5 * sum(g == 0 for g in gains) / len(gains)}
    if scorer:
        report["reward_gain"] = summary([p - b for p, b in zip(rewards["policy"], rewards["baseline"], strict=True)],
                                        config.bootstrap_samples, config.seed)
    examples = [{"prompt": prompts[i][-1]["content"], "baseline": texts["baseline"][i], "policy": texts["policy"][i]}
                for i in range(min(config.num_examples, len(prompts)))]
    say(_markdown(report, examples))

    def write_files(folder: Path) -> None:
        write_json(folder / "eval.json", report | {"examples": examples})
        (folder / "eval.md").write_text(_markdown(report, examples))
        _plot(folder / "eval.png", judged["baseline"], judged["policy"], recipe.sections["judge"].type)

    finish_outputs(recipe, finished_manifest(recipe, policy.source, report, adapter=False), write_files)
    return report


STAGE = Stage(
    name="eval",
    summary="compare two policies (SFT vs PPO) on held-out prompts: reward, judge score, KL, length",
    example="rlhf-pipeline eval recipes/smollm2-135m/eval.yaml",
    config_class=("rlhf_pipeline.stages.eval", "EvalConfig"),
    config_section="evaluation",
    data_formats=frozenset(FORMATS),
    sections={"judge": JudgeSpec},
    run=run,
)
