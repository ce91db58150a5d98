"""Supervised fine-tuning on demonstrations, with the loss on the assistant's answer only.

    rlhf-pipeline sft recipes/smollm2-135m/sft.yaml
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml -m rlhf_pipeline sft \\
        recipes/llama-3.1-8b-qlora/sft.yaml training.learning_rate=1e-4

Chat rows become prompt/completion pairs (everything before the last assistant turn is the prompt), so
TRL's SFTTrainer masks the prompt tokens and keeps the answer and its end-of-turn token in the loss,
whatever the model's chat template looks like.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from rlhf_pipeline.data.formats import SFT_FORMATS
from rlhf_pipeline.report.sections import sft_headline, sft_section
from rlhf_pipeline.stages import MemoryModel, ModelOutput, Presentation, Stage

if TYPE_CHECKING:
    from rlhf_pipeline.recipe import Recipe


def _perplexity(loss: float | None) -> float | None:
    return math.exp(loss) if loss is not None and loss < 50 else None


def run(recipe: Recipe) -> dict[str, Any]:
    """Train the SFT adapter and save it with the eval loss and perplexity before and after."""
    from trl import SFTConfig, SFTTrainer

    from rlhf_pipeline.data.loading import load_datasets
    from rlhf_pipeline.models import match_compute_dtype
    from rlhf_pipeline.stages.common import (
        evaluate_once_before_training,
        finish,
        load_for_training,
        say,
        train_resuming,
        trainer_config,
    )

    loaded = load_for_training(recipe)
    datasets, data_report = load_datasets(recipe, loaded.tokenizer)
    say(f"sft: data {data_report.summary()}")
    args = trainer_config(SFTConfig, recipe, max_length=recipe.data.max_length, completion_only_loss=True,
                          eos_token=loaded.tokenizer.eos_token)
    trainer = SFTTrainer(model=loaded.model, args=args, train_dataset=datasets["train"],
                         eval_dataset=datasets.get("eval"), processing_class=loaded.tokenizer)
    match_compute_dtype(trainer.model, recipe.model)
    before = evaluate_once_before_training(trainer, recipe.output_dir) if "eval" in datasets else {}
    _, record = train_resuming(trainer, recipe, data_report)
    after = trainer.evaluate(metric_key_prefix="eval") if "eval" in datasets else {}
    metrics = {
        "eval_loss_before": before.get("eval_loss"),
        "eval_loss": after.get("eval_loss"),
        "perplexity_before": _perplexity(before.get("eval_loss")),
        "perplexity": _perplexity(after.get("eval_loss")),
        "train_loss": next((log["train_loss"] for log in reversed(trainer.state.log_history)
                            if "train_loss" in log), None),
        **record,
    }
    say(f"sft: eval loss {metrics['eval_loss_before']} -> {metrics['eval_loss']}")
    finish(recipe, loaded, trainer.model, metrics)
    return metrics


STAGE = Stage(
    name="sft",
    summary="supervised fine-tuning on demonstrations (loss on the answer only)",
    example="rlhf-pipeline sft recipes/smollm2-135m/sft.yaml training.num_train_epochs=2",
    config_class=("trl.trainer.sft_config", "SFTConfig"),
    data_formats=frozenset(SFT_FORMATS),
    run=run,
    presentation=Presentation("Supervised fine-tuning", sft_headline, sft_section),
    model=ModelOutput("sft", "supervised fine-tuning (SFT) policy"),
    memory=MemoryModel(fused_loss=True),  # TRL's SFT never builds the full-vocabulary logits
    streams=True,  # SFTTrainer takes an IterableDataset (data.streaming)
)
