"""PPO checkpoints: the trained adapters and head, optimizer, scheduler, every RNG stream, the trainer state.

A checkpoint is written into a scratch folder and renamed into place, and `trainer_state.json` is its
last file, so a run killed while saving leaves no checkpoint that `last_checkpoint` would pick. Resuming
from one retraces the uninterrupted run exactly (same prompts, same samples, same updates).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rlhf_pipeline.models import load_adapter_weights
from rlhf_pipeline.outputs import CHECKPOINT_STATE, checkpoints, move_into_place
from rlhf_pipeline.ppo.roles import CRITIC, POLICY
from rlhf_pipeline.ppo.sharding import gathered

if TYPE_CHECKING:
    from rlhf_pipeline.adapters import SharedBase

CRITIC_DIR = "value_model"
CRITIC_HEAD = "value_head.safetensors"
DEEPSPEED_STATE = "deepspeed"  # under DeepSpeed the optimizer is sharded: the engine writes one file per rank


def save_weights(shared: SharedBase, folder: Path) -> None:
    """The policy adapter at the top (PeftModel.from_pretrained loads it), the critic's adapter and head below."""
    shared.save_adapter(POLICY, folder)
    shared.save_adapter(CRITIC, folder / CRITIC_DIR)
    save_file({name: value.detach().cpu().contiguous() for name, value in shared.heads[CRITIC].state_dict().items()},
              str(folder / CRITIC_DIR / CRITIC_HEAD))


def load_weights(shared: SharedBase, folder: Path) -> None:
    """Put a checkpoint's policy and critic adapters and value head back into their roles.

    Every rank calls this: under ZeRO-3 the trained tensors are gathered whole, loaded, and rank 0's values
    sharded again.
    """
    with gathered([param for param in shared.parameters() if param.requires_grad], writer=0):
        load_adapter_weights(shared.model, folder, POLICY)
        load_adapter_weights(shared.model, folder / CRITIC_DIR, CRITIC)
        shared.heads[CRITIC].load_state_dict(load_file(str(folder / CRITIC_DIR / CRITIC_HEAD)))


def commit(staging: Path, final: Path, limit: int | None) -> None:
    """Rename a fully written checkpoint into place, then keep at most `limit` checkpoints."""
    move_into_place(staging, final)
    if limit is not None:
        for stale in checkpoints(final.parent, complete=False)[:-limit]:
            shutil.rmtree(stale)


def read_state(folder: Path) -> dict[str, Any]:
    return json.loads((folder / CHECKPOINT_STATE).read_text(encoding="utf-8"))


def write_state(folder: Path, state: dict[str, Any]) -> None:
    """The trainer state, written last: a checkpoint without it is incomplete and never resumed from."""
    (folder / CHECKPOINT_STATE).write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")


def rng_state() -> dict[str, Any]:
    """Every RNG the run draws from, in tensor/primitive form so it reloads with weights_only=True."""
    version, mt_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {"python": [version, list(mt_state), gauss],
                             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
