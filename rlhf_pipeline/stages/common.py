"""What every stage does the same way: load the model, build the trainer config, resume, save, mark done.

Stage modules only wire: they call `load_for_training`, build their trainer with `trainer_config`, train
from `last_checkpoint`, and hand the result to `finish`. Heavy imports stay inside functions so that the
stage registry can be read by `validate` without torch.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_pipeline.distributed import is_main_process, say
from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.models import (
    CAUSAL_LM,
    ModelSource,
    attach_lora,
    check_hardware,
    load_model,
    load_tokenizer,
    record_origin,
    resolve_source,
)
from rlhf_pipeline.outputs import (
    MARKER,
    StageManifest,
    mark_complete,
    read_manifest,
    save_recipe_and_metrics,
    staging_dir,
    write_json,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from rlhf_pipeline.recipe import Recipe

logger = logging.getLogger(__name__)


@dataclass
class Loaded:
    """A stage's starting point: where the weights came from, the tokenizer, and the trainable model."""

    source: ModelSource
    tokenizer: PreTrainedTokenizerBase
    model: Any


def finished_run(recipe: Recipe) -> StageManifest | None:
    """The manifest when this exact recipe already finished here (so the stage can be skipped)."""
    manifest = read_manifest(recipe.output_dir)
    return manifest if manifest and manifest.fingerprint == recipe.fingerprint() else None


def claim_output_dir(recipe: Recipe, overwrite: bool) -> None:
    """Refuse to write over another run's finished outputs unless asked; checkpoints of this run stay."""
    manifest = read_manifest(recipe.output_dir)
    if manifest is None:
        return
    if not overwrite:
        raise PipelineError(f"{recipe.path}: training.output_dir: {recipe.output_dir} holds a finished "
                            f"'{manifest.stage}' run of a different recipe; pass --overwrite to replace it, "
                            "or choose another output_dir")
    (recipe.output_dir / MARKER).unlink()
    for checkpoint in recipe.output_dir.glob("checkpoint-*"):
        shutil.rmtree(checkpoint)


def activation_checkpointing_default(recipe: Recipe) -> bool:
    """On by default on GPUs (memory is what binds there); off on CPU, where it costs ~40% and saves little."""
    import torch

    explicit = recipe.config.get("activation_checkpointing", recipe.config.get("gradient_checkpointing"))
    return bool(explicit) if explicit is not None else torch.cuda.is_available()


def load_for_training(recipe: Recipe, task: str = CAUSAL_LM) -> Loaded:
    """Check the hardware, then load tokenizer and model and add the stage's trainable LoRA."""
    check_hardware(recipe.model, recipe.config)
    source = resolve_source(recipe.model, progress=say)
    tokenizer = load_tokenizer(source, recipe.model)
    say(f"loading {source.origin}" + (f" with {len(source.adapters)} stage adapter(s) merged"
                                      if source.adapters else ""))
    model = load_model(source, recipe.model, tokenizer, task=task)
    model = attach_lora(model, recipe.model, task=task,
                        gradient_checkpointing=activation_checkpointing_default(recipe))
    return Loaded(source, tokenizer, model)


def load_policy(recipe: Recipe, name_or_path: str | None = None, task: str = CAUSAL_LM) -> Loaded:
    """A frozen model for sampling or scoring (stage adapters merged, no new LoRA), in eval mode."""
    import dataclasses

    check_hardware(recipe.model, recipe.config)
    spec = dataclasses.replace(recipe.model, name_or_path=name_or_path or recipe.model.name_or_path, lora=None)
    source = resolve_source(spec, progress=say)
    tokenizer = load_tokenizer(source, spec)
    model = load_model(source, spec, tokenizer, task=task).eval()
    return Loaded(source, tokenizer, model)


def trainer_config(config_class: type, recipe: Recipe, **stage_values: Any) -> Any:
    """The trainer's config from the recipe's `training` section plus hardware-aware defaults."""
    import torch

    values: dict[str, Any] = {"report_to": "none", "save_strategy": "steps", "save_steps": 50,
                              "save_total_limit": 2, "logging_steps": 5}
    if not torch.cuda.is_available():
        values.update(use_cpu=True, bf16=False)
    values.update(stage_values)
    values.update(recipe.config)
    checkpointing = activation_checkpointing_default(recipe)
    values.pop("gradient_checkpointing", None)
    values["activation_checkpointing"] = checkpointing
    return config_class(**values)


def finished_manifest(recipe: Recipe, source: ModelSource, metrics: dict[str, Any], adapter: bool,
                      task: str = CAUSAL_LM, extra: dict[str, Any] | None = None) -> StageManifest:
    """The completion record of a stage run: recipe fingerprint, base model lineage and metrics."""
    return StageManifest(stage=recipe.stage, fingerprint=recipe.fingerprint(), base_model=source.as_dict(),
                         adapter=adapter, merged_adapters=list(source.adapters), task=task, metrics=metrics,
                         extra=extra or {})


def finish_outputs(recipe: Recipe, manifest: StageManifest, write_files: Callable[[Path], None]) -> StageManifest:
    """Write a stage's files, recipe and metrics through a scratch folder, then the completion marker last."""
    if is_main_process():
        with staging_dir(recipe.output_dir) as scratch:
            write_files(scratch)
            save_recipe_and_metrics(scratch, recipe.resolved(), manifest.metrics)
        mark_complete(recipe.output_dir, manifest)
        say(f"{recipe.stage}: finished; outputs in {recipe.output_dir}")
    return manifest


def finish(recipe: Recipe, loaded: Loaded, model: PreTrainedModel, metrics: dict[str, Any],
           task: str = CAUSAL_LM, extra: dict[str, Any] | None = None) -> StageManifest:
    """Save the trained weights (adapter or full model) and tokenizer with the stage's record."""
    def write_weights(folder: Path) -> None:
        model.save_pretrained(folder, safe_serialization=True)
        loaded.tokenizer.save_pretrained(folder)
        record_origin(folder, loaded.source)

    manifest = finished_manifest(recipe, loaded.source, metrics, recipe.model.lora is not None, task, extra)
    return finish_outputs(recipe, manifest, write_weights)


def evaluate_once_before_training(trainer: Any, output_dir: Path) -> dict[str, float]:
    """The untrained model's eval metrics, kept on disk so a resumed run still reports them."""
    saved = output_dir / "eval_before_training.json"
    if saved.is_file():
        return json.loads(saved.read_text(encoding="utf-8"))
    metrics = trainer.evaluate(metric_key_prefix="eval")
    if is_main_process():
        write_json(saved, metrics)
    return metrics
