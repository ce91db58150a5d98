"""Held-out comparison of policies with one baseline: judge and RM gains with 95% intervals, KL, length, diversity.

    rlhf-pipeline eval recipes/smollm2-135m/eval.yaml

`model.name_or_path` is the baseline (the SFT output). The policies under test are `evaluation.policies`, a
mapping name -> folder of a finished policy stage (a bake-off: `{ppo: outputs/x/ppo, dpo: outputs/x/dpo}`),
or one `evaluation.policy: FOLDER`, which is shorthand for `policies: {policy: FOLDER}`. The baseline, every
policy and the reward model are roles on one base loaded once; each answers the same held-out prompts with
the same sampling settings and seed. A policy's KL is the Monte-Carlo estimate of KL(policy‖baseline) per
answer on its own samples, under the sampling temperature. Which stage made each model, and its wall time
and peak memory, come from that folder's stage.json, so the report can set the methods' costs beside their
gains. With a `reward:` section (reward_spec.py: several reward models, rule RMs, functions, judges) the
reward column is its combined reward and every signal is reported on its own, with its gain, so a comparison
shows which signal moved (a rule signal's mean is the rate at which answers break its rule). Writes
`eval.json` (summaries, per-answer values, samples) and `answers.jsonl` (one row per prompt: each model's answer
with its scores, length, KL and whether it finished); `report.md`, `eval_tradeoff.png` and `eval.png` come from
`rlhf_pipeline.report`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_pipeline.data.formats import FORMATS
from rlhf_pipeline.engines.spec import GenerationSpec, check_generation
from rlhf_pipeline.errors import RecipeError
from rlhf_pipeline.judges import JudgeSpec
from rlhf_pipeline.outputs import ANSWERS, read_manifest
from rlhf_pipeline.report.sections import eval_headline, eval_policy_line, eval_section
from rlhf_pipeline.reward_spec import SIGNAL, RewardSpec, check_reward
from rlhf_pipeline.schema import shown_key
from rlhf_pipeline.stages import MemoryModel, Presentation, Stage

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from rlhf_pipeline.chat import Messages
    from rlhf_pipeline.generation import Sample
    from rlhf_pipeline.recipe import Recipe

BASELINE, REWARD = "baseline", "reward"  # role names on the shared base, beside the policies' own names
_POLICY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")  # a PEFT adapter name and a report row


@dataclass
class EvalConfig:
    """What to compare and how to sample."""

    output_dir: str
    policy: str | None = None  # one policy under test: shorthand for policies: {policy: FOLDER}
    policies: dict[str, str] | None = None  # name -> folder of a finished policy stage
    reward_model: str | None = None  # one preference RM, its raw score; or the recipe's `reward:` section
    max_new_tokens: int = 48
    temperature: float = 0.7
    top_p: float = 1.0
    batch_size: int = 16
    seed: int = 1234
    bootstrap_samples: int = 2000
    num_examples: int = 6

    def compared(self) -> dict[str, str]:
        """Name -> folder of every policy under test (`policy: X` is `{policy: X}`)."""
        if self.policies is not None:
            return dict(self.policies)
        return {"policy": self.policy} if self.policy else {}


def _folder(name_or_path: str) -> Path:
    return Path(name_or_path).expanduser().resolve()


def _check(recipe: Recipe) -> None:
    """The policies under test, before any weights load: one of `policy`/`policies`, usable names, no model twice;
    a judge that scores single answers."""
    config: EvalConfig = recipe.settings
    section = recipe.config_section
    if config.policy is not None and config.policies is not None:
        raise RecipeError(recipe.path, f"{section}.policy", f"give either policy (one) or {section}.policies "
                          "(name: folder, several), not both")
    if not config.compared():
        raise RecipeError(recipe.path, f"{section}.policies", "required: the policies to compare with the baseline, "
                          "as policies: {name: folder, ...} or policy: folder")
    judge = recipe.sections["judge"]
    if judge.type == "llm" and judge.mode == "pairwise":
        raise RecipeError(recipe.path, "judge.mode", "a pairwise LLM judge ranks several answers to one prompt, and "
                          "eval scores one answer per prompt and policy; use mode: pointwise")
    if recipe.sections["reward"].given:
        if config.reward_model:
            raise RecipeError(recipe.path, f"{section}.reward_model", "the recipe's reward: section says what answers "
                              "are scored with; remove reward_model (or list it there as a signal)")
        check_reward(recipe, recipe.sections["reward"])
    seen = {_folder(recipe.model.name_or_path): "the baseline (model.name_or_path)"}
    for name, folder in config.compared().items():
        key = f"{section}.policies.{shown_key(name)}" if config.policies is not None else f"{section}.policy"
        if not isinstance(name, str) or not _POLICY_NAME.fullmatch(name) or name in (BASELINE, REWARD):
            raise RecipeError(recipe.path, key, "a policy's name is letters, digits, _ and - (it names the policy's "
                              f"adapter and its row in the report), and neither '{BASELINE}' nor '{REWARD}'")
        if not isinstance(folder, str) or not folder:
            raise RecipeError(recipe.path, key, f"expected the folder of a finished policy stage, got {folder!r}")
        if (other := seen.setdefault(_folder(folder), key)) != key:
            raise RecipeError(recipe.path, key, f"{folder} is already compared as {other}; each policy must be a "
                              "folder of its own, neither the baseline's nor another policy's")
    check_generation(recipe)


def answer_logprob(model: PreTrainedModel, samples: list[Sample], temperature: float,
                   description: str | None = None, batch_size: int = 8) -> list[float]:
    """log π(answer | prompt) summed over answer tokens, under the sampling temperature.

    Right-padded batches of similar lengths: each row's tokens keep the positions they have alone and the padding
    after them is masked and never scored, so a row's sum is its single-sequence value up to float rounding.
    """
    import torch
    from tqdm.auto import tqdm
    from trl.trainer.utils import selective_log_softmax

    from rlhf_pipeline.chat import pad_batch
    from rlhf_pipeline.distributed import is_main_process

    order = sorted(range(len(samples)), key=lambda i: len(samples[i].prompt_ids) + len(samples[i].answer_ids))
    totals = [0.0] * len(samples)
    device = next(model.parameters()).device
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    with torch.no_grad():
        for batch in tqdm(batches, desc=description, disable=description is None or not is_main_process()):
            rows = [samples[i].prompt_ids + samples[i].answer_ids for i in batch]
            ids, mask = pad_batch(rows, 0, "right")  # the padding is masked and never read
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
            token_logprobs = selective_log_softmax(logits[:, :-1].float(), ids[:, 1:].to(device),
                                                   max(temperature, 1e-6))
            for row, index in enumerate(batch):
                start, end = len(samples[index].prompt_ids) - 1, len(rows[row]) - 1
                totals[index] = float(token_logprobs[row, start:end].sum())
    return totals


# The win_rate module names its gain keys explicitly; the report keeps the summary-shaped names it always had.
_GAIN_KEYS = {"mean_gain": "mean", "gain_std": "std", "gain_ci95_low": "ci95_low", "gain_ci95_high": "ci95_high"}


def compare(per_answer: dict[str, Any], config: EvalConfig) -> dict[str, Any]:
    """Summaries of every per-answer column (metric `sequence_summary`) and each policy's paired gains (`win_rate`).

    `per_answer` is {"baseline": {column: values}, "policies": {name: {column: values}}}, as eval.json keeps it;
    a policy's "kl" column is its KL to the baseline. The gains are `judge_gain`, `reward_gain` and one
    `signal/<name>_gain` per reward signal, per policy.
    """
    from rlhf_pipeline.metrics import load_metric

    summary, win_rate = load_metric("sequence_summary"), load_metric("win_rate")
    settings = {"bootstrap_samples": config.bootstrap_samples, "seed": config.seed}

    def summaries(columns: dict[str, list[float]]) -> dict[str, Any]:
        return {column: summary.compute(values=values, **settings) for column, values in columns.items()}

    baseline = per_answer[BASELINE]
    policies = {}
    for name, columns in per_answer["policies"].items():
        policies[name] = summaries(columns)
        for column in ("judge", "reward", *(c for c in baseline if c.startswith(SIGNAL))):
            if column in baseline:
                result = win_rate.compute(policy_scores=columns[column], baseline_scores=baseline[column], **settings)
                policies[name][f"{column}_gain"] = {_GAIN_KEYS.get(key, key): value for key, value in result.items()}
    return {BASELINE: summaries(baseline), "policies": policies}


def answer_traits(samples: list[Sample]) -> dict[str, float]:
    """What a model's answers show only together: the share that ended with the stop token, and their
    distinct-2 over answer tokens (the stop token left out: every finished answer shares it)."""
    from rlhf_pipeline.metrics import load_metric

    tokens = [s.answer_ids[: len(s.answer_ids) - s.finished] for s in samples]
    return {"eos_fraction": sum(s.finished for s in samples) / len(samples),
            "distinct_2": load_metric("distinct_n").compute(sequences=tokens, n=2)["distinct"]}


def made_by(name_or_path: str) -> dict[str, Any]:
    """The stage a compared model comes from and what it cost (its stage.json); nulls for a model no stage made."""
    manifest = read_manifest(Path(name_or_path))
    return {"path": name_or_path, "stage": manifest.stage if manifest else None,
            "resources": manifest.metrics.get("resources") if manifest else None}


def answer_rows(prompts: list[Messages], texts: dict[str, list[str]], samples: dict[str, list[Sample]],
                per_answer: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per prompt for answers.jsonl: every model's answer with the per-answer numbers eval.json summarises
    (judge, reward and each signal, length, KL for a policy) and whether it ended with the stop token."""
    def answer(role: str, columns: dict[str, list[float]], index: int) -> dict[str, Any]:
        return ({"answer": texts[role][index]} | {column: values[index] for column, values in columns.items()}
                | {"finished": samples[role][index].finished})

    return [{"prompt": prompt, BASELINE: answer(BASELINE, per_answer[BASELINE], index),
             "policies": {name: answer(name, columns, index) for name, columns in per_answer["policies"].items()}}
            for index, prompt in enumerate(prompts)]


def run(recipe: Recipe) -> dict[str, Any]:
    """Sample the baseline and every policy on the held-out prompts, score them, and write the comparison."""
    from rlhf_pipeline.data.loading import answer_key, load_datasets
    from rlhf_pipeline.distributed import say
    from rlhf_pipeline.generation import sample_answers, sampling_engine
    from rlhf_pipeline.judges import load_judge
    from rlhf_pipeline.outputs import write_json, write_jsonl
    from rlhf_pipeline.reward import RewardModel
    from rlhf_pipeline.reward_spec import build_reward, reward_models_from_roles, signal_columns
    from rlhf_pipeline.stages.common import finish_outputs, finished_manifest, load_frozen

    config: EvalConfig = recipe.settings
    spec: RewardSpec = recipe.sections["reward"]
    policies = config.compared()
    names = {BASELINE: recipe.model.name_or_path, **policies}
    if config.reward_model:
        names[REWARD] = config.reward_model
    names |= spec.model_roles()
    sources, tokenizer, models = load_frozen(recipe, names, scorers=frozenset(names) - {BASELINE, *policies})
    datasets, _ = load_datasets(recipe, tokenizer, prompts_only=True)
    prompts = [row["prompt"] for split in datasets.values() for row in split]
    settings = (1, config.max_new_tokens, config.temperature, config.top_p, config.seed)
    roles = [BASELINE, *policies]
    samples = {}
    with sampling_engine(recipe.sections["generation"], models[BASELINE], tokenizer, config.batch_size,
                         sources[BASELINE].path) as engine:
        for role in roles:  # every role is on the baseline's base (load_frozen refuses other tokenizers)
            engine.use(models[role], role)
            samples[role] = [s[0] for s in sample_answers(engine, tokenizer, prompts, *settings,
                                                          f"eval: sampling ({role})")]
    kl = {name: [p - b for p, b in zip(
        answer_logprob(models[name].use(name), samples[name], config.temperature, f"eval: log π ({name})"),
        answer_logprob(models[BASELINE].use(BASELINE), samples[name], config.temperature,
                       f"eval: log π_baseline ({name})"), strict=True)]
          for name in policies}
    say("eval: scoring")
    answers_known = answer_key(recipe)
    judge = load_judge(recipe.sections["judge"], recipe.model, answers_known)
    texts = {role: [s.text for s in group] for role, group in samples.items()}
    columns: dict[str, dict[str, list[float]]] = {
        role: {"judge": judge(prompts, texts[role]), "length_tokens": [len(s.answer_ids) for s in samples[role]]}
        | ({"kl": kl[role]} if role in kl else {})
        for role in roles}
    if config.reward_model:
        scorer = RewardModel.from_role(models[REWARD], REWARD, tokenizer, config.reward_model)
        for role in roles:
            columns[role]["reward"] = scorer.score(prompts, texts[role], f"eval: RM scores ({role})")
    if spec.given:
        reward = build_reward(spec, reward_models_from_roles(spec, models, tokenizer), recipe.model, answers_known)
        for role in roles:
            signals = reward.signal_scores(prompts, texts[role])
            columns[role] |= {"reward": reward.combine(signals)} | signal_columns(signals)
    per_answer = {BASELINE: columns[BASELINE], "policies": {name: columns[name] for name in policies}}
    report = compare(per_answer, config)
    report[BASELINE] |= answer_traits(samples[BASELINE]) | made_by(names[BASELINE])
    for name in policies:
        report["policies"][name] |= answer_traits(samples[name]) | made_by(names[name])
        say(f"eval: {name}: {eval_policy_line(report['policies'][name])}")
    report |= {"prompts": len(prompts), "judge": recipe.sections["judge"].name,
               "signals": {name: {"use": signal.use, "weight": signal.weight} for name, signal in spec.by_name.items()}}
    examples = [{"prompt": prompts[i][-1]["content"], BASELINE: texts[BASELINE][i],
                 "policies": {name: texts[name][i] for name in policies}}
                for i in range(min(config.num_examples, len(prompts)))]

    def write_files(folder: Path) -> None:
        write_json(folder / "eval.json", report | {"examples": examples, "per_answer": per_answer})
        write_jsonl(folder / ANSWERS, answer_rows(prompts, texts, samples, per_answer))

    finish_outputs(recipe, finished_manifest(recipe, sources[BASELINE], report, adapter=False), write_files)
    return report


STAGE = Stage(
    name="eval",
    summary="compare policies (PPO, DPO, ...) with a baseline (SFT) on held-out prompts: judge and RM gains, KL, "
            "length, diversity, cost",
    example="rlhf-pipeline eval recipes/smollm2-135m/eval.yaml",
    config_class=("rlhf_pipeline.stages.eval", "EvalConfig"),
    config_section="evaluation",
    data_formats=frozenset(FORMATS),
    sections={"judge": JudgeSpec, "reward": RewardSpec, "generation": GenerationSpec},
    extra_checks=_check,
    run=run,
    presentation=Presentation("Evaluation: policies vs baseline", eval_headline, eval_section,
                              summary_figure=("eval_tradeoff.png", "Judge gain vs KL to the baseline, per policy"),
                              answers=(ANSWERS, "one row per prompt: the baseline's and each policy's answer with "
                                       "its scores, length, KL and whether it ended with the stop token")),
    memory=MemoryModel(kind="sample"),
)
