"""dpo, kto, grpo and rloo under real two-process launches on the CPU: DDP, DeepSpeed ZeRO-2 and ZeRO-3.

One `accelerate launch ... -m rlhf_pipeline run` per profile runs the four stages in order (one process pair,
as a user's pipeline would), each starting from the same finished SFT adapter and reward model. What ran is
taken from what the ranks recorded (world size, ranks gathered from both processes, DeepSpeed stage), and
every ZeRO run must train exactly as the DDP run did: same seed, same global batch, same numbers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.stages.test_policy_training import POLICY_STAGES, policy_recipe
from tests.test_distributed import CONFIGS, assert_adapter_trained, assert_two_ranks, launch, succeeded

PROFILES = {"ddp": ("cpu_multi_process.yaml", "MULTI_CPU", None),
            "zero2": ("deepspeed_zero2_cpu.yaml", "DEEPSPEED", 2),
            "zero3": ("deepspeed_zero3_cpu.yaml", "DEEPSPEED", 3)}
PER_DEVICE = 4


@pytest.fixture(scope="module")
def runs() -> dict[str, Path]:
    """Output roots of the launches, by profile, filled in file order (DDP first: the others compare with it)."""
    return {}


def _logged(out: Path) -> list[dict[str, Any]]:
    history = json.loads((out / "metrics.json").read_text())["log_history"]
    return [{k: v for k, v in entry.items() if isinstance(v, float) and "runtime" not in k and "per_second" not in k
             and k != "step_time"} for entry in history if "loss" in entry]


@pytest.mark.parametrize("profile", list(PROFILES))
def test_policy_stages_train_alike_under_ddp_and_deepspeed(profile: str, tmp_path: Path, tiny_model_dir: Path,
                                                           sft_and_rm: tuple[Path, Path],
                                                           runs: dict[str, Path]) -> None:
    config, distributed_type, zero_stage = PROFILES[profile]
    training = {"per_device_train_batch_size": PER_DEVICE, "max_steps": 2, "disable_tqdm": True}
    for stage in POLICY_STAGES:
        policy_recipe(tmp_path, tiny_model_dir, stage, *sft_and_rm,
                      training | ({"num_generations": 4} if stage in ("grpo", "rloo") else {}))
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({"name": "policy-stages", "stages": [
        {"stage": stage, "recipe": f"{stage}.yaml"} for stage in POLICY_STAGES]}))
    output = succeeded(launch(f"policy stages {profile}", CONFIGS / config, ["-m", "rlhf_pipeline", "run",
                                                                              str(pipeline)]))
    for stage in POLICY_STAGES:
        out = tmp_path / "outputs" / stage
        metrics = json.loads((out / "metrics.json").read_text())
        assert_two_ranks(metrics, distributed_type, zero_stage)
        assert metrics["global_batch_size"] == PER_DEVICE * 2 and metrics["global_steps"] == 2
        assert len(re.findall(rf"^{stage}: finished; outputs in ", output, flags=re.MULTILINE)) == 1  # rank 0 only
        assert_adapter_trained(out)
        if "ddp" in runs:  # ZeRO must train exactly as DDP did
            for mine, theirs in zip(_logged(out), _logged(runs["ddp"] / stage), strict=True):
                assert mine == pytest.approx(theirs, abs=1e-4), stage
    runs[profile] = tmp_path / "outputs"
