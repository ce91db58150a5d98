"""PPO's four roles on one base: reference, policy, reward model and critic as adapters, plus two heads.

- reference: the SFT stage's adapter, frozen (the bare base when the policy starts from a model without one);
- policy: a trainable copy of that adapter (a new LoRA from the recipe when there is none), so the saved
  policy adapter is the whole PPO model on the base; or, with `training.policy_init`, a copy of another finished
  policy's adapter (iterated RLHF: round k's policy starts from round k−1's, the SFT adapter stays the reference);
- reward: the rm stage's adapter with its score head, frozen;
- critic: a trainable copy of both; its head outputs (score − mean)/std when PPO normalises rewards, so
  values start on the scale of the returns they learn.

The base is in memory once, whatever its precision; the roles differ only by which adapter is active.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from rlhf_pipeline.adapters import SharedBase, score_head
from rlhf_pipeline.errors import PipelineError
from rlhf_pipeline.models import (
    CAUSAL_LM,
    check_continued_lora,
    load_base,
    lora_config,
    prepare_base,
)
from rlhf_pipeline.sources import ModelSource

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from rlhf_pipeline.recipe import ModelSpec

POLICY, REFERENCE, REWARD, CRITIC = "policy", "reference", "reward", "critic"


def check_shared_base(policy: ModelSource, reward: ModelSource, reward_path: str,
                      key: str = "training.reward_model_path", what: str = "reward model") -> None:
    """The roles share one base, so a reward model (or another role's model, the recipe's `key`) must be an
    adapter on the policy's base."""
    if reward.adapter is None:
        raise PipelineError(f"{key}: {reward_path} is a fully fine-tuned {what}; PPO keeps its roles as "
                            f"adapters on one base, so train the {what} with a lora section")
    if (reward.path, reward.revision) != (policy.path, policy.revision):
        raise PipelineError(f"{key}: the {what} at {reward_path} was trained on the base {reward.origin} "
                            f"({reward.path}), the policy on {policy.origin} ({policy.path}); PPO keeps all its "
                            f"roles on one base: train the {what} from the policy's SFT output")


def build_ppo_model(policy: ModelSource, reward: ModelSource, spec: ModelSpec, tokenizer: PreTrainedTokenizerBase,
                    reward_stats: tuple[float, float] | None = None, gradient_checkpointing: bool = False,
                    scorers: dict[str, ModelSource] | None = None,
                    policy_init: ModelSource | None = None) -> SharedBase:
    """Load the base once and put the four roles on it (see the module docstring), plus any further frozen
    `scorers` (role name -> rm stage: the reward models of a recipe's `reward:` signals). The policy starts
    from `policy_init`'s adapter when given, else from the reference's."""
    start = policy_init or policy
    # The trainable copies take the recipe's shape: check first.
    for adapter in (policy.adapter, start.adapter, reward.adapter):
        if adapter is not None:
            check_continued_lora(spec.lora, adapter)
    base = prepare_base(load_base(policy, spec, tokenizer), spec, gradient_checkpointing)
    shared = SharedBase(base)
    shared.add_role(REFERENCE, policy.adapter)
    shared.add_role(POLICY, start.adapter, trainable=True,
                    config=lora_config(spec, CAUSAL_LM, base, continues=start.adapter))
    mean, std = reward_stats or (0.0, 1.0)
    shared.add_role(REWARD, reward.adapter, head=score_head(reward.adapter))
    shared.add_role(CRITIC, reward.adapter, trainable=True, head=score_head(reward.adapter, mean, std),
                    config=lora_config(spec, CAUSAL_LM, base, continues=reward.adapter))
    for role, source in (scorers or {}).items():
        shared.add_role(role, source.adapter, head=score_head(source.adapter))
    return shared


def check_roles(model: SharedBase) -> None:
    """Fail early, with the fix, when the model cannot play PPO's roles."""
    missing = [role for role in (POLICY, REFERENCE, CRITIC) if role not in model.roles]
    if missing:
        raise ValueError(f"the PPO model lacks the role(s) {missing}; build it with ppo.roles.build_ppo_model")
    if POLICY not in model.trainable or CRITIC not in model.trainable:
        raise ValueError("the policy and critic roles must be trainable (add_role(..., trainable=True))")
    if CRITIC not in model.heads:
        raise ValueError("the critic role needs a value head (add_role(..., head=...))")


def disable_dropout(model: torch.nn.Module) -> None:
    """The PPO ratio compares two forward passes over the same tokens; dropout would turn it into noise."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
