"""PPO against the reward model, KL-anchored to the SFT policy: our actor-critic on transformers + peft.

    rlhf-pipeline ppo recipes/smollm2-135m/ppo.yaml
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml -m rlhf_pipeline ppo \\
        recipes/<model>/ppo.yaml training.kl_coef=0.1

Four roles, one copy of the base weights (ppo/roles.py): the reference is the SFT stage's adapter
(`model.name_or_path` = the SFT output), frozen, so the KL penalty always anchors to the SFT policy; the
policy is a trainable copy of it; the reward model is the rm stage's adapter and score head
(`training.reward_model_path`), frozen; the critic is a trainable copy of those. The saved policy adapter
is the whole PPO model on the base.

With a `reward:` section (reward_spec.py: preference RMs, rule RMs, functions and judges, combined as in
Sparrow) the answers are scored by its signals instead: each reward model is one more frozen adapter on the
same base, each signal is logged as `reward/<name>`, and the critic still starts from
`training.reward_model_path`.

The rollouts are sampled by the recipe's `generation:` engine (Hugging Face `generate` on the policy role, or vLLM
holding each step's policy as merged weights or an adapter: generation.py, docs/vllm.md); PPO's log-probs always
come from its own forward, and the engine's are only compared with them (`training.max_logprob_gap`).

Health monitors (`training.max_kl`, `min_entropy`, `max_length_drift`, `max_missing_eos_fraction`,
`max_reward_jump`; ppo/monitors.py) warn while training. With `early_stop_on_alert: true` the trainer saves
`checkpoint-N` at the alert and stops, and the stage still finishes, so the work is kept: the policy of
step N is saved as the stage's adapter, and metrics record `stopped_early: true` and `stop` (step, alerts,
checkpoint); downstream stages (eval) then measure that policy. To train on past the alert, delete
`stage.json` and re-run with the threshold changed: training resumes from `checkpoint-N`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from rlhf_pipeline.data.formats import FORMATS, SFT_FORMATS
from rlhf_pipeline.engines.spec import GenerationSpec, check_generation
from rlhf_pipeline.errors import PipelineError, RecipeError
from rlhf_pipeline.models import SCORER_STAGES
from rlhf_pipeline.process_reward import DENSE, PROCESS
from rlhf_pipeline.report.sections import ppo_headline, ppo_section, ppo_summary_note
from rlhf_pipeline.reward import CLASSIFICATION
from rlhf_pipeline.reward_spec import RewardSpec, check_reward, model_objective
from rlhf_pipeline.stages import MemoryModel, ModelOutput, Presentation, Stage

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch

    from rlhf_pipeline.chat import Messages
    from rlhf_pipeline.distributed import Launch
    from rlhf_pipeline.judges import AnswerKey
    from rlhf_pipeline.ppo.trainer import RewardFn
    from rlhf_pipeline.process_reward import ProcessRewardModel, StepScores
    from rlhf_pipeline.recipe import Recipe
    from rlhf_pipeline.reward_spec import Reward

    StepScorer = Callable[[list[Messages], list[list[int]], list[int]], StepScores]  # chats, prompt+answer ids, cuts


POLICY_STAGES = ("sft", "ppo", "dpo", "kto", "grpo", "rloo")  # stages whose output is a policy PPO can start from


def _check(recipe: Recipe) -> None:
    if not recipe.config.get("reward_model_path"):
        raise RecipeError(recipe.path, "training.reward_model_path", "required: the output folder of a finished "
                          "rm stage (e.g. outputs/<model>/rm)")
    if recipe.model.lora is None:
        raise RecipeError(recipe.path, "model.lora", "PPO trains a copy of the SFT adapter (or a new LoRA) beside the "
                          "frozen reference on one base; add a lora section")
    recipe.check_finished_stage("training.reward_model_path", recipe.config["reward_model_path"], SCORER_STAGES,
                                "not a reward model; point it at the rm stage's output_dir")
    if recipe.config.get("policy_init"):
        recipe.check_finished_stage("training.policy_init", recipe.config["policy_init"], POLICY_STAGES,
                                    "not a policy; point it at the output_dir of a policy stage "
                                    f"({', '.join(POLICY_STAGES)})")
    if model_objective(recipe.config["reward_model_path"]) == CLASSIFICATION:
        raise RecipeError(recipe.path, "training.reward_model_path", "a rule reward model (higher = more likely to "
                          "break its rule) cannot be PPO's reward or the critic's start; give the preference RM here "
                          "and the rule RM as a penalty in the reward: section")
    spec = recipe.sections["reward"]
    if model_objective(recipe.config["reward_model_path"]) == PROCESS and not spec.given:
        raise RecipeError(recipe.path, "reward", f"{recipe.config['reward_model_path']} is a process reward model "
                          "(a score per step): give it in a reward: section with its aggregate (dense: a reward at the "
                          "end of every step; min, product or last: one per answer); reward_model_path then only "
                          "starts the critic")
    if spec.given:
        check_reward(recipe, spec)
        if recipe.config.get("normalize_reward"):
            raise RecipeError(recipe.path, "training.normalize_reward", "with a reward: section each reward-model "
                              "signal is normalised by its own statistics (reward.signals.<name>.normalize); set "
                              "normalize_reward: false")
    if recipe.config.get("ptx_coef") and not recipe.data.ptx:
        raise RecipeError(recipe.path, "data.ptx", "training.ptx_coef > 0 mixes in the SFT loss of demonstrations "
                          "(PPO-ptx): list SFT-format cards here, or set ptx_coef to 0")
    if recipe.data.ptx and not recipe.config.get("ptx_coef"):
        raise RecipeError(recipe.path, "training.ptx_coef", "data.ptx lists demonstrations but ptx_coef is 0, so they "
                          "would not be used; set it > 0 (InstructGPT mixed them in), or remove data.ptx")
    check_generation(recipe)


PPO_LAUNCH_HINT = ("launch PPO with accelerate_configs/multi_gpu.yaml (DDP), deepspeed_zero2.yaml or "
                   "deepspeed_zero3.yaml (cpu_multi_process.yaml, deepspeed_zero2_cpu.yaml or "
                   "deepspeed_zero3_cpu.yaml on a machine without GPUs)")


# What PPO would need under FSDP2 (found by running it, with the refusal lifted, under accelerate's FSDP2 on two CPU
# processes; see docs/gpu.md, "FSDP"): it then trains, but unsharded, a full copy per process, as DDP would.
FSDP_MISSING = ("the four roles' shared base prepared by accelerate together with the optimizer, as FSDP2 requires "
                "(prepared alone, as now, it is silently left unsharded, a whole copy per process), with its decoder "
                "blocks named for wrapping; every shard gathered for each rollout's generate(), as "
                "ppo/sharding.py does for ZeRO-3; FSDP's own gradient reduction in place of PPO's per-step "
                "all-reduce; and checkpoints that gather and re-shard the adapters, value head and optimizer state")


def check_launch(recipe: Recipe, launch: Launch) -> None:
    """PPO under this launch: DDP or DeepSpeed (not FSDP), and batches that fill every process.

    Under ZeRO-3 the trainer gathers the sharded parameters once per generate call (ppo/sharding.py).
    """
    if launch.fsdp:
        raise PipelineError(f"{recipe.path}: this launch uses FSDP, which the ppo stage does not support; it lacks "
                            f"{FSDP_MISSING}; {PPO_LAUNCH_HINT}")
    if recipe.sections["generation"].uses_vllm and launch.world_size > 1:
        raise RecipeError(recipe.path, "generation.engine", f"PPO samples with vLLM in one process only (this launch "
                          f"has {launch.world_size}); launch one process, or set generation.engine: hf")
    config = recipe.settings
    per_process = config.rollout_batch_size
    global_batch = per_process * launch.world_size
    shape = f"{per_process} prompts per process x {launch.world_size} process(es)"
    if launch.world_size > 1 and config.total_episodes is not None and config.total_episodes % global_batch:
        steps = math.ceil(config.total_episodes / global_batch)
        raise RecipeError(recipe.path, "training.total_episodes",
                          f"{config.total_episodes} episodes do not divide into the global rollout batch of "
                          f"{global_batch} ({shape}): the run would train {steps * global_batch}; set "
                          f"total_episodes to a multiple of {global_batch} (e.g. {steps * global_batch}), or "
                          "change per_device_train_batch_size / gradient_accumulation_steps / num_mini_batches")
    available = count_prompt_rows(recipe)
    if available is not None and available < global_batch:
        raise RecipeError(recipe.path, "data.train",
                          f"at most {available} prompts, fewer than one global rollout batch of {global_batch} "
                          f"({shape}); add prompts, or lower per_device_train_batch_size / "
                          "gradient_accumulation_steps / num_mini_batches, or launch fewer processes")


def count_prompt_rows(recipe: Recipe) -> int | None:
    """Rows in the recipe's local JSON/JSONL train cards (an upper bound on the prompts PPO trains on); None if not
    cheap to know."""
    from rlhf_pipeline.data.cards import count_lines, file_suffixes
    from rlhf_pipeline.data.loading import cards_of, read_card_rows

    total = 0
    for card in cards_of(recipe, "train"):
        path = card.local_path()
        suffix = file_suffixes(path)[0] if path is not None else None
        if suffix not in (".json", ".jsonl"):
            return None
        total += count_lines(path) if suffix == ".jsonl" else len(read_card_rows(card)[0])
    return total


def run(recipe: Recipe) -> dict[str, Any]:
    """Train the policy and critic adapters and save the policy adapter with its statistics."""
    import dataclasses
    from functools import partial

    from rlhf_pipeline.chat import encode_prompt
    from rlhf_pipeline.data.loading import answer_key, load_datasets
    from rlhf_pipeline.distributed import say
    from rlhf_pipeline.generation import sampling_engine
    from rlhf_pipeline.models import load_tokenizer
    from rlhf_pipeline.outputs import require_finished
    from rlhf_pipeline.ppo.roles import POLICY, build_ppo_model, check_shared_base
    from rlhf_pipeline.ppo.trainer import PPOTrainer
    from rlhf_pipeline.reward_spec import build_reward, reward_models_from_roles
    from rlhf_pipeline.sources import resolve_source
    from rlhf_pipeline.stages.common import (
        Loaded,
        activation_checkpointing_default,
        finish,
        gathered_state_dict,
        require_same_tokenizer,
        start_training,
        train_resuming,
    )

    config = recipe.settings
    spec = recipe.sections["reward"]
    start_training(recipe)
    rm_manifest = require_finished(config.reward_model_path, SCORER_STAGES, "training.reward_model_path")
    reward_spec = dataclasses.replace(recipe.model, name_or_path=config.reward_model_path)
    source, reward_source = resolve_source(recipe.model, progress=say), resolve_source(reward_spec)
    check_shared_base(source, reward_source, config.reward_model_path)
    start = None  # the policy the trainable copy starts from, when not the reference
    if config.policy_init:
        start = resolve_source(dataclasses.replace(recipe.model, name_or_path=config.policy_init))
        check_shared_base(source, start, config.policy_init, "training.policy_init", "policy")
    signal_specs = {name: dataclasses.replace(recipe.model, name_or_path=folder)
                    for name, folder in spec.models().items()}
    signal_sources = {name: resolve_source(signal_spec) for name, signal_spec in signal_specs.items()}
    for name, signal_source in signal_sources.items():
        check_shared_base(source, signal_source, spec.models()[name], spec.signal_key(name))
    # Tokenizers first: a mismatch is reported before any weights load.
    tokenizer = load_tokenizer(source, recipe.model)
    require_same_tokenizer(recipe, "training.reward_model_path", reward_source, reward_spec, tokenizer)
    for name, signal_source in signal_sources.items():
        require_same_tokenizer(recipe, spec.signal_key(name), signal_source, signal_specs[name], tokenizer)
    stats = rm_manifest.extra.get("reward_stats", {})
    if config.normalize_reward and not {"mean", "std"} <= stats.keys():
        raise RecipeError(recipe.path, "training.normalize_reward", f"the rm stage in {config.reward_model_path} "
                          "recorded no reward statistics to normalise with; re-run that rm stage, or set "
                          "normalize_reward: false")
    reward_stats = (stats["mean"], stats["std"]) if config.normalize_reward else None
    # With reward signals (each normalised on its own) the critic still starts on the RM's normalised scale.
    critic_stats = (stats["mean"], stats["std"]) if spec.given and {"mean", "std"} <= stats.keys() else reward_stats
    say(f"loading {source.origin} once: reference, policy, reward model and critic are adapters on it")
    model = build_ppo_model(source, reward_source, recipe.model, tokenizer, critic_stats,
                            gradient_checkpointing=activation_checkpointing_default(recipe),
                            scorers={spec.role_of(name): s for name, s in signal_sources.items()}, policy_init=start)

    datasets, data_report = load_datasets(recipe, tokenizer, prompts_only=True)
    chats = [row["prompt"] for row in datasets["train"]]  # eval prompts (data.eval, data.eval_split) stay unseen
    prompts = [encode_prompt(tokenizer, chat) for chat in chats]
    say(f"ppo: {len(prompts)} prompts to train on ({data_report.summary()})")
    if spec.given:
        reward_models = reward_models_from_roles(spec, dict.fromkeys(spec.model_roles(), model), tokenizer)
        answers_known = answer_key(recipe)
        reward = build_reward(spec, reward_models, recipe.model, answers_known)
        say(f"ppo: reward = {', '.join(f'{name} ({s.use}, weight {s.weight:g})' for name, s in spec.by_name.items())}")
        dense = {name: (_step_scorer(reward_models.get(name), signal.function, answers_known, tokenizer), signal.weight)
                 for name, signal in spec.by_name.items() if signal.aggregate == DENSE}
        reward_fn = _signals_reward(reward, tokenizer, dict(zip(map(tuple, prompts), chats, strict=True)), dense)
    else:
        reward_fn = partial(_rm_scores, model)
    with sampling_engine(recipe.sections["generation"], model, tokenizer, config.local_rollout_forward_batch_size,
                         source.path) as engine:
        trainer = PPOTrainer(config, model, reward_fn, tokenizer, prompts, reward_stats=reward_stats,
                             ptx_loss=_demonstrations(recipe, tokenizer, data_report), engine=engine)
        final, record = train_resuming(trainer, recipe, data_report)
    history = [entry for entry in trainer.log_history if "objective/scores" in entry]
    alerts = [entry for entry in trainer.log_history if "alerts" in entry]
    metrics = {
        "final": final,
        "first": history[0] if history else {},
        "stopped_early": trainer.stopped_early,
        "stop": ({"step": trainer.global_step, "alerts": alerts[-1]["alerts"],
                  "checkpoint": str(recipe.output_dir / f"checkpoint-{trainer.global_step}")}
                 if trainer.stopped_early else None),
        "alerts": alerts,
        "reward_model": str(config.reward_model_path),
        **record,
    }
    say(f"ppo: mean score {metrics['first'].get('objective/scores', float('nan')):.3f} -> "
        f"{final.get('objective/scores', float('nan')):.3f}, KL {final.get('objective/kl', float('nan')):.3f}")
    if trainer.stopped_early:
        say(f"ppo: stopped early at step {trainer.global_step} of {trainer.total_steps} on a health alert; the "
            "policy of that step is saved as the stage's adapter (see report.md)")
    policy_state = gathered_state_dict(model.model)  # under ZeRO-3 the whole trained tensors (every rank calls it)
    finish(recipe, Loaded(start or source, tokenizer, model), model, metrics,
           extra={"reward_model": str(config.reward_model_path), "reference": source.adapter or source.path},
           save_weights=partial(model.save_adapter, POLICY, state_dict=policy_state))
    return metrics


def _rm_scores(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               prompt_lengths: torch.Tensor) -> torch.Tensor:
    """The reward model role's score of each prompt+answer row."""
    from rlhf_pipeline.ppo.roles import REWARD

    return model.last_scores(REWARD, input_ids, attention_mask)


def _step_scorer(prm: ProcessRewardModel | None, verifier: str | None, answers_known: AnswerKey,
                 tokenizer: Any) -> StepScorer:
    """Where each step of a sampled answer ends and its P(right): a PRM reads the ids, a step verifier the decoded
    answer (its verdicts, 1 or 0, paired in order with the step ends found on the ids)."""
    from rlhf_pipeline.reward_spec import step_verdicts
    from rlhf_pipeline.steps import step_end_positions

    if prm is not None:
        return lambda chats, rows, cuts: prm.step_scores(rows, cuts)
    verdicts = step_verdicts(str(verifier), answers_known)

    def scores(chats: list[Messages], rows: list[list[int]], cuts: list[int]) -> StepScores:
        answers = [row[cut:] for row, cut in zip(rows, cuts, strict=True)]
        texts = [tokenizer.decode(answer, skip_special_tokens=True) for answer in answers]
        return [(step_end_positions(tokenizer, answer), steps)
                for answer, steps in zip(answers, verdicts(chats, texts), strict=True)]

    return scores


def _signals_reward(reward: Reward, tokenizer: Any, chats: dict[tuple[int, ...], Messages],
                    dense: dict[str, tuple[StepScorer, float]]) -> RewardFn:
    """The recipe's reward signals on PPO's rows: reward models score the sampled ids as they are, functions and
    judges the prompt's chat and the decoded answer; the combined reward is the score, each signal is logged.
    A `dense` process reward model or step verifier (weight w) adds w·log P(step right) on the token that ends
    each step."""
    import torch

    from rlhf_pipeline.ppo.experience import STEP_REWARDS
    from rlhf_pipeline.process_reward import step_log_reward

    def score(input_ids: torch.Tensor, attention_mask: torch.Tensor,
              prompt_lengths: torch.Tensor) -> dict[str, torch.Tensor]:
        rows = [row[:length] for row, length in zip(input_ids.tolist(), attention_mask.sum(dim=1).tolist(),
                                                     strict=True)]
        cuts = prompt_lengths.tolist()
        prompts = [chats[tuple(row[:cut])] for row, cut in zip(rows, cuts, strict=True)]
        answers = [tokenizer.decode(row[cut:], skip_special_tokens=True) for row, cut in zip(rows, cuts, strict=True)]
        signals = reward.signal_scores(prompts, answers, rows)
        out = {"score": torch.tensor(reward.combine(signals))} | {
            name: torch.tensor(values) for name, values in signals.items()}
        if dense:
            steps = torch.zeros(len(rows), max(len(row) - cut for row, cut in zip(rows, cuts, strict=True)))
            for step_scores, weight in dense.values():
                for index, (ends, probabilities) in enumerate(step_scores(prompts, rows, cuts)):
                    for end, probability in zip(ends, probabilities, strict=True):
                        steps[index, end] += weight * step_log_reward(probability)
            out[STEP_REWARDS] = steps
        return out

    return score


def _demonstrations(recipe: Recipe, tokenizer: Any, report: Any) -> Any:
    """PPO-ptx's loss on the recipe's `data.ptx` demonstrations (ppo/ptx.py), or None without them."""
    from rlhf_pipeline.chat import answer_text, encode_answer, encode_prompt
    from rlhf_pipeline.data.loading import load_rows
    from rlhf_pipeline.distributed import process_state, say
    from rlhf_pipeline.ppo.ptx import Demonstration, Demonstrations

    if not recipe.data.ptx:
        return None
    rows = load_rows(recipe, "ptx", tokenizer, report)
    if not rows:
        raise PipelineError(f"{recipe.path}: data.ptx: no usable demonstrations ({report.summary()})")
    say(f"ppo: {len(rows)} demonstrations for PPO-ptx (ptx_coef {recipe.settings.ptx_coef})")
    state = process_state()
    examples = [Demonstration(encode_prompt(tokenizer, row["prompt"]),
                              encode_answer(tokenizer, answer_text(row["completion"]))) for row in rows]
    demonstrations = Demonstrations(
        examples, recipe.settings.micro_batch_size, tokenizer.pad_token_id, recipe.settings.seed, state.process_index,
        state.num_processes)
    return demonstrations.loss


STAGE = Stage(
    name="ppo",
    summary="PPO of the SFT policy against the reward model, KL-anchored to the SFT policy",
    example="rlhf-pipeline ppo recipes/smollm2-135m/ppo.yaml training.kl_coef=0.1",
    config_class=("rlhf_pipeline.ppo.config", "PPOConfig"),
    data_formats=frozenset(FORMATS),
    sections={"reward": RewardSpec, "generation": GenerationSpec},
    extra_checks=_check,
    run=run,
    presentation=Presentation("PPO", ppo_headline, ppo_section, summary_note=ppo_summary_note),
    model=ModelOutput("ppo", "PPO policy, trained against the reward model and KL-anchored to the SFT policy"),
    memory=MemoryModel(kind="ppo"),
    launch_checks=check_launch,
    extra_data={"ptx": frozenset(SFT_FORMATS)},
)
