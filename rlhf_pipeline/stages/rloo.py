"""RLOO: REINFORCE with a leave-one-out baseline: each sampled answer is compared with the mean of its siblings.

    rlhf-pipeline rloo recipes/smollm2-135m/rloo.yaml

TRL's RLOOTrainer with RLOOConfig's own key names; no critic (Ahmadian et al., 2024). Prompts come from any
card. Answers are scored with the recipe's `reward:` section (reward models, rule reward models, functions and
judges; reward_spec.py), each signal weighted. With `training.beta` > 0 the KL penalty anchors
to the SFT policy (stages/policy_training.py); TRL's default beta is 0.05.
"""

from __future__ import annotations

from rlhf_pipeline.data.formats import FORMATS
from rlhf_pipeline.stages.policy_training import trl_stage

STAGE = trl_stage(
    "rloo", "RLOO",
    summary="RLOO of the SFT policy: each sampled answer's reward against its siblings' mean (no critic)",
    example="rlhf-pipeline rloo recipes/smollm2-135m/rloo.yaml training.beta=0.05",
    what="RLOO policy, REINFORCE with a leave-one-out baseline, KL-anchored to the SFT policy",
    data_formats=frozenset(FORMATS),
    online=True,
)
