"""Best-of-n reranking: sample n_max answers per prompt, keep the one the reward ranks first, measure the judge.

    rlhf-pipeline best-of-n recipes/smollm2-135m/best-of-n.yaml

The no-training baseline of Sparrow and of Gao et al. 2022 ("Scaling laws for reward model
overoptimization"): the policy (`model.name_or_path`, normally the SFT output) answers each held-out prompt
n_max times; the recipe's `reward:` section (reward_spec.py: what best-of-n maximises) and its `judge:`
(an independent measure, such as VADER) score every answer. For each n in `n_values` the stage reports the
expected judge score and reward of the best of n answers, with 95% bootstrap intervals over prompts, and the
paired gain over n = 1, beside the analytic KL of best-of-n to the policy.

Best of n < n_max is not read off the first n samples: every n-subset of the n_max samples is a draw of n,
and `expected_best_of_n` averages the best answer's score over all of them exactly (see there).

Rerankers on the same samples, for tasks with right answers (Lightman et al. 2023 compare them so):
`rank_each_signal: true` also ranks by each reward signal alone (a process reward model under each
aggregation, an outcome RM...); `majority_vote: module:function` (the final answer of an answer, e.g.
rlhf_pipeline.tasks.answers:final_answer) picks the most frequent final answer among the n (self-consistency,
Wang et al. 2023; ties shared); `oracle: true` ranks by the judge itself (pass@n for a right/wrong judge).
Each is reported per n with the judge's value of its pick, and their paired differences at n_max.

With `write_sft_card: true` the best answer of each prompt becomes SFT data (`demonstrations.jsonl`,
prompt/completion, with a generated `data_card.yaml` an sft recipe names): rejection-sampling fine-tuning,
as in Llama 2. `sft_card_min_reward` keeps it only when its reward reaches a bar: with a verifier's 0/1 reward
and a bar of 1, only right answers (expert iteration: STaR, ReST-EM).

Writes `best_of_n.json` (per-n summaries, examples) and `answers.jsonl` (one row per prompt: every sampled answer
with its reward, signals, judge score, length and whether it finished, and which one the reward picks);
`report.md` and `best_of_n.png` come from `rlhf_pipeline.report`.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_pipeline.data.formats import FORMATS
from rlhf_pipeline.engines.spec import GenerationSpec, check_generation
from rlhf_pipeline.errors import RecipeError
from rlhf_pipeline.judges import JudgeSpec
from rlhf_pipeline.outputs import ANSWERS, write_json, write_jsonl
from rlhf_pipeline.report.process import rankers_section
from rlhf_pipeline.report.sections import best_of_n_headline
from rlhf_pipeline.reward_spec import SIGNAL, RewardSpec, check_reward, signal_columns
from rlhf_pipeline.stages import MemoryModel, Presentation, Stage

if TYPE_CHECKING:
    from rlhf_pipeline.chat import Messages
    from rlhf_pipeline.generation import Sample
    from rlhf_pipeline.recipe import Recipe

POLICY = "policy"


@dataclass
class BestOfNConfig:
    """How many answers to sample per prompt, which n to report, and whether to keep the best as SFT data."""

    output_dir: str
    n_max: int = 16
    n_values: list[int] | None = None  # null: 1, 2, 4, ... up to n_max (and n_max itself)
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 16
    seed: int = 1234
    bootstrap_samples: int = 2000
    num_examples: int = 6
    write_sft_card: bool = False
    sft_card_min_reward: float | None = None  # keep a prompt's best answer only if its reward reaches this
    rank_each_signal: bool = False  # also best-of-n by each reward signal alone, on the same samples
    majority_vote: str | None = None  # module:function giving an answer's final answer: majority voting as a ranker
    oracle: bool = False  # also best-of-n by the judge itself: the ceiling of any ranker on these samples
    vote_subsets: int = 2000  # majority vote over n-subsets: exact up to this many subsets, else this many at random

    def __post_init__(self) -> None:
        if self.n_max < 1:
            raise ValueError(f"n_max: at least 1 answer per prompt, got {self.n_max}")
        if self.n_values is None:
            self.n_values = sorted({2**k for k in range(self.n_max.bit_length()) if 2**k <= self.n_max}
                                   | {self.n_max})
        if not self.n_values or self.n_values[0] != 1:
            raise ValueError(f"n_values: must start with 1 (the gains are measured against best-of-1), got "
                             f"{self.n_values}")
        if any(b <= a for a, b in zip(self.n_values, self.n_values[1:], strict=False)):
            raise ValueError(f"n_values: must be strictly increasing, got {self.n_values}")
        if self.n_values[-1] > self.n_max:
            raise ValueError(f"n_values: {self.n_values[-1]} is above n_max {self.n_max} (best of n needs n "
                             "sampled answers per prompt); raise n_max or drop it")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: in (0, 1], got {self.top_p}")
        for name in ("max_new_tokens", "batch_size", "bootstrap_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: at least 1, got {getattr(self, name)}")
        if self.sft_card_min_reward is not None and not self.write_sft_card:
            raise ValueError("sft_card_min_reward: filters the SFT card's answers, but write_sft_card is false; "
                             "set write_sft_card: true or drop it")


def best_of_n_weights(n_max: int, n: int) -> list[float]:
    """P(the answer of reward rank i is the best of n drawn without replacement), for ranks i = 1..n_max.

    With ranks counted from the lowest reward (1) to the highest (n_max), the answer of rank i is the best of
    an n-subset exactly when it is in the subset and the other n − 1 come from the i − 1 answers below it:
    C(i−1, n−1) of the C(n_max, n) subsets. The weights sum to 1 (the hockey-stick identity).
    """
    subsets = math.comb(n_max, n)
    return [math.comb(i - 1, n - 1) / subsets for i in range(1, n_max + 1)]


def reward_order(rewards: Sequence[float]) -> list[int]:
    """Answer indices from the lowest reward to the highest; of tied answers the earlier sampled ranks higher,
    as an argmax picks the first (samples are i.i.d., so this tie-break is as good as a random one)."""
    return sorted(range(len(rewards)), key=lambda index: (rewards[index], -index))


def expected_best_of_n(rewards: Sequence[float], values: Sequence[float], n: int) -> float:
    """The unbiased estimate, from n_max samples of one prompt, of E[value of the max-reward answer of n samples].

        E_n = Σ_{i=1..n_max} C(i−1, n−1) / C(n_max, n) · v_(i)

    where v_(i) is the value (judge score, reward, length...) of the answer of reward rank i (`reward_order`).
    It is the mean over all C(n_max, n) subsets of n answers of the value of each subset's max-reward answer,
    computed in O(n_max log n_max) rather than by enumeration; n = 1 gives the plain mean, n = n_max the
    value of the single best answer.
    """
    if not 1 <= n <= len(rewards) or len(values) != len(rewards):
        raise ValueError(f"best of {n} needs 1 <= n <= {len(rewards)} answers, and one value per answer")
    order = reward_order(rewards)
    return sum(weight * values[index] for weight, index in zip(best_of_n_weights(len(rewards), n), order,
                                                                strict=True))


def kl_best_of_n(n: int) -> float:
    """log n − (n−1)/n nats: the KL of best-of-n to the policy it samples from (Stiennon et al. 2020, Gao et
    al. 2022): exact when no answer is likely to be sampled twice, an upper bound otherwise (Beirami et al. 2024)."""
    return math.log(n) - (n - 1) / n


def expected_majority(finals: Sequence[str | None], values: Sequence[float], n: int, subsets: int,
                      rng: random.Random) -> float:
    """E[value of the majority-vote pick among n of the answers]: the most frequent final answer in the subset (ties
    split evenly), valued as the mean value of the subset's answers with it; a subset where no answer states a
    final answer picks at random. Exact over all n-subsets when there are at most `subsets`, else over that many
    drawn at random."""
    size = len(finals)
    if math.comb(size, n) <= subsets:
        drawn: Iterable[Sequence[int]] = itertools.combinations(range(size), n)
    else:
        drawn = [rng.sample(range(size), n) for _ in range(subsets)]
    total, count = 0.0, 0
    for subset in drawn:
        groups: dict[str, list[float]] = {}
        for index in subset:
            if finals[index] is not None:
                groups.setdefault(finals[index], []).append(values[index])  # type: ignore[arg-type]
        if groups:
            top = max(map(len, groups.values()))
            winners = [group for group in groups.values() if len(group) == top]
            total += sum(sum(group) / len(group) for group in winners) / len(winners)
        else:
            total += sum(values[index] for index in subset) / n
        count += 1
    return total / count


def rerankers(per_prompt: list[dict[str, list[float]]], finals: list[list[str | None]] | None,
              spec: RewardSpec, config: BestOfNConfig) -> dict[str, list[dict[str, Any]]]:
    """Per reranker and n: the judge's value of its pick (`sequence_summary`), and at n_max its paired difference
    with every other reranker (`win_rate`)."""
    from rlhf_pipeline.metrics import load_metric

    rankings: dict[str, list[list[float]]] = {}  # name -> per prompt, the scores it ranks by
    if config.rank_each_signal:
        for name, signal in spec.by_name.items():
            column = f"{SIGNAL}{name}" if len(spec.by_name) > 1 else "reward"
            sign = 1.0 if signal.use == "reward" else -1.0  # a penalty or veto signal: lower is better
            rankings[name] = [[sign * v for v in scores[column]] for scores in per_prompt]
        if len(spec.by_name) > 1:
            rankings["reward"] = [scores["reward"] for scores in per_prompt]
    if config.oracle:
        rankings["oracle"] = [scores["judge"] for scores in per_prompt]
    picks = {name: {n: [expected_best_of_n(ranking, scores["judge"], n)
                        for ranking, scores in zip(ranks, per_prompt, strict=True)] for n in config.n_values}
             for name, ranks in rankings.items()}
    if finals is not None:
        rng = random.Random(config.seed)
        picks["majority"] = {n: [expected_majority(answers, scores["judge"], n, config.vote_subsets, rng)
                                 for answers, scores in zip(finals, per_prompt, strict=True)]
                             for n in config.n_values}
    summary, win_rate = load_metric("sequence_summary"), load_metric("win_rate")
    settings = {"bootstrap_samples": config.bootstrap_samples, "seed": config.seed}
    n_max = config.n_values[-1]
    out = {}
    for name, by_n in picks.items():
        out[name] = [{"n": n, "judge": summary.compute(values=values, **settings)} for n, values in by_n.items()]
        gains = {other: win_rate.compute(policy_scores=by_n[n_max], baseline_scores=picks[other][n_max], **settings)
                 for other in picks if other != name}
        out[name][-1]["gain_over"] = {other: {"mean": g["mean_gain"], "ci95_low": g["gain_ci95_low"],
                                              "ci95_high": g["gain_ci95_high"], "win_rate": g["win_rate"]}
                                      for other, g in gains.items()}
    return out


def _check(recipe: Recipe) -> None:
    """Before any weights load: a reward to rank by, whose signals can be called (reward_spec.check_reward), and a
    final-answer function for majority voting that imports."""
    from rlhf_pipeline.judges import import_function

    spec: RewardSpec = recipe.sections["reward"]
    if not spec.given:
        raise RecipeError(recipe.path, "reward", "required: what best-of-n maximises, as model: RM_FOLDER (the short "
                          "form; functions: [module:function] too) or signals: {name: {model: RM_FOLDER}, ...}")
    check_reward(recipe, spec)
    check_generation(recipe)
    if recipe.settings.majority_vote:
        try:
            import_function(recipe.settings.majority_vote)
        except ValueError as error:
            raise RecipeError(recipe.path, "best_of_n.majority_vote", f"{error}; it is `module:function`, called "
                              "with an answer's text and returning its final answer (or None)") from None


def score_columns(samples: list[list[Sample]], judge: list[float], reward: list[float],
                  signals: dict[str, list[float]]) -> list[dict[str, list[float]]]:
    """Per prompt, one list per scored column (judge, reward, each signal when several, length in tokens)."""
    columns = {"judge": judge, "reward": reward, **(signal_columns(signals) if len(signals) > 1 else {})}
    width = len(samples[0])
    return [{name: values[i * width : (i + 1) * width] for name, values in columns.items()}
            | {"length_tokens": [float(len(s.answer_ids)) for s in group]}
            for i, group in enumerate(samples)]


def summarize(per_prompt: list[dict[str, list[float]]], config: BestOfNConfig) -> list[dict[str, Any]]:
    """For each n: every column's best-of-n summary over prompts (`sequence_summary`), the judge's and
    reward's paired gains over n = 1 (`win_rate`), and the KL bound."""
    from rlhf_pipeline.metrics import load_metric

    summary, win_rate = load_metric("sequence_summary"), load_metric("win_rate")
    settings = {"bootstrap_samples": config.bootstrap_samples, "seed": config.seed}
    expected = {n: {column: [expected_best_of_n(scores["reward"], scores[column], n) for scores in per_prompt]
                    for column in per_prompt[0]}
                for n in config.n_values}
    rows = []
    for n, columns in expected.items():
        row: dict[str, Any] = {"n": n, "kl_bound": kl_best_of_n(n)}
        row |= {column: summary.compute(values=values, **settings) for column, values in columns.items()}
        if n > 1:
            for column in ("judge", "reward"):
                gain = win_rate.compute(policy_scores=columns[column], baseline_scores=expected[1][column], **settings)
                row[f"{column}_gain"] = {"mean": gain["mean_gain"], "ci95_low": gain["gain_ci95_low"],
                                         "ci95_high": gain["gain_ci95_high"], "win_rate": gain["win_rate"],
                                         "wins": gain["wins"], "ties": gain["ties"], "losses": gain["losses"]}
        rows.append(row)
    return rows


def kept_answers(prompts: list[Messages], samples: list[list[Sample]], per_prompt: list[dict[str, list[float]]],
                 min_reward: float | None = None) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Each prompt's highest-reward answer among those that ended with the stop token and are not empty, as an
    SFT row; an answer cut at max_new_tokens would teach the model to stop mid-sentence. With `min_reward`, a best
    answer below it is not kept either (a wrong answer would be taught). Prompts left out are counted by reason."""
    rows, unfinished, below = [], 0, 0
    for prompt, group, scores in zip(prompts, samples, per_prompt, strict=True):
        usable = [i for i in reversed(reward_order(scores["reward"])) if group[i].finished and group[i].text.strip()]
        if not usable:
            unfinished += 1
            continue
        best = usable[0]
        if min_reward is not None and scores["reward"][best] < min_reward:
            below += 1
            continue
        rows.append({"prompt": prompt, "completion": group[best].text, "reward": scores["reward"][best],
                     "judge": scores["judge"][best]})
    counts = {"rows": len(rows), "prompts_without_a_finished_answer": unfinished}
    return rows, counts | ({"prompts_below_min_reward": below} if min_reward is not None else {})


def _card(recipe: Recipe, config: BestOfNConfig, counts: dict[str, int]) -> dict[str, Any]:
    reward: RewardSpec = recipe.sections["reward"]
    return {
        "name": f"{recipe.output_dir.name}_demonstrations",
        "description": (f"Rejection-sampled demonstrations written by this pipeline: {config.n_max} answers per "
                        f"prompt sampled from {recipe.model.name_or_path} (temperature {config.temperature}, top_p "
                        f"{config.top_p}, at most {config.max_new_tokens} new tokens); the answer the reward "
                        f"({', '.join(reward.names)}) ranked highest among those that ended with the stop token is "
                        "kept (best-of-n, as in Llama 2's rejection-sampling fine-tuning)"
                        + (f" if its reward is at least {config.sft_card_min_reward}."
                           if config.sft_card_min_reward is not None else ".")),
        "source": {"path": "demonstrations.jsonl"},
        "format": "prompt_completion",
        "license": "same as the prompts and the sampled model",
        "stages": ["sft"],
        "size": counts,
        "known_issues": ("Chosen by the reward: a learned one passes on whatever it favours, including its blind "
                         "spots. Prompts whose answers were all cut at max_new_tokens are left out."),
    }


def run(recipe: Recipe) -> dict[str, Any]:
    """Sample n_max answers per prompt, score them with the reward and the judge, and report best-of-n per n."""
    import gc

    import yaml

    from rlhf_pipeline.data.loading import answer_key, load_datasets
    from rlhf_pipeline.distributed import say
    from rlhf_pipeline.generation import sample_answers, sampling_engine
    from rlhf_pipeline.judges import import_function, load_judge
    from rlhf_pipeline.reward_spec import load_reward
    from rlhf_pipeline.stages.common import finish_outputs, finished_manifest, load_frozen

    config: BestOfNConfig = recipe.settings
    sources, tokenizer, models = load_frozen(recipe, {POLICY: recipe.model.name_or_path})
    datasets, data_report = load_datasets(recipe, tokenizer, prompts_only=True)
    prompts = [row["prompt"] for split in datasets.values() for row in split]
    say(f"best-of-n: {len(prompts)} prompts x {config.n_max} answers")
    with sampling_engine(recipe.sections["generation"], models[POLICY], tokenizer, config.batch_size,
                         sources[POLICY].path) as engine:
        engine.use(models[POLICY], POLICY)
        samples = sample_answers(engine, tokenizer, prompts, config.n_max, config.max_new_tokens, config.temperature,
                                 config.top_p, config.seed, "best-of-n: sampling")
    del models  # the reward loads its own frozen models: free the policy's first
    gc.collect()
    flat_prompts = [prompt for prompt in prompts for _ in range(config.n_max)]
    texts = [sample.text for group in samples for sample in group]
    say("best-of-n: scoring")
    reward_spec: RewardSpec = recipe.sections["reward"]
    answers_known = answer_key(recipe)
    reward = load_reward(reward_spec, recipe.model, answers_known)
    signals = reward.signal_scores(flat_prompts, texts)
    rewards = reward.combine(signals)
    judge = load_judge(recipe.sections["judge"], recipe.model, answers_known)(flat_prompts, texts)
    per_prompt = score_columns(samples, judge, rewards, signals)
    by_n = summarize(per_prompt, config)
    finals = None
    if config.majority_vote:
        final_answer = import_function(config.majority_vote)
        finals = [[final_answer(sample.text) for sample in group] for group in samples]
    report = {"prompts": len(prompts), "n_max": config.n_max, "judge": recipe.sections["judge"].name,
              "reward": reward_spec.names, "policy": recipe.model.name_or_path, "by_n": by_n,
              "finished_fraction": sum(s.finished for group in samples for s in group) / len(texts),
              "data": data_report.as_dict()}
    if config.rank_each_signal or config.majority_vote or config.oracle:
        report["rankers"] = rerankers(per_prompt, finals, reward_spec, config)
    say(f"best-of-n: {best_of_n_headline(report)}")
    demonstrations, counts = (kept_answers(prompts, samples, per_prompt, config.sft_card_min_reward)
                              if config.write_sft_card else ([], {}))
    if config.write_sft_card:
        report["sft_card"] = counts
    answers = [{"prompt": prompt, "answers": [s.text for s in group], "finished": [s.finished for s in group],
                "best": reward_order(scores["reward"])[-1], **scores}
               for prompt, group, scores in zip(prompts, samples, per_prompt, strict=True)]
    examples = [{"prompt": row["prompt"][-1]["content"], "first": row["answers"][0], "first_judge": row["judge"][0],
                 "best": row["answers"][row["best"]], "best_judge": row["judge"][row["best"]]}
                for row in answers[: config.num_examples]]

    def write_files(folder: Path) -> None:
        write_json(folder / "best_of_n.json", report | {"examples": examples})
        write_jsonl(folder / ANSWERS, answers)
        if config.write_sft_card:
            write_jsonl(folder / "demonstrations.jsonl", demonstrations)
            (folder / "data_card.yaml").write_text(yaml.safe_dump(_card(recipe, config, counts), sort_keys=False))

    finish_outputs(recipe, finished_manifest(recipe, sources[POLICY], report, adapter=False), write_files)
    return report


STAGE = Stage(
    name="best-of-n",
    summary="best-of-n reranking: sample n answers per prompt, keep the highest-reward one; judge score and "
            "reward vs n with intervals, KL bound; optionally the kept answers as SFT data",
    example="rlhf-pipeline best-of-n recipes/smollm2-135m/best-of-n.yaml best_of_n.n_max=16",
    config_class=("rlhf_pipeline.stages.best_of_n", "BestOfNConfig"),
    config_section="best_of_n",
    data_formats=frozenset(FORMATS),
    sections={"judge": JudgeSpec, "reward": RewardSpec, "generation": GenerationSpec},
    extra_checks=_check,
    run=run,
    presentation=Presentation("Best-of-n reranking", best_of_n_headline, rankers_section,
                              summary_figure=("best_of_n.png", "Judge score and reward of best-of-n vs its KL bound"),
                              answers=(ANSWERS, "one row per prompt: its n_max answers with their reward (and each "
                                       "signal's score), judge score, length and whether they ended with the stop "
                                       "token, and the index of the one the reward picks")),
    memory=MemoryModel(kind="sample"),
)
