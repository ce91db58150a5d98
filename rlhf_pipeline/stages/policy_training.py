"""What the policy stages that wrap TRL's trainers (dpo, kto, grpo, rloo) share: the checks and the wiring.

Each starts from the SFT stage's output, as PPO does: its trainable weights are a copy of the SFT adapter on
the base. Given a PEFT model that already carries an adapter, TRL's trainers copy it into a frozen adapter
named "ref" and take the reference log-probabilities from that copy, so the anchor (DPO/KTO's implicit reward,
GRPO/RLOO's KL penalty) is the SFT policy, never the raw base, with no second base for it. The stage saves
the trained adapter only: a complete policy on the base, like every other stage's output.

With `generation.engine: vllm`, GRPO samples through the pipeline's engine (TRL's `rollout_func` hook: the
trained adapter of each step reaches the engine as merged weights or a new LoRA id, never merged into the training
base); RLOO has no such hook and gets TRL's own colocated vLLM where that is exact (a full-precision base on GPUs):
TRL merges the adapter into the training base for each sync, which re-quantizes a 4-bit base, and it loads weights
in memory, which vLLM's CPU build refuses.

`trl_stage` declares such a stage from a TRL trainer's name, so each stage module only says what differs.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_pipeline.engines.spec import GenerationSpec, check_generation
from rlhf_pipeline.errors import RecipeError
from rlhf_pipeline.outputs import read_manifest
from rlhf_pipeline.report.sections import Panels, curves_headline, curves_section
from rlhf_pipeline.reward_spec import RewardSpec
from rlhf_pipeline.stages import MemoryModel, ModelOutput, Presentation, Stage

if TYPE_CHECKING:
    from rlhf_pipeline.recipe import Recipe


def check_starts_from_sft(recipe: Recipe) -> None:
    """A LoRA on one base, starting from (and anchored to) a finished SFT stage when it names a stage folder.

    A Hub id or a plain model folder is accepted as the start: that model, unchanged, is then the reference.
    """
    if recipe.model.lora is None:
        raise RecipeError(recipe.path, "model.lora", f"the {recipe.stage} stage trains a copy of the SFT adapter "
                          "beside its frozen reference on one base; add a lora section (the SFT adapter's shape)")
    start = Path(recipe.model.name_or_path)
    if (start / "config.json").is_file() and read_manifest(start) is None:
        return  # a plain model folder (an instruct model, say): the model as it is is the reference
    recipe.check_finished_stage("model.name_or_path", start, ("sft",),
                                "not the SFT policy; point model.name_or_path at the sft stage's output_dir: its "
                                "adapter is where training starts and the reference it is anchored to")


def check_reward_spec(recipe: Recipe) -> None:
    """Before weights load: the signals can be called, none is a veto (no weighted sum), weights line up."""
    from rlhf_pipeline.reward_spec import check_reward

    check_starts_from_sft(recipe)
    spec = recipe.sections["reward"]
    if not spec.given:
        raise RecipeError(recipe.path, "reward", "required: the signals the sampled answers are scored with, as "
                          "signals: {name: {model: RM_FOLDER}, ...} or the short form model: RM_FOLDER, functions: "
                          "[module:function]")
    check_reward(recipe, spec)
    if vetoes := [name for name, signal in spec.by_name.items() if signal.use == "veto"]:
        raise RecipeError(recipe.path, f"reward.signals.{vetoes[0]}.use", f"{recipe.stage} sums its signals with "
                          "TRL's reward_weights, which cannot express a veto; use `use: penalty` here (ppo, eval, "
                          "label and best_of_n apply vetoes)")
    weights = recipe.config.get("reward_weights")
    if weights is not None and len(weights) != len(spec.names):
        raise RecipeError(recipe.path, "training.reward_weights", f"{len(weights)} weight(s) for "
                          f"{len(spec.names)} reward signal(s) ({', '.join(spec.names)}); give one weight per "
                          "signal, in that order, or remove the key (all 1.0)")
    if weights is not None and spec.signals:
        raise RecipeError(recipe.path, "training.reward_weights", "the signals carry their own weights "
                          "(reward.signals.<name>.weight); remove training.reward_weights")
    check_engine(recipe)


def check_engine(recipe: Recipe) -> None:
    """The recipe's engine for an online stage: GRPO takes ours; RLOO only TRL's own, where that is exact."""
    generation: GenerationSpec = recipe.sections["generation"]
    check_generation(recipe)
    if recipe.config.get("use_vllm"):
        raise RecipeError(recipe.path, "training.use_vllm", "set generation.engine: vllm instead (one switch for "
                          "every stage; GRPO then samples through the pipeline's engine, synced exactly)")
    if not generation.uses_vllm or recipe.stage != "rloo":
        return
    if generation.mode != "colocated":
        raise RecipeError(recipe.path, "generation.mode", "RLOO samples with TRL's own vLLM integration (its trainer "
                          "has no hook for the pipeline's engine), whose server mode needs `trl vllm-serve`; use mode: "
                          "colocated, or the grpo stage, which samples through any of the pipeline's engines")
    if recipe.model.quantization.enabled:
        raise RecipeError(recipe.path, "generation.engine", "RLOO would sample with TRL's vLLM integration, which "
                          "merges the adapter into the training base for every sync: on a 4/8-bit base that re-"
                          "quantizes and erases small updates; use generation.engine: hf, or the grpo stage")
    if not Path("/proc/driver/nvidia").exists():  # no NVIDIA driver: a CPU machine (checked without torch)
        raise RecipeError(recipe.path, "generation.engine", "RLOO would sample with TRL's vLLM integration, which "
                          "loads weights into vLLM in memory, and vLLM's CPU build refuses that; use "
                          "generation.engine: hf on CPU, or the grpo stage, which samples through the pipeline's "
                          "vLLM engine")


def train_policy(recipe: Recipe, trainer_class: type, config_class: type, *, prompts_only: bool = False,
                 reward_funcs: list[Any] | None = None, **config_values: Any) -> dict[str, Any]:
    """Load the SFT adapter's trainable copy, build the trainer, train resuming, save the adapter.

    Metrics: every logged key's first and last value, the held-out evaluation when the data has an eval
    split, and what every training stage records (steps, launch, data report, log history).
    """
    from rlhf_pipeline.data.loading import load_datasets
    from rlhf_pipeline.models import match_compute_dtype
    from rlhf_pipeline.stages.common import finish, load_for_training, say, train_resuming, trainer_config

    loaded = load_for_training(recipe)
    args = trainer_config(config_class, recipe, **config_values)  # after loading: see load_weights_whole
    datasets, data_report = load_datasets(recipe, loaded.tokenizer, prompts_only=prompts_only)
    say(f"{recipe.stage}: data {data_report.summary()}")
    extra = {"reward_funcs": reward_funcs} if reward_funcs is not None else {}
    with _rollout_engine(recipe, loaded, args) as rollout:
        extra |= {"rollout_func": rollout} if rollout is not None else {}
        trainer = trainer_class(model=loaded.model, args=args, train_dataset=datasets["train"],
                                eval_dataset=datasets.get("eval"), processing_class=loaded.tokenizer, **extra)
        match_compute_dtype(trainer.model, recipe.model)
        _, record = train_resuming(trainer, recipe, data_report)
    first, final = first_and_last_values([entry for entry in trainer.state.log_history if "loss" in entry])
    metrics = {
        "first": first,
        "final": final,
        "train_loss": next((log["train_loss"] for log in reversed(trainer.state.log_history)
                            if "train_loss" in log), None),
        "eval": trainer.evaluate(metric_key_prefix="eval") if "eval" in datasets else {},
        **record,
    }
    finish(recipe, loaded, trainer.model, metrics)
    return metrics


@contextmanager
def _rollout_engine(recipe: Recipe, loaded: Any, args: Any) -> Iterator[Any]:
    """GRPO with `generation.engine: vllm`: TRL's `rollout_func`, sampling each step's adapter through our engine."""
    generation = recipe.sections.get("generation")
    if generation is None or not generation.uses_vllm or recipe.stage != "grpo":
        yield None
        return
    from rlhf_pipeline.adapters import SharedBase
    from rlhf_pipeline.chat import encode_prompt
    from rlhf_pipeline.engines.base import SamplingSettings
    from rlhf_pipeline.generation import sampling_engine, stop_ids
    from rlhf_pipeline.resources import record_sampling

    view = SharedBase(loaded.model)  # the trained adapter ("default") as the policy role, for the engine
    view.roles["policy"] = "default"
    with sampling_engine(generation, view, loaded.tokenizer, args.per_device_train_batch_size,
                         loaded.source.path) as engine:
        def rollout(prompts: list[Any], trainer: Any) -> dict[str, list[Any]]:
            """One answer per prompt row (TRL repeats each prompt num_generations times)."""
            engine.use(view, "policy", trainer.state.global_step)
            ids = [encode_prompt(loaded.tokenizer, prompt) for prompt in prompts]
            settings = SamplingSettings(args.max_completion_length, args.temperature, args.top_p, args.seed,
                                        stop_ids(loaded.tokenizer))
            completions = [group[0] for group in engine.generate(ids, 1, settings)]
            record_sampling(engine.stats.as_dict())
            return {"prompt_ids": ids, "completion_ids": [c.token_ids for c in completions],
                    "logprobs": [c.logprobs for c in completions]}

        yield rollout


def first_and_last_values(logs: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Each logged key's first and last value: GRPO/RLOO log their sampling metrics only in the log entries
    of the steps that sampled, so the last entry alone can lack the reward."""
    first: dict[str, Any] = {}
    last: dict[str, Any] = {}
    for entry in logs:
        for key, value in entry.items():
            first.setdefault(key, value)
            last[key] = value
    return first, last


def train_online(recipe: Recipe, trainer_class: type, config_class: type) -> dict[str, Any]:
    """GRPO/RLOO: the policy samples answers to the cards' prompts, scored by the recipe's `reward:` signals."""
    import dataclasses

    from rlhf_pipeline.models import load_tokenizer
    from rlhf_pipeline.reward_spec import load_reward, trl_reward_functions
    from rlhf_pipeline.sources import resolve_source
    from rlhf_pipeline.stages.common import load_weights_whole, require_same_tokenizer

    load_weights_whole()
    spec = recipe.sections["reward"]
    if spec.models():
        tokenizer = load_tokenizer(resolve_source(recipe.model), recipe.model)
        for name, folder in spec.models().items():
            scorer_spec = dataclasses.replace(recipe.model, name_or_path=folder)
            require_same_tokenizer(recipe, spec.signal_key(name), resolve_source(scorer_spec), scorer_spec, tokenizer)
    functions, weights = trl_reward_functions(load_reward(spec, recipe.model))  # training.reward_weights wins
    generation = recipe.sections["generation"]
    trl_vllm = {"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization":
                generation.gpu_memory_utilization} if generation.uses_vllm and recipe.stage == "rloo" else {}
    return train_policy(recipe, trainer_class, config_class, prompts_only=True, reward_funcs=functions,
                        reward_weights=weights, **trl_vllm)


ONLINE_PANELS = (("reward", "reward (weighted sum)"), ("kl", "KL to the SFT policy"),
                 ("completions/mean_length", "answer length (tokens)"), ("entropy", "entropy (nats/token)"),
                 ("reward_std", "reward std within groups"), ("completions/clipped_ratio", "answers cut at max length"))


def trl_stage(name: str, trainer: str, summary: str, example: str, what: str, data_formats: frozenset[str],
              panels: Panels = ONLINE_PANELS, online: bool = False, extra_checks: Any = None,
              memory: MemoryModel | None = None) -> Stage:
    """The declaration of a stage wrapping TRL's `<trainer>Trainer` (recipe keys: `<trainer>Config`'s own).

    Offline stages (DPO, KTO) train on the cards' answers, truncated at `data.max_length`; online ones (GRPO,
    RLOO) sample answers to the cards' prompts and score them with the recipe's `reward:` section. `memory`
    defaults to one trained policy: `estimate` does not count an online stage's reward model, a base of its own.
    """
    def run(recipe: Recipe) -> dict[str, Any]:
        trl = importlib.import_module("trl")
        trainer_class, config_class = getattr(trl, f"{trainer}Trainer"), getattr(trl, f"{trainer}Config")
        if online:
            return train_online(recipe, trainer_class, config_class)
        return train_policy(recipe, trainer_class, config_class, max_length=recipe.data.max_length)

    run.__doc__ = f"Train the {trainer} policy adapter from the SFT adapter and save it."
    return Stage(name=name, summary=summary, example=example, config_class=(f"trl.trainer.{name}_config",
                                                                            f"{trainer}Config"),
                 data_formats=data_formats, run=run,
                 presentation=Presentation(trainer, curves_headline(panels),
                                           curves_section(panels, f"{name}_training.png")),
                 sections={"reward": RewardSpec, "generation": GenerationSpec} if online else {},
                 extra_checks=extra_checks or (check_reward_spec if online else check_starts_from_sft),
                 model=ModelOutput(name, what), memory=memory or MemoryModel())
