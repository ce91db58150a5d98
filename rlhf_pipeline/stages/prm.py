"""Process reward model (PRM): a score for every step of a solution, trained at the token that ends each step.

    rlhf-pipeline prm recipes/smollm2-135m/prm.yaml
    accelerate launch --config_file accelerate_configs/deepspeed_zero2.yaml -m rlhf_pipeline prm \\
        recipes/smollm2-135m/prm.yaml

Lightman et al. 2023 ("Let's Verify Step by Step") and Math-Shepherd (Wang et al. 2024): instead of one
reward per answer, P(step right) per step. Built like the rm stage: a trainable copy of the SFT adapter on
the base plus a new score head (`model.name_or_path` = the SFT output), so the saved folder loads wherever a
reward model does; the head scores every token, and the loss is the binary cross-entropy of σ(score) against
the step's label at the token that ends each step (rlhf_pipeline.steps: the line break after it, or the
answer's end-of-turn token), nowhere else. Soft labels (Math-Shepherd's share of rollouts that reached the
right answer) train as they are.

Data: stepwise cards (the `stepwise`, `prm800k` and `math_shepherd` formats), such as the label stage writes
with `labelling.writes: steps`; give the held-out solutions as `data.eval` cards so that held-out means other
problems. Measured on them: step accuracy, AUROC and calibration of σ(score) (metric `rule_classification`,
label 1 = a good step) and first-error accuracy (the share of solutions whose first step below 0.5 is their
first wrong step, or that have neither). TRL's RewardConfig keys; the manifest's `extra.objective` is "process".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rlhf_pipeline.data.formats import STEPWISE_FORMATS
from rlhf_pipeline.distributed import say
from rlhf_pipeline.process_reward import PROCESS
from rlhf_pipeline.report.process import prm_headline, prm_section
from rlhf_pipeline.stages import MemoryModel, ModelOutput, Presentation, Stage

if TYPE_CHECKING:
    from datasets import Dataset

    from rlhf_pipeline.chat import Messages
    from rlhf_pipeline.recipe import Recipe

IGNORED = -100.0  # the label of every token that ends no step


def encode_solution(tokenizer: Any, prompt: Messages, steps: list[str], labels: list[float]) -> dict[str, Any] | None:
    """Prompt + answer ids as every stage encodes them, with each step's label on the token that ends it and
    IGNORED elsewhere; None when the answer's tokens do not end as many steps as it has (nothing to align)."""
    from rlhf_pipeline.chat import encode_answer, encode_prompt
    from rlhf_pipeline.steps import join_steps, step_end_positions

    prompt_ids = encode_prompt(tokenizer, prompt)
    answer_ids = encode_answer(tokenizer, join_steps(steps))
    ends = step_end_positions(tokenizer, answer_ids)
    if len(ends) != len(steps):
        return None
    targets = [IGNORED] * (len(prompt_ids) + len(answer_ids))
    for end, label in zip(ends, labels, strict=True):
        targets[len(prompt_ids) + end] = float(label)
    return {"input_ids": prompt_ids + answer_ids, "labels": targets}


def _encode(dataset: Dataset, tokenizer: Any) -> tuple[Dataset, int]:
    """Encoded solutions, and how many could not be aligned to their steps (dropped)."""
    from datasets import Dataset

    encoded = [encode_solution(tokenizer, row["prompt"], row["steps"], row["labels"]) for row in dataset]
    kept = [row for row in encoded if row is not None]
    return Dataset.from_list(kept), len(encoded) - len(kept)


class TokenScores:
    """The score head's output at every token, caught as the classification model computes it (before it keeps
    only the last token's score): one forward, through whatever wraps the model (DDP, DeepSpeed)."""

    def __init__(self, model: Any) -> None:
        from rlhf_pipeline.models import HEAD_NAMES

        head = next(module for name, module in model.named_modules() if name.rpartition(".")[2] in HEAD_NAMES)
        head.register_forward_hook(self._keep)
        self._caught: Any = None

    def _keep(self, module: Any, inputs: Any, output: Any) -> None:
        self._caught = output

    def __call__(self, model: Any, input_ids: Any, attention_mask: Any) -> Any:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        scores, self._caught = self._caught, None
        return scores.squeeze(-1).float()


def step_loss(scores: Any, labels: Any) -> Any:
    """Binary cross-entropy of σ(score) against the step labels, over the step-ending tokens only."""
    import torch

    at_steps = labels != IGNORED
    return torch.nn.functional.binary_cross_entropy_with_logits(scores[at_steps], labels[at_steps].to(scores.dtype))


def _trainer(loaded: Any, args: Any, encoded: dict[str, Dataset], token_scores: TokenScores) -> Any:
    import torch
    from transformers import Trainer

    from rlhf_pipeline.chat import pad_batch
    from rlhf_pipeline.stages.common import own_loss_trainer

    class StepTrainer(Trainer):
        loss_is_scaled_for_ga = False  # a mean over the batch's steps: the Trainer divides it over accumulation

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            scores = token_scores(model, inputs["input_ids"], inputs["attention_mask"])
            loss = step_loss(scores, inputs["labels"])
            return (loss, {"scores": scores}) if return_outputs else loss

    def collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
        ids, mask = pad_batch([row["input_ids"] for row in rows], loaded.tokenizer.pad_token_id, "right")
        width = ids.shape[1]
        labels = torch.tensor([row["labels"] + [IGNORED] * (width - len(row["labels"])) for row in rows])
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return own_loss_trainer(StepTrainer, loaded, args, encoded, collate)


def held_out_scores(model: Any, token_scores: TokenScores, dataset: Dataset, pad_id: int,
                    batch_size: int) -> tuple[list[list[float]], list[list[float]]]:
    """Per solution: the PRM's score (logit) at each step's end, and the step labels."""
    import torch

    from rlhf_pipeline.chat import pad_batch

    scores, labels = [], []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            rows = dataset[start : start + batch_size]
            ids, mask = pad_batch(rows["input_ids"], pad_id, "right")
            logits = token_scores(model, ids.to(model.device), mask.to(model.device)).cpu()
            for row, targets in enumerate(rows["labels"]):
                at = [index for index, value in enumerate(targets) if value != IGNORED]
                scores.append(logits[row, at].tolist())
                labels.append([targets[index] for index in at])
    return scores, labels


def first_error(values: list[float]) -> int | None:
    """The index of the first value below 0.5 (a wrong step, or one the PRM calls wrong); None if there is none."""
    return next((index for index, value in enumerate(values) if value < 0.5), None)


def step_metrics(scores: list[list[float]], labels: list[list[float]]) -> dict[str, Any]:
    """Held-out step accuracy, AUROC and calibration (label 1 = a good step; a soft label counts as good from
    0.5), and first-error accuracy over solutions."""
    import math

    from rlhf_pipeline.metrics import load_metric

    flat_scores = [s for row in scores for s in row]
    flat_labels = [int(label >= 0.5) for row in labels for label in row]
    steps = load_metric("rule_classification").compute(scores=flat_scores, labels=flat_labels)
    steps["good_step_rate"] = steps.pop("base_rate")
    probabilities = [[1 / (1 + math.exp(-s)) for s in row] for row in scores]
    first_errors = [first_error(p) == first_error(y) for p, y in zip(probabilities, labels, strict=True)]
    return {**steps, "steps": steps.pop("answers"), "solutions": len(scores),
            "first_error_accuracy": sum(first_errors) / len(first_errors),
            "solutions_all_good": sum(first_error(y) is None for y in labels) / len(labels),
            "scores": scores, "labels": labels}


def run(recipe: Recipe) -> dict[str, Any]:
    """Train the PRM's adapter and head at the step ends; save them with their held-out step metrics."""
    from trl import RewardConfig

    from rlhf_pipeline.data.loading import load_datasets
    from rlhf_pipeline.models import REWARD, match_compute_dtype
    from rlhf_pipeline.stages.common import finish, load_for_training, train_resuming, trainer_config

    loaded = load_for_training(recipe, task=REWARD)
    datasets, data_report = load_datasets(recipe, loaded.tokenizer)
    encoded, unaligned = {}, 0
    for split, dataset in datasets.items():
        encoded[split], dropped = _encode(dataset, loaded.tokenizer)
        unaligned += dropped
    if unaligned:
        data_report.dropped["steps_not_aligned"] += unaligned
        data_report.kept -= unaligned
    say(f"prm: data {data_report.summary()}")
    args = trainer_config(RewardConfig, recipe, remove_unused_columns=False, label_names=["labels"])
    token_scores = TokenScores(loaded.model)
    trainer = _trainer(loaded, args, encoded, token_scores)
    match_compute_dtype(trainer.model, recipe.model)
    _, record = train_resuming(trainer, recipe, data_report)
    held_out = step_metrics(*held_out_scores(trainer.model, token_scores, encoded.get("eval", encoded["train"]),
                                             loaded.tokenizer.pad_token_id, args.per_device_eval_batch_size))
    say(f"prm: {prm_headline({'eval': held_out})}")
    metrics = {"objective": PROCESS, "eval_step_accuracy": held_out["accuracy"], "eval_auroc": held_out["auroc"],
               "eval_first_error_accuracy": held_out["first_error_accuracy"], "eval_ece": held_out["ece"],
               "eval": held_out, "held_out_split": "eval cards" if recipe.data.eval else "carved from train",
               **record}
    finish(recipe, loaded, trainer.model, metrics, task=REWARD, extra={"objective": PROCESS})
    return metrics


STAGE = Stage(
    name="prm",
    summary="process reward model: a score per solution step (at the token ending it), from stepwise cards, "
            "initialised from the SFT model",
    example="rlhf-pipeline prm recipes/smollm2-135m/prm.yaml",
    config_class=("trl.trainer.reward_config", "RewardConfig"),
    data_formats=frozenset(STEPWISE_FORMATS),
    run=run,
    presentation=Presentation("Process reward model", prm_headline, prm_section),
    model=ModelOutput("process-reward-model", "process reward model (a score head read at the end of each step)"),
    memory=MemoryModel(head="score"),
)
