"""AI-feedback labelling (RLAIF): sample K answers per prompt, rank them with a judge, write preference pairs.

    rlhf-pipeline label recipes/smollm2-135m/label.yaml

InstructGPT's comparison data without people: the SFT policy answers each prompt K times, the judge
scores every answer (or, when the recipe has a `reward:` section, its combined reward:
reward_spec.py), and each prompt yields pairs whose judge gap is at least `min_gap` (closer pairs
are dropped and counted). The output folder holds `preferences.jsonl`, `ranked.jsonl` and a data card
(`data_card.yaml`) that an RM recipe names like any other dataset. With `labelling.eval_split` a seeded share of
the prompts keeps its pairs apart, in `preferences_eval.jsonl` with its own card (`data_card_eval.yaml`): held-out
pairs no reward model trained on (iterated RLHF measures the RM before and after its refresh on them).

With `labelling.writes: classification` the judge is a rule (e.g. `rlhf_pipeline.rules:over_word_limit`, 1 =
broken): every sampled answer becomes a classified answer (label 1 when its score is above 0.5), written to
`classified.jsonl` with a `classification` data card, what a rule reward model trains on (Sparrow).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_pipeline.data.formats import FORMATS
from rlhf_pipeline.engines.spec import GenerationSpec, check_generation
from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.judges import JudgeSpec
from rlhf_pipeline.outputs import write_jsonl
from rlhf_pipeline.report.sections import label_headline, label_section
from rlhf_pipeline.reward_spec import RewardSpec, check_reward, signal_columns
from rlhf_pipeline.stages import MemoryModel, Presentation, Stage

if TYPE_CHECKING:
    from rlhf_pipeline.recipe import Recipe

RANKED = "ranked.jsonl"  # every sampled answer with its scores, what `annotate` shows people


@dataclass
class LabelConfig:
    """How answers are sampled and which pairs are kept."""

    output_dir: str
    num_samples: int = 4
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 16
    seed: int = 42
    min_gap: float = 0.1
    pairs: str = "best_worst"
    writes: str = "pairs"  # or "classification": each answer labelled by a rule judge (1 = broken)
    eval_split: float = 0.0  # share of the prompts whose pairs are held out (preferences_eval.jsonl)

    def __post_init__(self) -> None:
        if self.writes not in ("pairs", "classification"):
            raise ValueError("writes: pairs (preference pairs for a reward model) or classification (answers "
                             "labelled by a rule, for a rule reward model)")
        if self.num_samples < 2 and self.writes == "pairs":
            raise ValueError("num_samples: need at least 2 answers per prompt to compare")
        if self.num_samples < 1:
            raise ValueError("num_samples: at least 1 answer per prompt")
        if self.pairs not in ("best_worst", "all"):
            raise ValueError("pairs: best_worst (one pair per prompt) or all (every pair over min_gap)")
        if self.min_gap < 0:
            raise ValueError("min_gap: must be zero or more")
        if not 0 <= self.eval_split < 1:
            raise ValueError("eval_split: a share of the prompts in [0, 1)")
        if self.eval_split and self.writes != "pairs":
            raise ValueError("eval_split: holds out preference pairs; set it to 0 with writes: classification")


def select_pairs(answers: list[str], scores: list[float], min_gap: float, mode: str) -> tuple[list[dict], int]:
    """Ordered (chosen, rejected) pairs from K scored answers, and how many fell below the gap.

    A pair needs a strictly positive gap: with `min_gap: 0` any gap above zero makes a pair, and two answers
    the judge scores exactly alike (VADER gives many neutral answers 0.0) never do. Empty answers never enter
    a pair: the RM would drop such rows anyway, and counting them here keeps the generated card's size honest.
    """
    ranked = sorted(((s, a) for s, a in zip(scores, answers, strict=True) if a.strip()), key=lambda item: -item[0])
    if len(ranked) < 2:
        return [], 1
    candidates = [(ranked[0], ranked[-1])] if mode == "best_worst" else list(itertools.combinations(ranked, 2))
    pairs, too_close = [], 0
    for (high, chosen), (low, rejected) in candidates:
        if high - low <= 0 or high - low < min_gap or chosen == rejected:
            too_close += 1
            continue
        pairs.append({"chosen": chosen, "rejected": rejected, "judge_gap": high - low})
    return pairs, too_close


def check_scores(scores: list[float], judge: str, prompt: Any) -> None:
    """A judge's NaN or infinite score would order answers at random and poison the pairs: refuse it."""
    bad = [score for score in scores if not math.isfinite(score)]
    if bad:
        raise PipelineError(f"label: the judge '{judge}' returned {bad[0]} for an answer to the prompt {prompt!r} "
                            f"(scores {scores}); a judge must return finite numbers: fix it (e.g. a reward function "
                            "that divides by zero, a rating it could not parse)")


def classify(prompt: Any, answers: list[str], scores: list[float], judge: str) -> list[dict[str, Any]]:
    """Each non-empty answer with label 1 when the rule judge's score (a probability, or 0/1) is above 0.5."""
    if not all(0 <= score <= 1 for score in scores):
        raise PipelineError(f"label: writes: classification needs a rule judge returning 1 (broken) or 0 (kept), "
                            f"or a probability; '{judge}' returned {scores}")
    return [{"prompt": prompt, "answer": answer, "label": int(score > 0.5)}
            for answer, score in zip(answers, scores, strict=True) if answer.strip()]


def _classification_card(recipe: Recipe, config: LabelConfig, judge: str, counts: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": f"{recipe.output_dir.name}_classified",
        "description": (f"Answers labelled by a rule: {config.num_samples} answers per prompt sampled from "
                        f"{recipe.model.name_or_path} (temperature {config.temperature}, at most "
                        f"{config.max_new_tokens} new tokens), label 1 when the rule judge '{judge}' says the "
                        f"answer breaks the rule ({counts['violations']} of {counts['classified']})."),
        "source": {"path": "classified.jsonl"},
        "format": "classification",
        "violation_when": True,
        "license": "same as the prompts and the sampled model",
        "stages": ["rm"],
        "size": {"rows": counts["classified"], "prompts": counts["prompts"]},
        "known_issues": "Labelled by a program: exactly the rule as written, on this policy's answers only.",
    }


def held_out_prompts(count: int, share: float, seed: int) -> set[int]:
    """Indices of the prompts whose pairs are held out: a seeded share, by prompt so no prompt is on both sides.

    The same prompts, count, share and seed hold out the same prompts, so every round of iterated RLHF holds out
    one set; a refreshed RM drops those prompts' pairs from every other card it trains on (rounds.py)."""
    import random

    return set(random.Random(seed).sample(range(count), round(count * share))) if share else set()


def _card(recipe: Recipe, config: LabelConfig, judge: str, counts: dict[str, int], held_out: bool = False,
          ) -> dict[str, Any]:
    rows = counts["held_out_pairs"] if held_out else counts["pairs"] - counts["held_out_pairs"]
    prompts = counts["held_out_prompts"] if held_out else counts["prompts"] - counts["held_out_prompts"]
    return {
        "name": f"{recipe.output_dir.name}_preferences" + ("_eval" if held_out else ""),
        "description": (f"Preference pairs labelled by this pipeline: {config.num_samples} answers per prompt "
                        f"sampled from {recipe.model.name_or_path} (temperature {config.temperature}, top_p "
                        f"{config.top_p}, at most {config.max_new_tokens} new tokens), ranked by the judge "
                        f"'{judge}', pairs with a judge gap of at least {config.min_gap} kept"
                        + (f"; the pairs of the {counts['held_out_prompts']} held-out prompts." if held_out else ".")),
        "source": {"path": "preferences_eval.jsonl" if held_out else "preferences.jsonl"},
        "format": "prompt_chosen_rejected",
        "license": "same as the prompts and the sampled model",
        "stages": ["rm"],
        "size": {"rows": rows, "prompts": prompts},
        "known_issues": "Machine-judged: the pairs teach whatever the judge rewards, including its blind spots.",
    }


def _check(recipe: Recipe) -> None:
    check_reward(recipe, recipe.sections["reward"], answers_grouped=True)
    check_generation(recipe)


def run(recipe: Recipe) -> dict[str, Any]:
    """Sample, judge and pair; write the pairs, every scored answer and the generated data card."""
    import yaml
    from tqdm.auto import tqdm

    from rlhf_pipeline.data.loading import load_datasets
    from rlhf_pipeline.distributed import is_main_process, say
    from rlhf_pipeline.generation import sample_answers, sampling_engine
    from rlhf_pipeline.judges import load_judge
    from rlhf_pipeline.reward_spec import load_reward
    from rlhf_pipeline.stages.common import finish_outputs, finished_manifest, load_frozen

    config: LabelConfig = recipe.settings
    judge_spec, spec = recipe.sections["judge"], recipe.sections["reward"]
    judge_name = f"reward ({', '.join(spec.names)})" if spec.given else judge_spec.name
    sources, tokenizer, models = load_frozen(recipe, {"policy": recipe.model.name_or_path})
    datasets, data_report = load_datasets(recipe, tokenizer, prompts_only=True)
    prompts = [row["prompt"] for split in datasets.values() for row in split]
    say(f"label: {len(prompts)} prompts x {config.num_samples} answers, judge {judge_name}")
    with sampling_engine(recipe.sections["generation"], models["policy"], tokenizer, config.batch_size,
                         sources["policy"].path) as engine:
        engine.use(models["policy"], "policy")
        samples = sample_answers(engine, tokenizer, prompts, config.num_samples, config.max_new_tokens,
                                 config.temperature, config.top_p, config.seed, "labelling")
    judge = load_reward(spec, recipe.model) if spec.given else load_judge(judge_spec, recipe.model)
    held_out = held_out_prompts(len(prompts), config.eval_split, config.seed)
    ranked_rows, pair_rows, eval_rows, classified, too_close = [], [], [], [], 0
    for index, (prompt, answers) in enumerate(tqdm(list(zip(prompts, samples, strict=True)), desc="label: judging",
                                                   disable=not is_main_process())):
        texts = [a.text for a in answers]
        signals = judge.signal_scores([prompt] * len(texts), texts) if spec.given else {}
        scores = judge.combine(signals) if spec.given else judge([prompt] * len(texts), texts)
        check_scores(scores, judge_name, prompt)
        ranked_rows.append({"prompt": prompt, "answers": texts, "scores": scores}
                           | signal_columns(signals)
                           | {"length_tokens": [len(a.answer_ids) for a in answers],
                              "finished": [a.finished for a in answers]})
        if config.writes == "classification":
            classified.extend(classify(prompt, texts, scores, judge_name))
            continue
        pairs, dropped = select_pairs(texts, scores, config.min_gap, config.pairs)
        too_close += dropped
        (eval_rows if index in held_out else pair_rows).extend({"prompt": prompt, **pair} for pair in pairs)
    counts: dict[str, Any] = {"prompts": len(prompts), "answers": len(prompts) * config.num_samples,
                              "finished_answers": sum(a.finished for answers in samples for a in answers)}
    if config.writes == "classification":
        counts |= {"classified": len(classified), "violations": sum(row["label"] for row in classified)}
        counts["violation_rate"] = counts["violations"] / max(len(classified), 1)
        say(f"label: {counts['violations']} of {len(classified)} answers break the rule")
        card, data_file, rows = _classification_card(recipe, config, judge_name, counts), "classified.jsonl", classified
    else:
        counts |= {"pairs": len(pair_rows) + len(eval_rows), "held_out_pairs": len(eval_rows),
                   "held_out_prompts": len(held_out), "dropped_below_min_gap": too_close}
        say(f"label: {counts['pairs']} pairs kept ({len(eval_rows)} of them held out), {too_close} dropped below "
            f"min_gap {config.min_gap}")
        card, data_file, rows = _card(recipe, config, judge_name, counts), "preferences.jsonl", pair_rows
    metrics = {"counts": counts, "judge": judge_name, "writes": config.writes, "data": data_report.as_dict(),
               "mean_judge_score": sum(s for r in ranked_rows for s in r["scores"]) / max(counts["answers"], 1)}

    def write_files(folder: Path) -> None:
        write_jsonl(folder / data_file, rows)
        write_jsonl(folder / RANKED, ranked_rows)
        (folder / "data_card.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
        if held_out:
            write_jsonl(folder / "preferences_eval.jsonl", eval_rows)
            (folder / "data_card_eval.yaml").write_text(
                yaml.safe_dump(_card(recipe, config, judge_name, counts, held_out=True), sort_keys=False))

    finish_outputs(recipe, finished_manifest(recipe, sources["policy"], metrics, adapter=False), write_files)
    return metrics


STAGE = Stage(
    name="label",
    summary="AI feedback: sample K answers per prompt, rank them with a judge, write preference pairs",
    example="rlhf-pipeline label recipes/smollm2-135m/label.yaml labelling.num_samples=4",
    config_class=("rlhf_pipeline.stages.label", "LabelConfig"),
    config_section="labelling",
    data_formats=frozenset(FORMATS),
    sections={"judge": JudgeSpec, "reward": RewardSpec, "generation": GenerationSpec},
    extra_checks=_check,
    run=run,
    presentation=Presentation("AI-feedback labelling", label_headline, label_section,
                              answers=(RANKED, "one row per prompt: its sampled answers with their scores (and each "
                                       "reward signal's), length in tokens and whether they ended with the stop "
                                       "token")),
    memory=MemoryModel(kind="sample"),
)
