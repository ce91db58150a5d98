"""GRPO: the SFT policy samples a group of answers per prompt and learns from their rewards relative to the group.

    rlhf-pipeline grpo recipes/smollm2-135m/grpo.yaml

TRL's GRPOTrainer with GRPOConfig's own key names; no critic. Prompts come from any card. Answers are scored
with the recipe's `reward:` section (reward models, rule reward models, functions and judges; reward_spec.py), each
signal weighted. With `training.beta` > 0 the KL penalty anchors to the SFT policy
(stages/policy_training.py); TRL's default beta is 0 (no reference at all).
"""

from __future__ import annotations

from rlhf_pipeline.data.formats import FORMATS
from rlhf_pipeline.stages.policy_training import trl_stage

STAGE = trl_stage(
    "grpo", "GRPO",
    summary="GRPO of the SFT policy: groups of sampled answers scored by reward models and functions",
    example="rlhf-pipeline grpo recipes/smollm2-135m/grpo.yaml training.beta=0.04",
    what="GRPO policy, trained on group-relative rewards, KL-anchored to the SFT policy",
    data_formats=frozenset(FORMATS),
    online=True,
)
