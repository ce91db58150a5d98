"""Scoring with a reward model: what the rm stage measures with, and what labelling and evaluation judge with.

    from rlhf_pipeline.reward import RewardModel
    rm = RewardModel.from_stage("outputs/smollm2-135m/rm")
    rm.score([[{"role": "user", "content": "How was your day?"}]], ["Wonderful, thanks!"])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rlhf_pipeline.chat import Messages, encode_conversations, pad_batch

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from rlhf_pipeline.adapters import SharedBase
    from rlhf_pipeline.recipe import ModelSpec

PAIRWISE, CLASSIFICATION = "pairwise", "classification"  # a reward model's objective, as its rm stage records it
ScoreFn = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]  # right-padded ids, mask -> a score per row


def sequence_scores(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """A sequence-classification model's scalar per right-padded row, read at the row's last real token."""
    import torch

    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    if logits.dim() == 3:  # per-token head: pick each row's last attended position
        last = attention_mask.sum(dim=1) - 1
        logits = logits[torch.arange(len(last)), last]
    return logits.squeeze(-1).float()


@dataclass
class RewardModel:
    """A frozen reward model's score function, its tokenizer and its training-set reward statistics."""

    score_fn: ScoreFn
    tokenizer: PreTrainedTokenizerBase
    device: torch.device | str = "cpu"
    mean: float = 0.0
    std: float = 1.0
    batch_size: int = 16
    objective: str = PAIRWISE  # or CLASSIFICATION: a rule RM, whose score's sigmoid is P(breaks the rule)

    @classmethod
    def from_stage(cls, output_dir: str | Path, model_spec: ModelSpec | None = None) -> RewardModel:
        """A finished rm stage as PPO holds it: its adapter on the base (never merged) and its score head."""
        from rlhf_pipeline.adapters import load_scorer_stage

        shared, tokenizer = load_scorer_stage(output_dir, model_spec, "reward")
        return cls.from_role(shared, "reward", tokenizer, output_dir)

    @classmethod
    def from_role(cls, shared: SharedBase, role: str, tokenizer: PreTrainedTokenizerBase,
                  stage_dir: str | Path) -> RewardModel:
        """A scorer role of a loaded shared base, with the reward statistics its rm stage measured."""
        from functools import partial

        from rlhf_pipeline.outputs import require_finished

        extra = require_finished(Path(stage_dir), "rm", "reward model").extra
        stats = extra.get("reward_stats", {})
        return cls(partial(shared.last_scores, role), tokenizer, next(shared.parameters()).device,
                   stats.get("mean", 0.0), stats.get("std", 1.0), objective=extra.get("objective", PAIRWISE))

    def score_ids(self, sequences: Sequence[Sequence[int]], description: str | None = None) -> list[float]:
        """Raw scores of already-encoded prompt+answer sequences, in batches (a progress bar when described)."""
        import torch
        from tqdm.auto import tqdm

        from rlhf_pipeline.distributed import is_main_process

        scores: list[float] = []
        batches = range(0, len(sequences), self.batch_size)
        with torch.no_grad():
            for start in tqdm(batches, desc=description, disable=description is None or not is_main_process()):
                ids, mask = pad_batch(sequences[start : start + self.batch_size], self.tokenizer.pad_token_id,
                                      "right")
                scores.extend(self.score_fn(ids.to(self.device), mask.to(self.device)).tolist())
        return scores

    def score(self, prompts: Sequence[Messages], answers: Sequence[str], description: str | None = None) -> list[float]:
        """Raw scores of answers to chat prompts, encoded exactly as in RM training and PPO."""
        return self.score_ids(encode_conversations(self.tokenizer, prompts, answers), description)
