"""What every stage does the same way: load the model, build the trainer config, resume, save, mark done.

Stage modules only wire: they call `load_for_training`, build their trainer with `trainer_config`, train
from `last_checkpoint`, and hand the result to `finish`. Heavy imports stay inside functions so that the
stage registry can be read by `validate` without torch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_pipeline.distributed import is_main_process, quiet_unless_main, say
from rlhf_pipeline.errors import PipelineError, RecipeError
from rlhf_pipeline.models import (
    CAUSAL_LM,
    check_continued_lora,
    check_hardware,
    load_base,
    load_tokenizer,
    record_origin,
    same_tokenizer,
    trainable_model,
)
from rlhf_pipeline.outputs import (
    MARKER,
    StageManifest,
    checkpoints,
    last_checkpoint,
    mark_complete,
    read_manifest,
    save_recipe_and_metrics,
    staging_dir,
    write_json,
)
from rlhf_pipeline.preflight import check_launch
from rlhf_pipeline.resources import stage_resources
from rlhf_pipeline.sources import ModelSource, resolve_source
from rlhf_pipeline.stopping import raise_if_stopped, requested_signal, stopping_after_step

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from rlhf_pipeline.adapters import SharedBase
    from rlhf_pipeline.data.report import DataReport
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
        raise PipelineError(f"{recipe.path}: {recipe.config_section}.output_dir: {recipe.output_dir} holds a finished "
                            f"'{manifest.stage}' run of a different recipe; pass --overwrite to replace it, "
                            "or choose another output_dir")
    (recipe.output_dir / MARKER).unlink()
    for checkpoint in checkpoints(recipe.output_dir, complete=False):
        shutil.rmtree(checkpoint)


def activation_checkpointing_default(recipe: Recipe) -> bool:
    """On by default on GPUs (memory is what binds there); off on CPU, where it costs ~40% and saves little."""
    import torch

    explicit = recipe.config.get("activation_checkpointing", recipe.config.get("gradient_checkpointing"))
    return bool(explicit) if explicit is not None else torch.cuda.is_available()


def start_training(recipe: Recipe) -> None:
    """Check the hardware and the launch, then seed, before any weights load.

    The seed is set before loading so new LoRA weights (and a reward model's new score head) start the same
    in every run and on every rank; unseeded, two runs of one recipe differed from the first gradient.
    """
    from transformers import set_seed

    quiet_unless_main()
    check_hardware(recipe.model, recipe.config)
    check_launch(recipe)
    load_weights_whole()
    set_seed(recipe.config.get("seed", 42))


def load_weights_whole() -> None:
    """Let the next loads build whole weights on every rank, as the stages are tested under ZeRO-3.

    transformers partitions weights at load time (zero.Init) while any TrainingArguments with a ZeRO-3 config
    is alive, such as the previous stage's when `run` chains stages in one process. A frozen scorer loaded that
    way belongs to no engine and fails on its first forward (tensors of size 0, seen with GRPO after DPO); the
    trained model is partitioned when its trainer prepares it anyway.
    """
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


def load_for_training(recipe: Recipe, task: str = CAUSAL_LM) -> Loaded:
    """Load tokenizer and base, then the stage's trainable weights: a copy of the adapter it starts from, or new."""
    start_training(recipe)
    source = resolve_source(recipe.model, progress=say)
    if source.adapter is not None and recipe.model.lora is not None:
        check_continued_lora(recipe.model.lora, source.adapter)  # before the weights load
    tokenizer = load_tokenizer(source, recipe.model)
    say(f"loading {source.origin}" + (f" and continuing the adapter of {source.adapter}" if source.adapter else ""))
    base = load_base(source, recipe.model, tokenizer, task=task)
    model = trainable_model(base, recipe.model, task=task, continues=source.adapter,
                            gradient_checkpointing=activation_checkpointing_default(recipe))
    return Loaded(source, tokenizer, model)


def load_frozen(recipe: Recipe, sources: dict[str, str], scorers: frozenset[str] = frozenset(),
                ) -> tuple[dict[str, ModelSource], Any, dict[str, SharedBase]]:
    """Models to sample from or score with, each `name_or_path` a role on a base loaded once (never merged)."""
    from rlhf_pipeline.adapters import load_frozen_roles

    quiet_unless_main()
    check_hardware(recipe.model, recipe.config)
    specs = {name: dataclasses.replace(recipe.model, name_or_path=path) for name, path in sources.items()}
    resolved = {name: resolve_source(spec, progress=say) for name, spec in specs.items()}
    first, *others = resolved
    tokenizer = load_tokenizer(resolved[first], specs[first])
    for name in others:  # every model reads the same ids: answers are sampled, scored and compared as ids
        if not same_tokenizer(tokenizer, load_tokenizer(resolved[name], specs[name])):
            raise PipelineError(f"{recipe.path}: the {name} ({sources[name]}) uses a different tokenizer (vocabulary "
                                f"or special tokens) than the {first} ({sources[first]}); compare models that share "
                                "a tokenizer (stages trained from one base)")
    return resolved, tokenizer, load_frozen_roles(resolved, recipe.model, tokenizer, scorers)


def require_same_tokenizer(recipe: Recipe, key: str, scorer: ModelSource, scorer_spec: Any,
                           tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuse, before any weights load, a reward model that reads token ids differently from the policy."""
    if not same_tokenizer(tokenizer, load_tokenizer(scorer, scorer_spec)):
        raise RecipeError(recipe.path, key, f"the reward model at {scorer_spec.name_or_path} uses a different "
                          "tokenizer (vocabulary or special tokens) than the policy; train the RM from the same SFT "
                          "output as the policy")


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
    values.pop("activation_checkpointing", None)
    values[checkpointing_field(config_class)] = checkpointing
    return config_class(**values)


def checkpointing_field(config_class: type) -> str:
    """transformers 5.20 renamed `gradient_checkpointing` to `activation_checkpointing`; vLLM's CPU build pins
    transformers below it, so the stages run in .venv-vllm too (recipes may use either name)."""
    import dataclasses

    names = {field.name for field in dataclasses.fields(config_class)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


def launch_facts(accelerator: Any) -> dict[str, Any]:
    """How the run was distributed, as the ranks saw it (never as the launch command claimed).

    `ranks` is gathered from every process, so it lists rank 1 only if rank 1 really joined rank 0's
    world. Every process must call this (it is a collective operation).
    """
    from accelerate.utils import gather_object

    ranks = gather_object([accelerator.process_index]) if accelerator.num_processes > 1 else [0]
    plugin = accelerator.state.deepspeed_plugin if accelerator.distributed_type.value == "DEEPSPEED" else None
    return {"world_size": accelerator.num_processes, "ranks": sorted(ranks),
            "distributed_type": accelerator.distributed_type.value,
            "zero_stage": plugin.zero_stage if plugin is not None else None}


def train_resuming(trainer: Any, recipe: Recipe, data_report: DataReport) -> tuple[Any, dict[str, Any]]:
    """Train from the newest complete checkpoint in the stage's folder (else from the start).

    A SIGTERM or SIGINT meanwhile ends training after the current optimizer step with a checkpoint, and the
    stage with `Stopped` (rlhf_pipeline/stopping.py): our PPOTrainer polls for it itself.

    Returns what `train()` returned and what every training stage records about the run: steps, global batch,
    where it resumed, how it was launched, its data report and log history. A transformers Trainer keeps
    these in `state` and `args`; our PPOTrainer on itself.
    """
    checkpoint = last_checkpoint(recipe.output_dir)
    if hasattr(trainer, "add_callback"):
        _stop_when_signalled(trainer)
    with stopping_after_step():
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    if hasattr(trainer, "state"):
        args = trainer.args
        steps, history = trainer.state.global_step, trainer.state.log_history
        global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    else:
        steps, history, global_batch = trainer.global_step, trainer.log_history, trainer.global_batch_size
    raise_if_stopped(steps, last_checkpoint(recipe.output_dir))
    return result, {"global_steps": steps, "global_batch_size": global_batch,
                    "resumed_from": str(checkpoint) if checkpoint else None, **launch_facts(trainer.accelerator),
                    "data": data_report.as_dict(), "log_history": history}


def finished_manifest(recipe: Recipe, source: ModelSource, metrics: dict[str, Any], adapter: bool,
                      task: str = CAUSAL_LM, extra: dict[str, Any] | None = None) -> StageManifest:
    """The completion record of a stage run: recipe fingerprint, base model lineage and metrics.

    Run through `pipeline.run_stage`, the metrics also get the run's `resources` (wall time, peak memory).
    """
    if (used := stage_resources()) is not None:
        metrics = metrics | {"resources": used}
    return StageManifest(stage=recipe.stage, fingerprint=recipe.fingerprint(), base_model=source.as_dict(),
                         adapter=adapter, lineage=list(source.lineage), task=task, metrics=metrics, extra=extra or {})


def finish_outputs(recipe: Recipe, manifest: StageManifest, write_files: Callable[[Path], None]) -> StageManifest:
    """Write a stage's files, recipe and metrics through a scratch folder, then the completion marker last.

    The stage's report.md and plots follow the marker: they are derived from the files above (and can be
    rewritten with `rlhf-pipeline report`), so a plotting problem never leaves a stage unfinished.
    """
    from rlhf_pipeline.report import write_report_safely, write_stage_report

    if is_main_process():
        with staging_dir(recipe.output_dir) as scratch:
            write_files(scratch)
            save_recipe_and_metrics(scratch, recipe.resolved(), manifest.metrics)
        mark_complete(recipe.output_dir, manifest)
        say(f"{recipe.stage}: finished; outputs in {recipe.output_dir}")
        if report := write_report_safely(write_stage_report, recipe.output_dir):
            say(f"{recipe.stage}: report in {report}")
    return manifest


def gathered_state_dict(model: Any) -> dict[str, Any] | None:
    """Full tensors to save when DeepSpeed ZeRO-3 or FSDP2 has sharded the parameters; None otherwise.

    Under ZeRO-3 each rank keeps a slice of every partitioned parameter, so `save_pretrained` on rank 0
    writes zero-sized tensors (a LoRA adapter of 28 empty tensors, checked). Under FSDP2 the state dict holds
    DTensors, which `save_pretrained` cannot write at all ("invalid python storage"; checked on two CPU
    processes through accelerate's FSDP2 preparation), and it holds them even for parameters a forward left
    unsharded (the root's, such as a reward model's score head), so they are read from the state dict, not
    from the parameters. The tensors the saved file needs (the trainable ones for LoRA: adapter and
    modules_to_save; all of them for full fine-tuning) are gathered one at a time and copied on rank 0.
    Every rank must call this.
    """
    from torch.distributed.tensor import DTensor

    params = dict(model.named_parameters(remove_duplicate=False))
    state = dict(model.state_dict())
    sharded = [name for name, value in state.items()
               if isinstance(value, DTensor) or hasattr(params.get(name), "ds_id")]
    if not sharded:
        return None
    adapter_only = hasattr(model, "peft_config")
    main = is_main_process()
    for name in sharded:
        if adapter_only and not (name in params and params[name].requires_grad):
            continue
        whole = _whole_tensor(params[name] if hasattr(params.get(name), "ds_id") else state[name])  # a collective
        if main:
            state[name] = whole
    return state if main else {}


def _whole_tensor(tensor: Any) -> Any:
    """A sharded tensor whole, on the CPU: a ZeRO-3 parameter gathered in place for a moment, or a DTensor's."""
    if hasattr(tensor, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None):
            return tensor.detach().to("cpu", copy=True)
    return tensor.full_tensor().to("cpu")


def check_saved_weights(folder: Path) -> None:
    """Refuse to call a stage finished when a saved weight is empty (sharded weights saved ungathered)."""
    from safetensors import safe_open

    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as weights:
            empty = [key for key in weights.keys() if 0 in weights.get_slice(key).get_shape()]  # noqa: SIM118
        if empty:
            raise PipelineError(f"{path.name}: {len(empty)} saved tensor(s) are empty (e.g. {empty[0]}): "
                                "the weights were sharded (DeepSpeed ZeRO-3 / FSDP) and not gathered before "
                                "saving; the stage is not marked finished")


def finish(recipe: Recipe, loaded: Loaded, model: PreTrainedModel, metrics: dict[str, Any],
           task: str = CAUSAL_LM, extra: dict[str, Any] | None = None,
           save_weights: Callable[[Path], None] | None = None) -> StageManifest:
    """Save the trained weights (adapter or full model) and tokenizer with the stage's record.

    `save_weights(folder)` replaces `model.save_pretrained` for a model that holds more than the stage's
    output (PPO's shared base saves its policy adapter only).
    """
    from rlhf_pipeline.card import write_model_card
    from rlhf_pipeline.hub import push_if_configured

    state_dict = gathered_state_dict(model) if save_weights is None else None  # a collective under ZeRO-3

    def write_weights(folder: Path) -> None:
        if save_weights is not None:
            save_weights(folder)
        else:
            model.save_pretrained(folder, safe_serialization=True, **_trained_adapter_only(model),
                                  **({"state_dict": state_dict} if state_dict is not None else {}))
        check_saved_weights(folder)
        loaded.tokenizer.save_pretrained(folder)
        record_origin(folder, loaded.source)
        write_model_card(folder, manifest, recipe_path=recipe.path, recipe=recipe.resolved())

    manifest = finished_manifest(recipe, loaded.source, metrics, recipe.model.lora is not None, task, extra)
    finish_outputs(recipe, manifest, write_weights)
    push_if_configured(recipe)  # the recipe's hub.push: true; main process only
    return manifest


def _trained_adapter_only(model: Any) -> dict[str, Any]:
    """save_pretrained's arguments that keep only the trained adapter: TRL's preference and online trainers
    add a frozen copy of the starting adapter ("ref") as the reference, which is not this stage's output."""
    adapters = getattr(model, "peft_config", {})
    return {"selected_adapters": [model.active_adapter]} if len(adapters) > 1 else {}


def _stop_when_signalled(trainer: Any) -> None:
    """Make a transformers Trainer save and stop after the optimizer step during which a stop was asked for."""
    from transformers import TrainerCallback

    class _StopWhenSignalled(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if requested_signal() is not None:
                control.should_save = True
                control.should_training_stop = True

    trainer.add_callback(_StopWhenSignalled())


def own_loss_trainer(trainer_class: type, loaded: Loaded, args: Any, encoded: dict[str, Any],
                     collate: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> Any:
    """A transformers Trainer subclass with a loss of its own (`compute_loss`) on pre-encoded splits: dropout off
    when the config says so (RewardConfig's disable_dropout), and input gradients for checkpointing through LoRA."""
    from trl.trainer.utils import disable_dropout_in_model

    if getattr(args, "disable_dropout", False):
        disable_dropout_in_model(loaded.model)
    if args.gradient_checkpointing and hasattr(loaded.model, "peft_config"):
        loaded.model.enable_input_require_grads()
    return trainer_class(model=loaded.model, args=args, data_collator=collate, train_dataset=encoded["train"],
                         eval_dataset=encoded.get("eval"), processing_class=loaded.tokenizer)


def evaluate_once_before_training(trainer: Any, output_dir: Path) -> dict[str, float]:
    """The untrained model's eval metrics, kept on disk so a resumed run still reports them.

    They are measured by a callback when `train()` starts, after the trainer has prepared the model: under
    DeepSpeed an `evaluate()` before `train()` builds an inference-only engine, which ZeRO-2 refuses ("ZeRO
    inference only makes sense with ZeRO Stage 3") and after which ZeRO-3 trains without an optimizer
    (both checked). The returned dict is filled then; a run resumed without the saved file leaves it empty
    rather than report a trained model as the untrained one.
    """
    from transformers import TrainerCallback

    saved = output_dir / "eval_before_training.json"
    metrics: dict[str, float] = {}
    if saved.is_file():
        metrics.update(json.loads(saved.read_text(encoding="utf-8")))
        return metrics

    class _EvaluateAtStart(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step > 0:
                return
            metrics.update(trainer.evaluate(metric_key_prefix="eval"))
            if is_main_process():
                write_json(saved, metrics)

    trainer.add_callback(_EvaluateAtStart())
    return metrics
