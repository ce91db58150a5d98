"""Reward modelling: a scalar head on the SFT model, trained so the chosen answer outscores the rejected one.

    rlhf-pipeline rm recipes/smollm2-135m/rm.yaml
    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml -m rlhf_pipeline rm \\
        recipes/llama-3.1-8b-qlora/rm.yaml

The model starts from the SFT stage's output (`model.name_or_path: outputs/.../sft`): a trainable copy of
the SFT adapter on the base plus a new score head, trained with TRL's RewardTrainer (pairwise loss
-log σ(r⁺ - r⁻ - margin)). The saved adapter and head are the whole reward model on the base, exactly as
PPO and evaluation load it. Pairs are encoded exactly as PPO will sample them.

Started from a finished pairwise rm stage instead (a refresh, as iterated RLHF does), it continues that reward
model, adapter and score head, and first measures it on the held-out pairs: `metrics.before` is the old reward
model's accuracy on exactly the pairs the refreshed one is measured on.

With `classification` cards the same head becomes a rule reward model (DeepMind's Sparrow): trained with the
binary cross-entropy of σ(score) against "the answer breaks the rule", so σ(score) is that probability. The
manifest's `extra.objective` says which of the two a finished rm stage is ("pairwise" or "classification").
"""

from __future__ import annotations

import random
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_pipeline.data.formats import CLASSIFICATION_FORMATS, PREFERENCE_FORMATS
from rlhf_pipeline.distributed import say
from rlhf_pipeline.errors import RecipeError
from rlhf_pipeline.report.sections import rm_headline, rm_section
from rlhf_pipeline.reward import CLASSIFICATION, PAIRWISE
from rlhf_pipeline.stages import MemoryModel, ModelOutput, Presentation, Stage

if TYPE_CHECKING:
    from datasets import Dataset

    from rlhf_pipeline.recipe import Recipe
    from rlhf_pipeline.reward import RewardModel
    from rlhf_pipeline.stages.common import Loaded


def objective(recipe: Recipe) -> str:
    """What the recipe's cards train: a rule classifier when they are classification cards, else pairs."""
    return CLASSIFICATION if any(card.format in CLASSIFICATION_FORMATS for card in recipe.cards) else PAIRWISE


_HOLDS = {CLASSIFICATION: "is a classification card (answers labelled by whether they break a rule)",
          PAIRWISE: "holds preference pairs"}


def _check(recipe: Recipe) -> None:
    """One rm stage trains one objective: refuse classification cards mixed with preference cards."""
    seen: dict[str, str] = {}  # objective -> the first card of it, as the recipe names it
    for split in ("train", "eval"):
        for index, ref in enumerate(recipe.data.refs(split)):
            card = next((c for c in recipe.cards if Path(ref).stem in (c.name, c.file.stem)), None)
            if card is None:  # written by an earlier pipeline stage: checked when this stage starts
                continue
            kind = CLASSIFICATION if card.format in CLASSIFICATION_FORMATS else PAIRWISE
            other = PAIRWISE if kind == CLASSIFICATION else CLASSIFICATION
            if other in seen:
                raise RecipeError(recipe.path, f"data.{split}[{index}]",
                                  f"card '{ref}' {_HOLDS[kind]}, but {seen[other]} {_HOLDS[other]}; one rm stage "
                                  "trains either a pairwise reward model or a rule reward model (a classifier), so "
                                  "give the rule reward model's cards a recipe and output_dir of their own")
            seen.setdefault(kind, f"data.{split}[{index}] ('{ref}')")
    if CLASSIFICATION in seen and recipe.config.get("center_rewards_coefficient") is not None:
        raise RecipeError(recipe.path, "training.center_rewards_coefficient", "centres pairwise rewards; a rule "
                          "reward model's score is the log-odds of a violation and takes no centring: remove the key")


def refreshed_reward_model(adapter: str | None) -> str | None:
    """The folder of the pairwise reward model this stage continues (its adapter and score head), if it does."""
    from rlhf_pipeline.outputs import read_manifest

    manifest = read_manifest(Path(adapter)) if adapter else None
    return adapter if manifest and manifest.stage == "rm" and manifest.extra.get("objective") == PAIRWISE else None


def _encode_pairs(dataset: Dataset, tokenizer: Any) -> Dataset:
    """Pre-tokenize pairs with the shared chat encoding, so RewardTrainer trains on PPO's token layout."""
    from rlhf_pipeline.chat import answer_text, encode_answer, encode_prompt

    def encode(row: dict[str, Any]) -> dict[str, Any]:
        prompt = encode_prompt(tokenizer, row["prompt"])
        return {"chosen_ids": prompt + encode_answer(tokenizer, answer_text(row["chosen"])),
                "rejected_ids": prompt + encode_answer(tokenizer, answer_text(row["rejected"]))}

    keep = {"margin"} & set(dataset.column_names)
    return dataset.map(encode, remove_columns=[c for c in dataset.column_names if c not in keep],
                       desc="rm: encoding pairs")


def pair_metrics(scorer: RewardModel, dataset: Dataset) -> dict[str, Any]:
    """Held-out pairwise accuracy, margin and calibration (metric `pairwise_accuracy`), plus both reward lists."""
    from rlhf_pipeline.metrics import load_metric

    chosen = scorer.score_ids(list(dataset["chosen_ids"]), "rm: scoring held-out chosen")
    rejected = scorer.score_ids(list(dataset["rejected_ids"]), "rm: scoring held-out rejected")
    return {
        **load_metric("pairwise_accuracy").compute(chosen_rewards=chosen, rejected_rewards=rejected),
        "chosen_reward_mean": statistics.fmean(chosen),
        "rejected_reward_mean": statistics.fmean(rejected),
        "chosen_rewards": chosen,
        "rejected_rewards": rejected,
    }


def answer_metrics(scorer: RewardModel, dataset: Dataset) -> dict[str, Any]:
    """A rule RM's held-out accuracy, AUROC and calibration (metric `rule_classification`), plus its scores."""
    from rlhf_pipeline.metrics import load_metric

    scores = scorer.score_ids(list(dataset["input_ids"]), "rm: scoring held-out answers")
    labels = [int(label) for label in dataset["labels"]]
    by_label = {label: [s for s, y in zip(scores, labels, strict=True) if y == label] for label in (0, 1)}
    return {
        **load_metric("rule_classification").compute(scores=scores, labels=labels),
        "violation_score_mean": statistics.fmean(by_label[1]) if by_label[1] else None,
        "kept_score_mean": statistics.fmean(by_label[0]) if by_label[0] else None,
        "scores": scores,
        "labels": labels,
    }


def reward_stats(scorer: RewardModel, answers: list[list[int]], sample: int = 128,
                 seed: int = 0) -> dict[str, float]:
    """Mean and std of the rewards of training answers (encoded), which PPO uses to normalise scores.

    A seeded sample of at most `sample` answers pins both numbers well enough for normalising while
    keeping this pass a small fraction of training time on big datasets.
    """
    if len(answers) > sample:
        answers = random.Random(seed).sample(answers, sample)
    rewards = scorer.score_ids(answers, "rm: reward statistics")
    return {"mean": statistics.fmean(rewards), "std": statistics.pstdev(rewards) or 1.0, "answers": len(answers)}


Measured = tuple[dict[str, Any], dict[str, Any], dict[str, float]]  # headline numbers, held-out block, reward stats


def _measure_pairs(scorer: RewardModel, encoded: dict[str, Dataset]) -> Measured:
    """A pairwise RM's held-out numbers (on the training pairs when there is no eval split) and reward statistics."""
    held_out = pair_metrics(scorer, encoded.get("eval", encoded["train"]))
    say(f"rm: held-out pairwise accuracy {held_out['accuracy']:.3f} on {held_out['pairs']} pairs, "
        f"mean margin {held_out['mean_margin']:.3f}, calibration error {held_out['ece']:.3f}")
    headline = {"eval_accuracy": held_out["accuracy"], "eval_mean_margin": held_out["mean_margin"],
                "eval_ece": held_out["ece"], "eval_brier": held_out["brier"]}
    answers = list(encoded["train"]["chosen_ids"]) + list(encoded["train"]["rejected_ids"])
    return headline, held_out, reward_stats(scorer, answers)


def _measure_answers(scorer: RewardModel, encoded: dict[str, Dataset]) -> Measured:
    """A rule RM's held-out numbers (on the training answers when there is no eval split) and reward statistics."""
    held_out = answer_metrics(scorer, encoded.get("eval", encoded["train"]))
    auroc = "—" if held_out["auroc"] is None else f"{held_out['auroc']:.3f}"
    say(f"rm: rule classifier, held-out accuracy {held_out['accuracy']:.3f} on {held_out['answers']} answers "
        f"(base rate {held_out['base_rate']:.3f}), AUROC {auroc}, calibration error {held_out['ece']:.3f}")
    headline = {"eval_accuracy": held_out["accuracy"], "eval_auroc": held_out["auroc"], "eval_ece": held_out["ece"],
                "eval_brier": held_out["brier"], "eval_base_rate": held_out["base_rate"]}
    return headline, held_out, reward_stats(scorer, list(encoded["train"]["input_ids"]))


def _encode_answers(dataset: Dataset, tokenizer: Any) -> Dataset:
    """Pre-tokenize classified answers with the shared chat encoding, as PPO presents answers to a scorer."""
    from rlhf_pipeline.chat import answer_text, encode_answer, encode_prompt

    def encode(row: dict[str, Any]) -> dict[str, Any]:
        return {"input_ids": encode_prompt(tokenizer, row["prompt"]) + encode_answer(tokenizer,
                                                                                    answer_text(row["completion"])),
                "labels": float(row["label"])}

    return dataset.map(encode, remove_columns=dataset.column_names, desc="rm: encoding answers")


def _classifier_trainer(loaded: Loaded, args: Any, encoded: dict[str, Dataset]) -> Any:
    """A transformers Trainer whose loss is the binary cross-entropy of σ(score): RewardTrainer is pairwise only.

    Scores come from `sequence_scores`, the function the pairwise metrics and PPO's scorer read, at each
    answer's last token (its end-of-turn), so the trained probability is the one PPO will see.
    """
    import torch
    from transformers import Trainer

    from rlhf_pipeline.chat import pad_batch
    from rlhf_pipeline.reward import sequence_scores
    from rlhf_pipeline.stages.common import own_loss_trainer

    class ClassifierTrainer(Trainer):
        loss_is_scaled_for_ga = False  # a batch mean: the Trainer divides it over gradient accumulation

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            scores = sequence_scores(model, inputs["input_ids"], inputs["attention_mask"])
            loss = torch.nn.functional.binary_cross_entropy_with_logits(scores, inputs["labels"].to(scores.dtype))
            return (loss, {"scores": scores}) if return_outputs else loss

    def collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
        ids, mask = pad_batch([row["input_ids"] for row in rows], loaded.tokenizer.pad_token_id, "right")
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([row["labels"] for row in rows])}

    return own_loss_trainer(ClassifierTrainer, loaded, args, encoded, collate)


def run(recipe: Recipe) -> dict[str, Any]:
    """Train the reward adapter and head; save them with their held-out metrics and reward statistics."""
    from functools import partial

    from trl import RewardConfig, RewardTrainer

    from rlhf_pipeline.data.loading import load_datasets
    from rlhf_pipeline.models import REWARD, match_compute_dtype
    from rlhf_pipeline.reward import RewardModel, sequence_scores
    from rlhf_pipeline.stages.common import finish, load_for_training, train_resuming, trainer_config

    classifier = objective(recipe) == CLASSIFICATION
    loaded = load_for_training(recipe, task=REWARD)
    datasets, data_report = load_datasets(recipe, loaded.tokenizer)
    say(f"rm: data {data_report.summary()}")
    encode = _encode_answers if classifier else _encode_pairs
    encoded = {split: encode(dataset, loaded.tokenizer) for split, dataset in datasets.items()}
    if classifier:
        args = trainer_config(RewardConfig, recipe, remove_unused_columns=False, label_names=["labels"])
        trainer = _classifier_trainer(loaded, args, encoded)
    else:
        args = trainer_config(RewardConfig, recipe, max_length=recipe.data.max_length,
                              eos_token=loaded.tokenizer.eos_token)
        trainer = RewardTrainer(model=loaded.model, args=args, train_dataset=encoded["train"],
                                eval_dataset=encoded.get("eval"), processing_class=loaded.tokenizer)
    match_compute_dtype(trainer.model, recipe.model)

    def scorer() -> RewardModel:
        return RewardModel(partial(sequence_scores, trainer.model.eval()), loaded.tokenizer, trainer.model.device,
                           batch_size=args.per_device_eval_batch_size)

    before = None
    if not classifier and (start := refreshed_reward_model(loaded.source.adapter)) is not None:
        start_held_out = pair_metrics(scorer(), encoded.get("eval", encoded["train"]))
        before = {"reward_model": start, "eval_accuracy": start_held_out["accuracy"],
                  "eval_mean_margin": start_held_out["mean_margin"], "pairs": start_held_out["pairs"]}
        say(f"rm: before the refresh, {start} has held-out pairwise accuracy {before['eval_accuracy']:.3f}")
    _, record = train_resuming(trainer, recipe, data_report)
    headline, held_out, stats = (_measure_answers if classifier else _measure_pairs)(scorer(), encoded)
    kind = CLASSIFICATION if classifier else PAIRWISE
    metrics = {"objective": kind, **headline, "eval": held_out, "reward_stats": stats, "before": before, **record}
    finish(recipe, loaded, trainer.model, metrics, task=REWARD, extra={"reward_stats": stats, "objective": kind})
    return metrics


STAGE = Stage(
    name="rm",
    summary="reward model on ranked pairs (chosen > rejected), or a rule classifier on classification cards, "
            "initialised from the SFT model",
    example="rlhf-pipeline rm recipes/smollm2-135m/rm.yaml",
    config_class=("trl.trainer.reward_config", "RewardConfig"),
    data_formats=frozenset(PREFERENCE_FORMATS | CLASSIFICATION_FORMATS),
    run=run,
    presentation=Presentation("Reward model", rm_headline, rm_section),
    model=ModelOutput("reward-model", "reward model (a scalar score head on the SFT model)"),
    memory=MemoryModel(head="score", rows_per_example=2),  # RewardTrainer forwards chosen and rejected together
    extra_checks=_check,
)
