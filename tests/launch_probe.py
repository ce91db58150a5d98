"""`python tests/launch_probe.py STAGE RECIPE [overrides]`: the CLI, plus the trained model's logits on disk.

Launched by tests/test_distributed.py under `accelerate launch` instead of `-m rlhf_pipeline`. Just before a
stage saves its weights, every rank runs the in-memory trained model on PROBE_IDS (under ZeRO-3 that forward
gathers the sharded parameters, a collective step) and rank 0 writes the logits next to the recipe as
`<recipe>.logits.pt`, so the test can check that the saved adapter reproduces the model that was trained.

With `PROBE_FAIL=RANK:STEP` in the environment, that rank raises in that optimizer step of the sft stage,
as a bug or a bad batch on one process would.

With `PROBE_FSDP_ON_CPU=1`, an FSDP launch (fsdp.yaml) runs FSDP on the CPU processes, which accelerate itself
never selects without GPUs (see `emulate_fsdp_on_cpu`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch

from rlhf_pipeline.adapters import SharedBase
from rlhf_pipeline.cli import main
from rlhf_pipeline.distributed import is_main_process
from rlhf_pipeline.ppo.roles import POLICY
from rlhf_pipeline.stages import common

PROBE_IDS = [[1, 17, 42, 99, 123, 250, 301, 2]]  # no pad token (id 0 after the pad policy)

_finish = common.finish


def logits_path(recipe_path: Path) -> Path:
    return recipe_path.with_suffix(".logits.pt")


def finish_with_probe(recipe: Any, loaded: Any, model: Any, metrics: dict[str, Any], *args: Any,
                      **kwargs: Any) -> Any:
    model.eval()
    with torch.no_grad():
        ids = torch.tensor(PROBE_IDS)
        if isinstance(model, SharedBase):  # PPO's roles on one base: the policy is what the stage saves
            logits = model(POLICY, ids, torch.ones_like(ids)).float()
        else:
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
    if is_main_process():
        torch.save(logits, logits_path(Path(recipe.path)))
    return _finish(recipe, loaded, model, metrics, *args, **kwargs)


def emulate_fsdp_on_cpu() -> None:
    """Let an FSDP launch run FSDP over gloo on CPU processes, where accelerate 1.15 runs plain DDP instead.

    accelerate picks FSDP only for GPU-like devices; on a CPU the state it builds says MULTI_CPU. This switches
    that state to FSDP (with the plugin accelerate built from the launch) as soon as it is built, and nothing
    else: accelerate's FSDP2 preparation (fully_shard per transformer block, DTensor parameters), the Trainer's
    FSDP code and the stages' own code then run as they do on GPUs, in fp32, with torch's FSDP2 on gloo.
    """
    import accelerate.state as state
    from accelerate.utils import DistributedType

    build = state.AcceleratorState.__init__

    def build_as_fsdp(self: Any, *args: Any, fsdp_plugin: Any = None, **kwargs: Any) -> None:
        build(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    state.AcceleratorState.__init__ = build_as_fsdp


def fail_on_one_rank(rank: int, step: int) -> None:
    from trl import SFTTrainer

    real_step = SFTTrainer.training_step

    def training_step(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.args.process_index == rank and self.state.global_step + 1 == step:
            raise ValueError(f"injected failure in step {step}")
        return real_step(self, *args, **kwargs)

    SFTTrainer.training_step = training_step


if __name__ == "__main__":
    common.finish = finish_with_probe  # stages import finish when they run, so they get this one
    if "PROBE_FAIL" in os.environ:
        fail_on_one_rank(*map(int, os.environ["PROBE_FAIL"].split(":")))
    if os.environ.get("PROBE_FSDP_ON_CPU") == "1":
        emulate_fsdp_on_cpu()
    sys.exit(main(sys.argv[1:]))
