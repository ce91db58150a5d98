"""PPO-ptx (InstructGPT, Ouyang et al. 2022): the SFT loss on demonstrations joins the policy's PPO loss.

Optimising the reward alone drifts the policy away from what SFT taught (the "alignment tax"); mixing
ptx_coef × the demonstrations' negative log-likelihood into each policy backward pulls it back. The
demonstrations are the recipe's `data.ptx` cards (any SFT format): the loss covers the answer tokens and
the end-of-turn token, as the sft stage's does.

Which demonstrations a micro-batch gets depends only on its position in the run (the PPO step and the
micro-batch's index in it) and the seed, so a resumed run draws exactly what the uninterrupted one drew.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from trl.trainer.utils import selective_log_softmax

from rlhf_pipeline.chat import pad_batch
from rlhf_pipeline.ppo.experience import positions
from rlhf_pipeline.ppo.formulas import masked_mean
from rlhf_pipeline.ppo.roles import POLICY


@dataclass
class Demonstration:
    """A templated prompt and its answer (answer tokens + end-of-turn), as token ids."""

    prompt: list[int]
    answer: list[int]


class Demonstrations:
    """This process's share of PPO-ptx micro-batches, each chosen by its position in the run."""

    def __init__(self, examples: Sequence[Demonstration], micro_batch_size: int, pad_id: int, seed: int,
                 process_index: int = 0, num_processes: int = 1) -> None:
        if not examples:
            raise ValueError("PPO-ptx needs at least one demonstration")
        self.examples = list(examples)
        self.micro_batch_size = micro_batch_size
        self.pad_id = pad_id
        self.seed = seed
        self.process_index, self.num_processes = process_index, num_processes
        self._orders: dict[int, torch.Tensor] = {}  # the current pass's shuffle

    def rows(self, position: int) -> list[int]:
        """Indices of the demonstrations for micro-batch `position` on this process (a fresh shuffle per pass)."""
        first = (position * self.num_processes + self.process_index) * self.micro_batch_size
        chosen = []
        for k in range(first, first + self.micro_batch_size):
            epoch, index = divmod(k, len(self.examples))
            if epoch not in self._orders:
                self._orders = {epoch: torch.randperm(len(self.examples),
                                                      generator=torch.Generator().manual_seed(self.seed + epoch))}
            chosen.append(int(self._orders[epoch][index]))
        return chosen

    def loss(self, model: torch.nn.Module, position: int) -> torch.Tensor:
        """The policy role's mean negative log-likelihood of the answer tokens of micro-batch `position`."""
        batch = [self.examples[i] for i in self.rows(position)]
        device = next(p for p in model.parameters()).device
        ids, mask = (t.to(device) for t in pad_batch([d.prompt + d.answer for d in batch], self.pad_id, "right"))
        answer = torch.zeros_like(ids, dtype=torch.bool)
        for row, demonstration in enumerate(batch):
            start = len(demonstration.prompt)
            answer[row, start:start + len(demonstration.answer)] = True
        logits = model(POLICY, ids, mask, positions(mask))[:, :-1].float()
        logprobs = selective_log_softmax(logits, ids[:, 1:])
        return -masked_mean(logprobs, answer[:, 1:])
