"""Reading a process reward model (a finished prm stage): each step's probability of being right.

    from rlhf_pipeline.process_reward import ProcessRewardModel
    prm = ProcessRewardModel.from_stage("outputs/smollm2-135m-arithmetic/prm")
    prm.step_probabilities(prompts, ["23 + 48 = 71\\n71 - 17 = 54\\nThe answer is 54."])  # [[p1, p2, p3]]

The PRM's head scores every token; a step's score is read at the token that ends it (rlhf_pipeline.steps),
where the prm stage trained it, and σ(score) is the probability that the step is right. A whole answer gets
one number by `aggregate`: the `min` over its steps (Lightman et al. 2023 also tried it), their `product`
(Lightman et al.'s choice: the probability every step is right), or the `last` step's (what an outcome RM
would say). `dense` keeps one reward per step for PPO: log σ(score) at each step's end, so an answer's dense
rewards add up to the log of its product, never above 0 (steps padded onto an answer can only lower it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_pipeline.chat import Messages, encode_answer, encode_prompt, pad_batch
from rlhf_pipeline.steps import step_end_positions

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

    from rlhf_pipeline.adapters import SharedBase
    from rlhf_pipeline.recipe import ModelSpec

AGGREGATIONS = ("min", "product", "last")
DENSE = "dense"
PROCESS = "process"  # a prm stage's objective, as its manifest records it

StepScores = list[tuple[list[int], list[float]]]  # per answer: step-end positions (in the answer) and their P(right)


def aggregate(probabilities: Sequence[float], how: str) -> float:
    """One number for an answer from its steps' P(right); an answer with no step gets 0 (nothing right in it).
    `dense` gives Σ log P, the sum of its per-step PPO rewards."""
    if not probabilities:
        return 0.0 if how != DENSE else math.log(1e-6)
    if how == "min":
        return min(probabilities)
    if how == "product":
        return math.prod(probabilities)
    if how == "last":
        return probabilities[-1]
    if how == DENSE:
        return sum(step_log_reward(p) for p in probabilities)
    raise ValueError(f"aggregate: one of {', '.join(AGGREGATIONS)} or {DENSE}, got {how!r}")


def step_log_reward(probability: float) -> float:
    """A step's dense reward: log P(right), floored at log 1e-6 so a certain error stays finite."""
    return math.log(max(probability, 1e-6))


@dataclass
class ProcessRewardModel:
    """A frozen PRM's per-token score function and its tokenizer."""

    score_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # right-padded ids, mask -> [rows, positions]
    tokenizer: PreTrainedTokenizerBase
    device: Any = "cpu"
    batch_size: int = 16
    _last: tuple[Any, StepScores] | None = field(default=None, repr=False)  # signals under other aggregations reuse it

    @classmethod
    def from_role(cls, shared: SharedBase, role: str, tokenizer: PreTrainedTokenizerBase,
                  stage_dir: str | Path) -> ProcessRewardModel:
        """A scorer role of a loaded shared base that holds a finished prm stage's adapter and head."""
        from functools import partial

        from rlhf_pipeline.outputs import require_finished

        require_finished(Path(stage_dir), "prm", "process reward model")
        return cls(partial(shared, role), tokenizer, next(shared.parameters()).device)

    @classmethod
    def from_stage(cls, output_dir: str | Path, model_spec: ModelSpec | None = None) -> ProcessRewardModel:
        """A finished prm stage on its base (never merged), as the stages that score with it load it."""
        from rlhf_pipeline.adapters import load_scorer_stage

        shared, tokenizer = load_scorer_stage(output_dir, model_spec, "prm")
        return cls.from_role(shared, "prm", tokenizer, output_dir)

    def step_scores(self, sequences: Sequence[Sequence[int]], prompt_lengths: Sequence[int]) -> StepScores:
        """For each prompt+answer sequence: where its steps end (positions in the answer) and each step's P(right).
        The same sequences asked again (the PRM as several signals, one per aggregation) are not scored again."""
        import torch

        key = (tuple(map(tuple, sequences)), tuple(prompt_lengths))
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        out: StepScores = []
        with torch.no_grad():
            for start in range(0, len(sequences), self.batch_size):
                rows = sequences[start : start + self.batch_size]
                ids, mask = pad_batch(rows, self.tokenizer.pad_token_id, "right")
                scores = self.score_fn(ids.to(self.device), mask.to(self.device)).float().cpu()
                for row, (sequence, cut) in enumerate(zip(rows, prompt_lengths[start : start + len(rows)],
                                                          strict=True)):
                    ends = step_end_positions(self.tokenizer, list(sequence[cut:]))
                    out.append((ends, torch.sigmoid(scores[row, [cut + end for end in ends]]).tolist()))
        self._last = (key, out)
        return out

    def encode(self, prompts: Sequence[Messages], answers: Sequence[str]) -> tuple[list[list[int]], list[int]]:
        """Prompt + answer ids as every stage encodes them (chat.py), and the prompts' lengths."""
        encoded = [encode_prompt(self.tokenizer, prompt) for prompt in prompts]
        return ([p + encode_answer(self.tokenizer, a) for p, a in zip(encoded, answers, strict=True)],
                [len(p) for p in encoded])

    def prompt_lengths(self, prompts: Sequence[Messages]) -> list[int]:
        """How many leading ids of a sampled sequence are its prompt (chat-encoded, as every stage samples)."""
        return [len(encode_prompt(self.tokenizer, prompt)) for prompt in prompts]

    def step_probabilities(self, prompts: Sequence[Messages], answers: Sequence[str]) -> list[list[float]]:
        """Each answer's steps' P(right), in order."""
        return [probabilities for _, probabilities in self.step_scores(*self.encode(prompts, answers))]
