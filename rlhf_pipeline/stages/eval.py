"""Held-out comparison of two policies (SFT vs PPO): reward, judge score with a 95% interval, KL, length.

    rlhf-pipeline eval recipes/smollm2-135m/eval.yaml

`model.name_or_path` is the baseline (the SFT output) and `evaluation.policy` the policy under test
(the PPO output). Both answer the same held-out prompts with the same sampling settings and seed; the
KL is the Monte-Carlo estimate of KL(policy‖baseline) per answer on the policy's own samples, under the
sampling temperature. Writes `eval.json` (summaries, per-answer values, samples); `report.md` and
`eval.png` come from `rlhf_pipeline.report`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_pipeline.data.formats import FORMATS
from rlhf_pipeline.judges import JudgeSpec
from rlhf_pipeline.report.sections import eval_headline, eval_section
from rlhf_pipeline.stages import MemoryModel, Presentation, Stage

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


def answer_logprob(model: PreTrainedModel, samples: list[Sample], temperature: float,
                   description: str | None = None) -> list[float]:
    """log π(answer | prompt) summed over answer tokens, under the sampling temperature."""
    import torch
    from tqdm.auto import tqdm
    from trl.trainer.utils import selective_log_softmax

    from rlhf_pipeline.distributed import is_main_process

    totals = []
    device = next(model.parameters()).device
    with torch.no_grad():
        for sample in tqdm(samples, desc=description, disable=description is None or not is_main_process()):
            ids = torch.tensor([sample.prompt_ids + sample.answer_ids], device=device)
            logits = model(input_ids=ids, use_cache=False).logits[0, len(sample.prompt_ids) - 1 : -1]
            labels = ids[0, len(sample.prompt_ids):]
            totals.append(float(selective_log_softmax(logits.float(), labels, max(temperature, 1e-6)).sum()))
    return totals


# The win_rate module names its gain keys explicitly; the report keeps the summary-shaped names it always had.
_GAIN_KEYS = {"mean_gain": "mean", "gain_std": "std", "gain_ci95_low": "ci95_low", "gain_ci95_high": "ci95_high"}


def compare(per_answer: dict[str, dict[str, list[float]]], config: EvalConfig) -> dict[str, Any]:
    """Summaries of every per-answer column (metric `sequence_summary`) and the paired gains (`win_rate`).

    `per_answer` is {"baseline": {column: values}, "policy": {column: values}}; the policy's "kl" column
    (KL to the baseline) is summarised on its own, as `kl`.
    """
    from rlhf_pipeline.metrics import load_metric

    summary, win_rate = load_metric("sequence_summary"), load_metric("win_rate")
    settings = {"bootstrap_samples": config.bootstrap_samples, "seed": config.seed}
    report: dict[str, Any] = {name: {column: summary.compute(values=values, **settings)
                                     for column, values in columns.items() if column != "kl"}
                              for name, columns in per_answer.items()}
    report["kl"] = summary.compute(values=per_answer["policy"]["kl"], **settings)
    for column in ("judge", "reward"):
        if column in per_answer["baseline"]:
            result = win_rate.compute(policy_scores=per_answer["policy"][column],
                                      baseline_scores=per_answer["baseline"][column], **settings)
            report[f"{column}_gain"] = {_GAIN_KEYS.get(key, key): value for key, value in result.items()}
            report[f"{column}_win_rate"] = result["win_rate"]
    return report


def run(recipe: Recipe) -> dict[str, Any]:
    """Sample both policies on the held-out prompts, score them, and write the comparison."""
    from rlhf_pipeline.data.loading import load_datasets
    from rlhf_pipeline.distributed import say
    from rlhf_pipeline.generation import sample_answers
    from rlhf_pipeline.judges import load_judge
    from rlhf_pipeline.outputs import write_json
    from rlhf_pipeline.reward import RewardModel
    from rlhf_pipeline.stages.common import finish_outputs, finished_manifest, load_frozen

    config: EvalConfig = recipe.settings
    names = {"baseline": recipe.model.name_or_path, "policy": config.policy}
    if config.reward_model:
        names["reward"] = config.reward_model
    sources, tokenizer, models = load_frozen(recipe, names, scorers=frozenset({"reward"}))
    datasets, _ = load_datasets(recipe, tokenizer, prompts_only=True)
    prompts = [row["prompt"] for split in datasets.values() for row in split]
    settings = (1, config.max_new_tokens, config.temperature, config.top_p, config.batch_size, config.seed)
    samples = {name: [s[0] for s in sample_answers(models[name].use(name), tokenizer, prompts, *settings, name)]
               for name in ("baseline", "policy")}
    kl = [p - b for p, b in zip(answer_logprob(models["policy"].use("policy"), samples["policy"], config.temperature,
                                               "eval: log π"),
                                answer_logprob(models["baseline"].use("baseline"), samples["policy"],
                                               config.temperature, "eval: log π_baseline"), strict=True)]
    say("eval: scoring")
    judge = load_judge(recipe.sections["judge"], recipe.model)
    scorer = (RewardModel.from_role(models["reward"], "reward", tokenizer, config.reward_model)
              if config.reward_model else None)
    texts = {name: [s.text for s in group] for name, group in samples.items()}
    per_answer: dict[str, dict[str, list[float]]] = {
        name: {"judge": judge(prompts, texts[name]), "length_tokens": [len(s.answer_ids) for s in samples[name]]}
        | ({"reward": scorer.score(prompts, texts[name], f"eval: RM scores ({name})")} if scorer else {})
        for name in samples}
    per_answer["policy"]["kl"] = kl
    report = compare(per_answer, config)
    for name, group in samples.items():
        report[name]["eos_fraction"] = sum(s.finished for s in group) / len(group)
    report |= {"prompts": len(prompts), "judge": recipe.sections["judge"].name}
    examples = [{"prompt": prompts[i][-1]["content"], "baseline": texts["baseline"][i], "policy": texts["policy"][i]}
                for i in range(min(config.num_examples, len(prompts)))]
    for column in ("reward", "judge"):
        if f"{column}_gain" in report:
            gain = report[f"{column}_gain"]
            say(f"eval: {column} gain {gain['mean']:+.3f} [{gain['ci95_low']:+.3f}, {gain['ci95_high']:+.3f}], "
                f"win rate {gain['win_rate']:.2f}")
    say(f"eval: KL(policy || baseline) {report['kl']['mean']:.3f} nats per answer")

    def write_files(folder: Path) -> None:
        write_json(folder / "eval.json", report | {"examples": examples, "per_answer": per_answer})

    finish_outputs(recipe, finished_manifest(recipe, sources["policy"], report, adapter=False), write_files)
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
    presentation=Presentation("Evaluation: policy vs baseline", eval_headline, eval_section,
                              summary_figure=("eval.png", "Baseline vs policy on held-out prompts")),
    memory=MemoryModel(kind="sample"),
)
