"""Direct preference optimisation: the SFT policy trained on preference pairs, no reward model, no sampling.

    rlhf-pipeline dpo recipes/smollm2-135m/dpo.yaml
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml -m rlhf_pipeline dpo \\
        recipes/<model>/dpo.yaml training.beta=0.05

TRL's DPOTrainer with the recipe's `training` keys as DPOConfig's own names. The policy starts from the SFT
adapter and the implicit reward β·log π/π_ref is measured against the SFT policy (stages/policy_training.py).
"""

from __future__ import annotations

from rlhf_pipeline.data.formats import PREFERENCE_FORMATS
from rlhf_pipeline.stages import MemoryModel
from rlhf_pipeline.stages.policy_training import trl_stage

PANELS = (("rewards/accuracies", "implicit-reward accuracy"), ("rewards/margins", "implicit-reward margin"),
          ("loss", "DPO loss"), ("rewards/chosen", "reward of chosen"), ("rewards/rejected", "reward of rejected"),
          ("logps/chosen", "log π(chosen)"))

STAGE = trl_stage(
    "dpo", "DPO",
    summary="direct preference optimisation of the SFT policy on preference pairs (no reward model)",
    example="rlhf-pipeline dpo recipes/smollm2-135m/dpo.yaml training.beta=0.05",
    what="DPO policy, trained on preference pairs against the SFT policy as reference",
    panels=PANELS,
    data_formats=frozenset(PREFERENCE_FORMATS),
    memory=MemoryModel(rows_per_example=2),  # chosen and rejected go through the model together
)
