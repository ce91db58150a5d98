"""Reward modelling: a scalar head on the SFT model, trained so the chosen answer outscores the rejected one.

    rlhf-pipeline rm recipes/smollm2-135m/rm.yaml
    accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml -m rlhf_pipeline rm \\
        recipes/llama-3.1-8b-qlora/rm.yaml

The model starts from the SFT stage's output (`model.name_or_path: outputs/.../sft`): a trainable copy of
the SFT adapter on the base plus a new score head, trained with TRL's RewardTrainer (pairwise loss
-log σ(r⁺ - r⁻ - margin)). The saved adapter and head are the whole reward model on the base, exactly as
PPO and evaluation load it. Pairs are encoded exactly as PPO will sample them.
"""

from __future__ import annotations

import random
import statistics
from typing import TYPE_CHECKING, Any

from rlhf_pipeline.data.formats import PREFERENCE_FORMATS
from rlhf_pipeline.report.sections import rm_headline, rm_section
from rlhf_pipeline.stages import MemoryModel, ModelOutput, Presentation, Stage

if TYPE_CHECKING:
    from datasets import Dataset

    from rlhf_pipeline.recipe import Recipe
    from rlhf_pipeline.reward import RewardModel


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


def reward_stats(scorer: RewardModel, dataset: Dataset, sample: int = 128, seed: int = 0) -> dict[str, float]:
    """Mean and std of the rewards of training answers, which PPO uses to normalise scores.

    A seeded sample of at most `sample` answers pins both numbers well enough for normalising while
    keeping this pass a small fraction of training time on big datasets.
    """
    answers = list(dataset["chosen_ids"]) + list(dataset["rejected_ids"])
    if len(answers) > sample:
        answers = random.Random(seed).sample(answers, sample)
    rewards = scorer.score_ids(answers, "rm: reward statistics")
    return {"mean": statistics.fmean(rewards), "std": statistics.pstdev(rewards) or 1.0, "answers": len(answers)}


def run(recipe: Recipe) -> dict[str, Any]:
    """Train the reward adapter and head; save them with accuracy, margins and reward statistics."""
    from functools import partial

    from trl import RewardConfig, RewardTrainer

    from rlhf_pipeline.data.loading import load_datasets
    from rlhf_pipeline.models import REWARD, match_compute_dtype
    from rlhf_pipeline.reward import RewardModel, sequence_scores
    from rlhf_pipeline.stages.common import finish, load_for_training, say, train_resuming, trainer_config

    loaded = load_for_training(recipe, task=REWARD)
    datasets, data_report = load_datasets(recipe, loaded.tokenizer)
    say(f"rm: data {data_report.summary()}")
    encoded = {split: _encode_pairs(dataset, loaded.tokenizer) for split, dataset in datasets.items()}
    args = trainer_config(RewardConfig, recipe, max_length=recipe.data.max_length,
                          eos_token=loaded.tokenizer.eos_token)
    trainer = RewardTrainer(model=loaded.model, args=args, train_dataset=encoded["train"],
                            eval_dataset=encoded.get("eval"), processing_class=loaded.tokenizer)
    match_compute_dtype(trainer.model, recipe.model)
    _, record = train_resuming(trainer, recipe, data_report)
    scorer = RewardModel(partial(sequence_scores, trainer.model.eval()), loaded.tokenizer, trainer.model.device,
                         batch_size=args.per_device_eval_batch_size)
    held_out = pair_metrics(scorer, encoded.get("eval", encoded["train"]))
    stats = reward_stats(scorer, encoded["train"])
    metrics = {
        "eval_accuracy": held_out["accuracy"],
        "eval_mean_margin": held_out["mean_margin"],
        "eval_ece": held_out["ece"],
        "eval_brier": held_out["brier"],
        "eval": held_out,
        "reward_stats": stats,
        **record,
    }
    say(f"rm: held-out pairwise accuracy {held_out['accuracy']:.3f} on {held_out['pairs']} pairs, "
        f"mean margin {held_out['mean_margin']:.3f}, calibration error {held_out['ece']:.3f}")
    finish(recipe, loaded, trainer.model, metrics, task=REWARD, extra={"reward_stats": stats})
    return metrics


STAGE = Stage(
    name="rm",
    summary="reward model on ranked pairs (chosen > rejected), initialised from the SFT model",
    example="rlhf-pipeline rm recipes/smollm2-135m/rm.yaml",
    config_class=("trl.trainer.reward_config", "RewardConfig"),
    data_formats=frozenset(PREFERENCE_FORMATS),
    run=run,
    presentation=Presentation("Reward model", rm_headline, rm_section),
    model=ModelOutput("reward-model", "reward model (a scalar score head on the SFT model)"),
    memory=MemoryModel(head="score", rows_per_example=2),  # RewardTrainer forwards chosen and rejected together
)
