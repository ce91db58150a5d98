"""`PPOTrainer`: actor-critic PPO for RLHF on torch, transformers, accelerate and peft (no TRL trainer).

One PPO step, as in InstructGPT and the Fudan "Secrets of RLHF" write-up:

1. **Rollout** (no gradients): sample a response per prompt from π at `temperature`; cut it after the
   first stop token; compute log π, log π_ref, the critic's values and the reward of prompt + response.
2. **Rewards and advantages**: r_t = −β·KL_t on every token plus the score on the last one; GAE(γ,λ);
   advantages whitened over the valid tokens.
3. **Optimisation**: `num_ppo_epochs` passes over the rollout in `num_mini_batches` shuffled
   minibatches, each one AdamW step on clipped-surrogate + vf_coef·clipped-value loss.

The model is a `SharedBase` holding the roles of ppo/roles.py on one base: `policy` and `reference`
(language-model roles) and `critic` (a scorer with a value head), switched per pass. Each role's
backward runs while that role is active, so activation checkpointing recomputes with the right adapter;
the policy's backward also frees its activations before the critic's forward. Checkpoints: ppo/checkpoints.py.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, get_scheduler
from trl.trainer.utils import entropy_from_logits, selective_log_softmax

from rlhf_pipeline.adapters import SharedBase
from rlhf_pipeline.chat import pad_batch
from rlhf_pipeline.distributed import process_state, say
from rlhf_pipeline.engines.base import SamplingSettings
from rlhf_pipeline.engines.hf import HFEngine
from rlhf_pipeline.outputs import CHECKPOINT_PREFIX, last_checkpoint
from rlhf_pipeline.ppo import checkpoints, sharding
from rlhf_pipeline.ppo.config import PPOConfig
from rlhf_pipeline.ppo.experience import (
    PromptSchedule,
    Rollout,
    chunks,
    decoded_samples,
    mean_over_processes,
    response_logits,
    response_values,
    rollout_statistics,
    score_responses,
    shape_scores,
    stop_token_ids,
    sum_over_processes,
    truncate_after_stop,
)
from rlhf_pipeline.ppo.formulas import (
    adaptive_kl_coef,
    gae_advantages_and_returns,
    kl_penalty,
    masked_whiten,
    token_rewards,
)
from rlhf_pipeline.ppo.monitors import check_health
from rlhf_pipeline.ppo.roles import CRITIC, POLICY, REFERENCE, check_roles, disable_dropout
from rlhf_pipeline.ppo.update import PolicyCriticUpdate, PtxLoss
from rlhf_pipeline.resources import record_sampling
from rlhf_pipeline.stopping import requested_signal

logger = logging.getLogger(__name__)

# (right-padded prompt+response ids, attention mask, prompt lengths) -> a score per row, or {"score": ..., signal: ...}
RewardFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor | Mapping[str, torch.Tensor]]
LogCallback = Callable[[dict[str, Any]], None]


class PPOTrainer:
    """Rollout + PPO optimisation of the policy and critic roles of a `SharedBase`, with exact resume.

    `model` holds the roles `policy` (trainable), `reference` (frozen) and `critic` (trainable, with a value
    head); ppo/roles.py builds it from the SFT and reward-model stages. `reward_fn(input_ids,
    attention_mask, prompt_lengths)` scores right-padded prompt+response rows, one scalar each (or a mapping
    with the scores under "score" beside each reward signal's values, which are logged as `reward/<name>`).
    `train_prompts` are token ids of templated prompts. `engine` samples the rollouts (generation.py; Hugging
    Face `generate` on the policy role by default): it is handed the policy of each step before sampling, and only
    proposes the answers, whose log-probs PPO computes itself. An engine that reports its own log-probs (vLLM) is
    watched: `generation/logprob_gap` is their mean |difference| per response token (monitor `max_logprob_gap`).
    """

    def __init__(
        self,
        config: PPOConfig,
        model: SharedBase,
        reward_fn: RewardFn,
        tokenizer: PreTrainedTokenizerBase,
        train_prompts: Sequence[Sequence[int]],
        reward_stats: tuple[float, float] | None = None,
        on_log: LogCallback | None = None,
        ptx_loss: PtxLoss | None = None,
        engine: Any = None,
    ) -> None:
        check_roles(model)
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs a pad token (distinct from EOS) to batch prompts")
        if config.normalize_reward and reward_stats is None:
            raise ValueError("normalize_reward is true but no reward_stats (mean, std) were given")
        self.config = config
        self.tokenizer = tokenizer
        self.reward_fn = reward_fn
        self.reward_stats = reward_stats
        self.on_log = on_log
        process_state()
        self.accelerator = Accelerator(log_with=config.report_to or None, project_dir=config.output_dir)
        self.schedule = PromptSchedule.build(train_prompts, config, self.accelerator.num_processes,
                                             self.accelerator.process_index)
        self.stop_token_ids = stop_token_ids(config, tokenizer)
        self.engine = engine or HFEngine(tokenizer.pad_token_id, config.local_rollout_forward_batch_size)
        disable_dropout(model)
        self.role_params = {role: model.role_parameters(role) for role in (POLICY, CRITIC)}
        self.trainable_params = [p for params in self.role_params.values() for p in params]
        optimizer = torch.optim.AdamW(
            [{"params": self.role_params[POLICY]},
             {"params": self.role_params[CRITIC], "lr": config.critic_learning_rate or config.learning_rate}],
            lr=config.learning_rate, weight_decay=config.weight_decay)
        self.total_steps = self.schedule.total_steps(config)
        self.lr_scheduler = get_scheduler(
            config.lr_scheduler_type, optimizer, num_warmup_steps=math.ceil(config.warmup_ratio * self.total_steps),
            num_training_steps=self.total_steps,
        )
        self.deepspeed = self.accelerator.state.deepspeed_plugin is not None
        if self.deepspeed:
            self._fill_deepspeed_config()
            self.model, self.optimizer = sharding.prepare_deepspeed(self.accelerator, model, optimizer)
        else:  # gradients are averaged over processes once per optimizer step, after both roles' backward
            self.model = self.accelerator.prepare_model(model, evaluation_mode=True)
            self.optimizer = self.accelerator.prepare_optimizer(optimizer)
        self.shared: SharedBase = self.accelerator.unwrap_model(self.model)
        self.sum_over_processes = sum_over_processes(self.accelerator)
        self.update = PolicyCriticUpdate(config, self.model, self.optimizer, self.accelerator, self.trainable_params,
                                         self.deepspeed, ptx_loss)
        self.global_step = 0
        self.kl_coef = config.kl_coef  # adapted per step with adap_kl_ctrl
        self.log_history: list[dict[str, Any]] = []
        self.stopped_early = False
        self.last_sync_seconds = 0.0

    def _fill_deepspeed_config(self) -> None:
        """Give DeepSpeed's "auto" batch and clipping values from this config (the Trainer does this for SFT/RM).

        Each micro-batch makes two backward passes, the policy's and the critic's, and DeepSpeed counts every
        backward as a micro-step: its accumulation (and the batch size it books) is twice the recipe's, and
        `_backward` doubles each loss back, so gradients equal DDP's. The learning-rate schedule stays ours.
        """
        plugin = self.accelerator.state.deepspeed_plugin
        cfg = self.config
        values = {"train_micro_batch_size_per_gpu": cfg.micro_batch_size,
                  "gradient_accumulation_steps": 2 * cfg.gradient_accumulation_steps,
                  "train_batch_size": 2 * cfg.mini_batch_size * self.accelerator.num_processes,
                  "gradient_clipping": cfg.max_grad_norm or 0.0}
        for key, value in values.items():
            if key == "gradient_clipping" and plugin.deepspeed_config.get(key, "auto") != "auto":
                continue
            plugin.deepspeed_config[key] = value
        self.accelerator.gradient_accumulation_steps = 2 * cfg.gradient_accumulation_steps

    # ------------------------------------------------------------------ data

    @property
    def global_batch_size(self) -> int:
        """Prompts consumed per PPO step over all processes."""
        return self.schedule.global_batch_size

    # --------------------------------------------------------------- rollout

    @torch.no_grad()
    def rollout(self, prompts: Sequence[Sequence[int]]) -> Rollout:
        """Sample responses and compute everything PPO needs about them (log-probs, values, rewards, advantages)."""
        cfg, device, shared = self.config, self.accelerator.device, self.shared
        shared.eval()
        queries, query_mask = (t.to(device) for t in pad_batch(prompts, self.tokenizer.pad_token_id, "left"))
        started = time.perf_counter()
        responses, engine_logprobs = (t if t is None else t.to(device) for t in self._generate(prompts))
        sampled = time.perf_counter()
        response_mask, has_stop = truncate_after_stop(responses, self.stop_token_ids)
        responses = responses.masked_fill(~response_mask, self.tokenizer.pad_token_id)
        input_ids = torch.cat([queries, responses], dim=1)
        attention_mask = torch.cat([query_mask, response_mask.long()], dim=1)
        context_length = queries.shape[1]

        parts: dict[str, list[torch.Tensor]] = defaultdict(list)
        for rows in chunks(len(prompts), cfg.local_rollout_forward_batch_size):
            ids, mask = input_ids[rows], attention_mask[rows]
            labels = ids[:, context_length:]
            with self.accelerator.autocast():
                for role, name in ((POLICY, "logprobs"), (REFERENCE, "ref_logprobs")):
                    logits = response_logits(shared, role, ids, mask, context_length).float().div_(cfg.temperature)
                    parts[name].append(selective_log_softmax(logits, labels))
                    if role == POLICY:
                        parts["entropy"].append(entropy_from_logits(logits))
                    del logits  # one role's response logits in memory at a time
                parts["values"].append(response_values(shared, ids, mask, context_length))
        logprobs, ref_logprobs, entropy, values = (torch.cat(parts[name]).float() for name in
                                                   ("logprobs", "ref_logprobs", "entropy", "values"))
        gap = None
        if engine_logprobs is not None:  # the engine's log-probs of the same tokens, beside PPO's own
            differences = (engine_logprobs.to(device) - logprobs).abs() * response_mask
            gap = differences.sum() / response_mask.sum().clamp(min=1)

        raw_scores, signals = score_responses(self.reward_fn, queries, query_mask, responses, response_mask,
                                     self.tokenizer.pad_token_id, cfg.local_rollout_forward_batch_size)
        scores = shape_scores(raw_scores, has_stop, cfg, self.reward_stats)
        kl = kl_penalty(logprobs, ref_logprobs, cfg.kl_estimator).masked_fill(~response_mask, 0.0)
        rewards = token_rewards(scores, kl, response_mask, self.kl_coef)
        total = self.sum_over_processes  # every process's statistics: the update does not depend on the launch
        if cfg.whiten_rewards:
            rewards = masked_whiten(rewards, response_mask, shift_mean=False, sum_over_processes=total)
        advantages, returns = gae_advantages_and_returns(rewards, values, response_mask, cfg.gamma, cfg.lam)
        advantages = masked_whiten(advantages, response_mask, sum_over_processes=total)
        rollout = Rollout(input_ids, attention_mask, context_length, response_mask, has_stop, logprobs, ref_logprobs,
                          entropy, values.masked_fill(~response_mask, 0.0), raw_scores, scores, kl, rewards,
                          advantages, returns, signals)
        rollout.timings = {"time/sampling": sampled - started - self.last_sync_seconds,
                           "time/sync": self.last_sync_seconds, "time/scoring": time.perf_counter() - sampled}
        if gap is not None:
            rollout.timings["generation/logprob_gap"] = gap.item()
        return rollout

    def _generate(self, prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The policy's answers as right-padded ids (and the engine's log-probs of them, when it gives them).

        The engine is handed this step's policy first (a vLLM engine syncs only then). Hugging Face samples from
        torch's generator, which checkpoints restore, so a resumed run samples what the uninterrupted one did.
        """
        syncs_before = self.engine.stats.sync_seconds
        self.engine.use(self.shared, POLICY, self.global_step)
        self.last_sync_seconds = self.engine.stats.sync_seconds - syncs_before
        settings = SamplingSettings(self.config.response_length, self.config.temperature, 1.0, self.config.seed,
                                    tuple(self.stop_token_ids))
        with sharding.whole_parameters(self.model):  # ZeRO-3: gathered once for all chunks, not per token
            completions = [group[0] for group in self.engine.generate(prompts, 1, settings)]
        record_sampling(self.engine.stats.as_dict())
        width = max(1, *(len(c.token_ids) for c in completions))
        pad = self.tokenizer.pad_token_id
        responses = torch.tensor([c.token_ids + [pad] * (width - len(c.token_ids)) for c in completions])
        if any(c.logprobs is None for c in completions):
            return responses, None
        return responses, torch.tensor([c.logprobs + [0.0] * (width - len(c.logprobs)) for c in completions])

    # ---------------------------------------------------------- optimisation

    def ppo_update(self, rollout: Rollout) -> dict[str, float]:
        """The policy and critic's update on a rollout (ppo/update.py); the critic alone during its warm-up."""
        return self.update(rollout, train_policy=self.global_step >= self.config.critic_warmup_steps,
                           step=self.global_step)

    # -------------------------------------------------------------- training

    def train(self, resume_from_checkpoint: str | os.PathLike[str] | bool | None = None) -> dict[str, Any]:
        """Run PPO to `total_steps`; resume from a checkpoint folder (or the newest one when True).

        Returns the metrics of the last step. With `early_stop_on_alert`, a health alert (ppo/monitors.py)
        saves a checkpoint of that step and ends the run there (`stopped_early` is then True); so does a
        SIGTERM or SIGINT (rlhf_pipeline/stopping.py), for the caller to end the stage.
        """
        set_seed(self.config.seed, device_specific=True)
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_checkpoint(self.config.output_dir)
        if resume_from_checkpoint:
            self.load_checkpoint(Path(resume_from_checkpoint))
            logger.info("PPO: resumed from %s at step %d", resume_from_checkpoint, self.global_step)
        if self.config.report_to:
            self.accelerator.init_trackers("rlhf_pipeline_ppo", config=self.config.tracker_values())
        sample_every = (max(1, self.total_steps // self.config.num_sample_generations)
                        if self.config.num_sample_generations else 0)
        progress = tqdm(total=self.total_steps, initial=self.global_step, desc="PPO",
                        disable=self.config.disable_tqdm or not self.accelerator.is_main_process)
        window: list[dict[str, float]] = []
        metrics: dict[str, Any] = {}
        while self.global_step < self.total_steps:
            step = self.global_step + 1
            rollout = self.rollout(self.schedule.prompts_for_step(step))
            lr = self.lr_scheduler.get_last_lr()[0]
            started = time.perf_counter()
            update_stats = self.ppo_update(rollout) | rollout.timings
            update_stats["time/optimisation"] = time.perf_counter() - started
            self.lr_scheduler.step()
            self.global_step = step
            step_stats = rollout_statistics(rollout, self.kl_coef, self.accelerator, self.sum_over_processes)
            window.append({**step_stats, **mean_over_processes(self.accelerator, update_stats), "lr": lr})
            if self.config.adap_kl_ctrl:  # from this step's KL of the whole batch: the same on every rank
                self.kl_coef = adaptive_kl_coef(self.kl_coef, step_stats["objective/kl"], self.config.target,
                                                self.config.horizon, self.global_batch_size)
            alerts: list[dict[str, Any]] = []
            if step % self.config.logging_steps == 0 or step == self.total_steps:
                metrics = self._log(window)
                window = []
                progress.set_postfix(score=f"{metrics['objective/scores']:.3f}", kl=f"{metrics['objective/kl']:.3f}")
                alerts = self._check_health(metrics)
            if sample_every and step % sample_every == 0:
                self.log_history.append({"step": step, "samples": decoded_samples(rollout, self.tokenizer)})
            stopping = bool(alerts) and self.config.early_stop_on_alert
            signalled = requested_signal() is not None  # agreed by all ranks, like the reduced metrics
            if step % self.config.save_steps == 0 or stopping or signalled:
                self.save_checkpoint()
            progress.update(1)
            if signalled:
                break
            if stopping:  # every rank sees the same reduced metrics, so all ranks stop at the same step
                self.stopped_early = True
                self._warn(f"PPO: stopped early at step {step} (early_stop_on_alert); checkpoint saved in "
                           f"{Path(self.config.output_dir) / f'{CHECKPOINT_PREFIX}{step}'}")
                break
        progress.close()
        if self.config.report_to:
            self.accelerator.end_training()
        return metrics

    def _log(self, window: list[dict[str, float]]) -> dict[str, Any]:
        """Average the steps since the last log; record, report to trackers and call `on_log`."""
        names = dict.fromkeys(name for entry in window for name in entry)  # critic warm-up steps have fewer
        logs: dict[str, Any] = {name: sum(values) / len(values)
                                for name in names for values in [[m[name] for m in window if name in m]]}
        logs.update(episode=self.global_step * self.global_batch_size, step=self.global_step)
        self.log_history.append(logs)
        if self.config.report_to:
            self.accelerator.log(logs, step=self.global_step)
        if self.on_log is not None and self.accelerator.is_main_process:
            self.on_log(dict(logs))
        return logs

    def _check_health(self, logs: dict[str, Any]) -> list[dict[str, Any]]:
        """Run the health monitors on a new log entry; alerts go to the log history, trackers and the console."""
        earlier = [e for e in self.log_history if "objective/scores" in e and e["step"] < logs["step"]]
        alerts = check_health(self.config, logs, earlier)
        if alerts:
            self.log_history.append({"step": logs["step"], "alerts": alerts})
            if self.config.report_to:
                self.accelerator.log({"health/alerts": len(alerts)}, step=logs["step"])
            for alert in alerts:
                self._warn(f"PPO health alert at step {logs['step']}: {alert['message']}")
        return alerts

    def _warn(self, message: str) -> None:
        """A warning on the main process: through logging, and printed unless logging already prints it
        (with no handler configured, Python's last-resort handler writes warnings to stderr)."""
        if not self.accelerator.is_main_process:
            return
        logger.warning(message)
        if logger.hasHandlers():
            say(message)

    # ------------------------------------------------------------ persistence

    def save_checkpoint(self) -> Path:
        """Write checkpoint-<step>/ through a scratch folder (ppo/checkpoints.py). Every rank calls this."""
        accelerator, config = self.accelerator, self.config
        final = Path(config.output_dir) / f"{CHECKPOINT_PREFIX}{self.global_step}"
        rng_states = gather_object([checkpoints.rng_state()])  # a collective: every rank's streams, saved by rank 0
        staging = final.with_name(f".tmp-{final.name}")
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        if self.deepspeed:
            accelerator.wait_for_everyone()
            self.model.save_checkpoint(str(staging / checkpoints.DEEPSPEED_STATE), tag="state",
                                       exclude_frozen_parameters=True)
        with sharding.gathered(self.trainable_params):  # ZeRO-3: whole tensors for rank 0 to write
            if accelerator.is_main_process:
                try:
                    self._write_checkpoint(staging, rng_states)
                except BaseException:  # e.g. a full disk: no half-written folder stays beside the complete ones
                    shutil.rmtree(staging, ignore_errors=True)
                    raise
                checkpoints.commit(staging, final, config.save_total_limit)
        accelerator.wait_for_everyone()
        return final

    def _write_checkpoint(self, staging: Path, rng_states: list[dict[str, Any]]) -> None:
        checkpoints.save_weights(self.shared, staging)
        if not self.deepspeed:
            torch.save(self.optimizer.state_dict(), staging / "optimizer.pt")
        torch.save(self.lr_scheduler.state_dict(), staging / "scheduler.pt")
        for rank, state in enumerate(rng_states):
            torch.save(state, staging / f"rng_state_{rank}.pth")
        epoch, index = self.schedule.position(self.global_step + 1)
        checkpoints.write_state(staging, {
            "global_step": self.global_step, "episode": self.global_step * self.global_batch_size,
            "data_epoch": epoch, "data_batch_index": index, "world_size": self.accelerator.num_processes,
            "global_batch_size": self.global_batch_size, "total_steps": self.total_steps, "kl_coef": self.kl_coef,
            "log_history": self.log_history})

    def load_checkpoint(self, folder: Path) -> None:
        """Restore adapters, head, optimizer, scheduler, step, log history and this process's RNG streams."""
        state = checkpoints.read_state(folder)
        launch = (state["world_size"], state["global_batch_size"])
        if launch != (self.accelerator.num_processes, self.global_batch_size):
            raise ValueError(f"{folder} was written by {state['world_size']} process(es) with global batch "
                             f"{state['global_batch_size']}; resume with the same launch and batch settings")
        checkpoints.load_weights(self.shared, folder)
        if self.deepspeed:
            self.model.load_checkpoint(str(folder / checkpoints.DEEPSPEED_STATE), tag="state", load_module_strict=False,
                                       load_optimizer_states=True, load_lr_scheduler_states=False)
        else:
            self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))
        self.lr_scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
        checkpoints.set_rng_state(torch.load(folder / f"rng_state_{self.accelerator.process_index}.pth",
                                             weights_only=True))
        self.global_step = state["global_step"]
        self.kl_coef = state.get("kl_coef", self.config.kl_coef)  # adapted by adap_kl_ctrl
        self.log_history = state["log_history"]
