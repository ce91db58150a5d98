"""One PPO update of the policy and critic roles: epochs of shuffled minibatch steps over a rollout.

Per micro-batch, the policy's loss (clipped surrogate, minus the entropy bonus, plus PPO-ptx's SFT loss)
is back-propagated while the policy adapter is active, then the critic's clipped value loss while the
critic's is: activation checkpointing then recomputes each role with its own adapter, and one role's
activations are alive at a time. Gradients are averaged over processes once per optimizer step.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from trl.trainer.utils import entropy_from_logits, selective_log_softmax

from rlhf_pipeline.ppo.config import PPOConfig
from rlhf_pipeline.ppo.experience import Rollout, mean_over_processes, response_logits, response_values
from rlhf_pipeline.ppo.formulas import masked_mean, policy_loss, value_loss
from rlhf_pipeline.ppo.roles import POLICY

PtxLoss = Callable[[torch.nn.Module, int], torch.Tensor]  # the policy's SFT loss on micro-batch `position`


@dataclass
class PolicyCriticUpdate:
    """The optimisation half of PPO, on a model and optimizer the trainer has prepared with accelerate."""

    config: PPOConfig
    model: Any
    optimizer: Any
    accelerator: Any
    trainable_params: list[torch.nn.Parameter]
    deepspeed: bool
    ptx_loss: PtxLoss | None = None
    _ptx_position: int = 0  # which demonstrations the next policy micro-batch mixes in

    def __post_init__(self) -> None:
        if self.config.ptx_coef and self.ptx_loss is None:
            raise ValueError("ptx_coef is > 0 but no demonstrations were given for PPO-ptx")

    def __call__(self, rollout: Rollout, train_policy: bool = True, step: int = 0) -> dict[str, float]:
        """num_ppo_epochs passes of minibatch AdamW steps; the mean of each statistic over micro-batches.

        `train_policy=False` (critic warm-up) trains the critic only. With `early_stopping` the update ends
        after the first minibatch whose approximate KL, averaged over processes, exceeds 1.5 × target_kl;
        `policy/early_stopped` is the share of the planned minibatch steps that were skipped.
        """
        cfg = self.config
        self.model.train()
        stats: dict[str, list[torch.Tensor]] = defaultdict(list)
        planned, done, stopped = cfg.num_ppo_epochs * math.ceil(len(rollout) / cfg.mini_batch_size), 0, False
        self._ptx_position = step * cfg.num_ppo_epochs * math.ceil(len(rollout) / cfg.micro_batch_size)
        for _ in range(cfg.num_ppo_epochs):
            order = torch.randperm(len(rollout)).to(self.accelerator.device)
            for minibatch in order.split(cfg.mini_batch_size):
                micro_batches = minibatch.split(cfg.micro_batch_size)
                for index, rows in enumerate(micro_batches):
                    micro_stats = self.train_micro_batch(rollout.select(rows), last=index == len(micro_batches) - 1,
                                                         train_policy=train_policy)
                    for name, value in micro_stats.items():
                        stats[name].append(value)
                self._optimizer_step()
                done += 1
                stopped = cfg.early_stopping and train_policy and self._kl_over_target(stats, len(micro_batches))
                if stopped:
                    break
            if stopped:
                break
        stats["policy/early_stopped"] = [torch.tensor(1.0 - done / planned)]
        return {name: torch.stack(values).float().mean().item() for name, values in stats.items()}

    def train_micro_batch(self, batch: Rollout, last: bool, train_policy: bool = True) -> dict[str, torch.Tensor]:
        """The policy's loss and backward, then the critic's: each backward while its own adapter is active."""
        cfg = self.config
        stats: dict[str, torch.Tensor] = {}
        if train_policy:
            logits = response_logits(self.model, POLICY, batch.input_ids, batch.attention_mask,
                                     batch.context_length).float() / cfg.temperature  # as in the rollout
            pg_loss, clipfrac, approxkl = policy_loss(selective_log_softmax(logits, batch.responses), batch.logprobs,
                                                      batch.advantages, batch.response_mask, cfg.cliprange)
            loss = pg_loss
            if cfg.entropy_coef:
                entropy = masked_mean(entropy_from_logits(logits), batch.response_mask)
                loss = loss - cfg.entropy_coef * entropy
                stats["policy/entropy_bonus"] = entropy.detach()
            del logits
            if cfg.ptx_coef:
                ptx = self.ptx_loss(self.model, self._ptx_position)
                self._ptx_position += 1
                loss = loss + cfg.ptx_coef * ptx
                stats["loss/ptx"] = ptx.detach()
            self._backward(loss, last=False)
            stats.update({"policy/clipfrac": clipfrac, "policy/approxkl": approxkl, "loss/policy": pg_loss.detach()})
        values = response_values(self.model, batch.input_ids, batch.attention_mask, batch.context_length)
        vf_loss, vf_clipfrac = value_loss(values, batch.values, batch.returns, batch.response_mask,
                                          cfg.cliprange_value)
        self._backward(cfg.vf_coef * vf_loss, last=last)
        return {**stats, "loss/value": vf_loss.detach(), "val/clipfrac": vf_clipfrac}

    def _kl_over_target(self, stats: dict[str, list[torch.Tensor]], micro_batches: int) -> bool:
        """Whether the last minibatch's approximate KL, averaged over processes, is past 1.5 × target_kl."""
        kl = torch.stack(stats["policy/approxkl"][-micro_batches:]).mean().item()
        return mean_over_processes(self.accelerator, {"kl": kl})["kl"] > 1.5 * self.config.target_kl

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        """Back-propagate one role's loss, averaged over the minibatch's micro-batches.

        Under DeepSpeed every backward is one of its micro-steps (the trainer books twice the accumulation):
        the engine divides by that, so the loss is doubled, and at the minibatch's last backward it reduces,
        clips and steps. A critic-only step makes one backward per micro-batch, which is fine: the boundary
        is set explicitly.
        """
        if self.deepspeed:
            self.model.set_gradient_accumulation_boundary(last)
            self.model.backward(2 * loss)
            self.model.step()
        else:  # accelerate's backward applies fp16 loss scaling; the model is not DDP-wrapped
            self.accelerator.backward(loss / self.config.gradient_accumulation_steps)

    def _optimizer_step(self) -> None:
        """Average, clip and apply the minibatch's gradients (DeepSpeed did so inside its last backward)."""
        if self.deepspeed:
            return
        self._average_gradients()
        if self.config.max_grad_norm is not None:  # accelerate unscales fp16 gradients first
            self.accelerator.clip_grad_norm_(self.trainable_params, self.config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _average_gradients(self) -> None:
        """Mean of the gradients over processes: one all-reduce per optimizer step, as DDP would do.

        Parameters without a gradient (the policy's during critic warm-up, the same on every rank) are left
        without one, so AdamW leaves them, their moments and their weight decay alone.
        """
        if self.accelerator.num_processes == 1:
            return
        params = [p for p in self.trainable_params if p.grad is not None]
        grads = [p.grad for p in params]
        flat = self.accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")
        for param, chunk in zip(params, flat.split([g.numel() for g in grads]), strict=True):
            param.grad = chunk.view_as(param).to(param.dtype)  # a bf16 modules_to_save copy beside fp32 LoRA
