"""A rollout's experience and what is read off it: sequences, masks, scores, statistics and samples.

The trainer (ppo/trainer.py) fills a `Rollout`; the functions here are the pieces of that which need no
trainer: the logits and values each response token is scored with, where a response stops, how a reward
model's raw score becomes PPO's score, and the statistics and samples logged per step.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from rlhf_pipeline.chat import end_of_turn_id, pad_batch
from rlhf_pipeline.ppo.config import PPOConfig
from rlhf_pipeline.ppo.formulas import SumOverProcesses, explained_variance
from rlhf_pipeline.ppo.roles import CRITIC

logger = logging.getLogger(__name__)


@dataclass
class Rollout:
    """One batch of experience: the sampled sequences and everything PPO needs to know about them.

    Sequences are [left-padded prompt | right-padded response]; per-token tensors are [batch, response
    width], and `response_mask` marks the valid response tokens (the stop token included).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    context_length: int
    response_mask: torch.Tensor
    has_stop: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    entropy: torch.Tensor
    values: torch.Tensor
    raw_scores: torch.Tensor
    scores: torch.Tensor
    kl: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    signals: dict[str, torch.Tensor] = field(default_factory=dict)  # each reward signal's value per row
    timings: dict[str, float] = field(default_factory=dict)  # seconds spent sampling, syncing, scoring; the gap

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: torch.Tensor) -> Rollout:
        """The same experience restricted to some rows (a minibatch)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["signals"] = {name: v[rows] for name, v in self.signals.items()}
        return Rollout(**{name: v[rows] if isinstance(v, torch.Tensor) else v for name, v in values.items()})

    @property
    def responses(self) -> torch.Tensor:
        return self.input_ids[:, self.context_length:]


@dataclass
class PromptSchedule:
    """Which prompts each PPO step answers: a pure function of the step, so a resumed run needs only the step.

    Each data epoch is a permutation seeded by (seed, epoch); step k takes the k-th slice of the global batch,
    and each process its own part of that slice.
    """

    prompts: list[list[int]]
    per_process: int
    processes: int
    process_index: int
    seed: int

    @classmethod
    def build(cls, prompts: Sequence[Sequence[int]], config: PPOConfig, processes: int,
              process_index: int) -> PromptSchedule:
        """Drop (and count) prompts that are empty or longer than max_prompt_length, never silently."""
        limit = config.max_prompt_length
        kept = [list(p) for p in prompts if len(p) > 0 and (limit is None or len(p) <= limit)]
        if len(kept) < len(prompts):
            logger.warning("PPO: dropped %d of %d prompts (empty or longer than max_prompt_length=%s)",
                           len(prompts) - len(kept), len(prompts), limit)
        schedule = cls(kept, config.rollout_batch_size, processes, process_index, config.seed)
        if len(kept) < schedule.global_batch_size:
            raise ValueError(f"PPO needs at least {schedule.global_batch_size} usable prompts "
                             f"(rollout batch × processes) but has {len(kept)}")
        return schedule

    @property
    def global_batch_size(self) -> int:
        return self.per_process * self.processes

    @property
    def batches_per_epoch(self) -> int:
        return len(self.prompts) // self.global_batch_size

    def total_steps(self, config: PPOConfig) -> int:
        if config.total_episodes is not None:
            return math.ceil(config.total_episodes / self.global_batch_size)
        return math.ceil(config.num_train_epochs * self.batches_per_epoch)

    def position(self, step: int) -> tuple[int, int]:
        """(data epoch, batch index within it) of 1-based `step`."""
        return divmod(step - 1, self.batches_per_epoch)

    def prompts_for_step(self, step: int) -> list[list[int]]:
        """This process's share of the step's prompts."""
        epoch, index = self.position(step)
        order = torch.randperm(len(self.prompts), generator=torch.Generator().manual_seed(self.seed + epoch))
        start = index * self.global_batch_size + self.process_index * self.per_process
        return [self.prompts[i] for i in order[start:start + self.per_process].tolist()]


def response_logits(model: torch.nn.Module, role: str, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    context_length: int) -> torch.Tensor:
    """A language-model role's logits at the positions that predict each response token (only those computed)."""
    width = input_ids.shape[1] - context_length
    return model(role, input_ids, attention_mask, positions(attention_mask), logits_to_keep=width + 1)[:, :-1]


def response_values(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    context_length: int) -> torch.Tensor:
    """The critic's V(s_t) for each response token t, read at the position that predicts it (as log-probs are)."""
    return model(CRITIC, input_ids, attention_mask, positions(attention_mask))[:, context_length - 1:-1]


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token, as `generate` numbers them."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def chunks(total: int, size: int) -> Iterator[slice]:
    for start in range(0, total, size):
        yield slice(start, min(start + size, total))


def stop_token_ids(config: PPOConfig, tokenizer: Any) -> list[int]:
    """Where answers end: `stop_token_id`, or with `stop_token: eos` the chat template's end-of-turn token and EOS.

    The reward model learnt on answers closed by the end-of-turn token (chat.py), and eval samples until
    either; where the two differ (Gemma's `<end_of_turn>`, Phi-3's `<|end|>`), stopping at EOS alone would
    run answers past their turn and count nearly all of them as missing their stop.
    """
    if config.stop_token_id is not None:
        return [config.stop_token_id]
    if config.stop_token != "eos":
        return []
    if tokenizer.eos_token_id is None:
        raise ValueError("stop_token is 'eos' but the tokenizer has no eos token; set stop_token_id")
    ids = {tokenizer.eos_token_id}
    if tokenizer.chat_template is not None:
        ids.add(end_of_turn_id(tokenizer))
    return sorted(ids)


def score_responses(reward_fn: Any, queries: torch.Tensor, query_mask: torch.Tensor, responses: torch.Tensor,
                    response_mask: torch.Tensor, pad_id: int,
                    chunk_size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The reward function on right-padded prompt+response rows, built from lengths, never from `!= pad`.

    `reward_fn(input_ids, attention_mask, prompt_lengths)` returns one score per row, or a mapping with the
    scores under "score" and each reward signal's values under its name (logged as `reward/<name>`).
    """
    rows = [torch.cat([q[m.bool()], r[rm]])
            for q, m, r, rm in zip(queries, query_mask, responses, response_mask, strict=True)]
    ids, mask = (t.to(queries.device) for t in pad_batch(rows, pad_id, "right"))
    prompt_lengths = query_mask.sum(dim=1)
    parts: dict[str, list[torch.Tensor]] = defaultdict(list)
    for part in chunks(len(rows), chunk_size):
        out = reward_fn(ids[part], mask[part], prompt_lengths[part])
        for name, values in (out.items() if isinstance(out, Mapping) else [("score", out)]):
            parts[name].append(torch.as_tensor(values).reshape(-1).float())
    scores = torch.cat(parts.pop("score"))
    if scores.shape != (len(rows),):
        raise ValueError(f"reward_fn must return one score per row, got shape {tuple(scores.shape)}")
    return scores.to(queries.device), {name: torch.cat(v).to(queries.device) for name, v in parts.items()}


def truncate_after_stop(responses: torch.Tensor, stop_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of tokens up to and including the first stop token, and whether a stop token was produced."""
    stops = torch.tensor(stop_ids, dtype=responses.dtype, device=responses.device)
    is_stop = torch.isin(responses, stops)
    stops_before = is_stop.long().cumsum(dim=1) - is_stop.long()
    return stops_before == 0, is_stop.any(dim=1)


def shape_scores(raw_scores: torch.Tensor, has_stop: torch.Tensor, config: PPOConfig,
                 reward_stats: tuple[float, float] | None) -> torch.Tensor:
    """Normalise with the RM's (mean, std), clip to ±reward_clip, then subtract the missing-stop penalty."""
    scores = raw_scores
    if config.normalize_reward:
        mean, std = reward_stats
        scores = (scores - mean) / max(std, 1e-8)
    if config.reward_clip is not None:
        scores = scores.clamp(-config.reward_clip, config.reward_clip)
    if config.missing_eos_penalty is not None:
        scores = scores - config.missing_eos_penalty * (~has_stop).float()
    return scores


def rollout_statistics(rollout: Rollout, kl_coef: float, accelerator: Any,
                       sum_over_processes: SumOverProcesses) -> dict[str, float]:
    """Statistics of a rollout over the whole global batch (every process's rows gathered).

    kl, non_score_reward and rlhf_reward are per answer (summed over its tokens), as in TRL;
    entropy is the exact entropy of softmax(logits/T) per response token.
    """
    mask = rollout.response_mask
    lengths = mask.sum(dim=1).float()
    kl_sum = (rollout.kl * mask).sum(dim=1)
    non_score = -kl_coef * kl_sum
    per_row = torch.stack([rollout.scores, rollout.raw_scores, kl_sum, non_score, rollout.scores + non_score,
                           lengths, rollout.has_stop.float(), (rollout.entropy * mask).sum(dim=1)], dim=1)
    per_row = accelerator.gather(per_row)
    scores, raw, kl, non_score, rlhf, lengths, stops, entropy = per_row.unbind(dim=1)
    ev = explained_variance(rollout.values, rollout.returns, mask, sum_over_processes)
    signals = {f"reward/{name}": accelerator.gather(values).mean().item() for name, values in rollout.signals.items()}
    return signals | {
        "objective/scores": scores.mean().item(),
        "objective/scores_std": scores.std().item() if len(scores) > 1 else 0.0,
        "objective/raw_scores": raw.mean().item(),
        "objective/kl": kl.mean().item(),
        "objective/entropy": (entropy.sum() / lengths.sum()).item(),
        "objective/non_score_reward": non_score.mean().item(),
        "objective/rlhf_reward": rlhf.mean().item(),
        "response/length": lengths.mean().item(),
        "response/eos_fraction": stops.mean().item(),
        "objective/kl_coef": kl_coef,
        "val/explained_variance": ev.item(),
    }


def sum_over_processes(accelerator: Any) -> SumOverProcesses:
    """A sum over processes for statistics of the whole global batch (whitening, explained variance)."""
    if accelerator.num_processes == 1:
        return lambda tensor: tensor
    return lambda tensor: accelerator.reduce(tensor, reduction="sum")


def mean_over_processes(accelerator: Any, values: dict[str, float]) -> dict[str, float]:
    """Each value averaged over the processes (a collective: every rank calls it with the same keys)."""
    if accelerator.num_processes == 1:
        return values
    stacked = torch.tensor(list(values.values()), device=accelerator.device)
    return dict(zip(values, accelerator.reduce(stacked, reduction="mean").tolist(), strict=True))


def decoded_samples(rollout: Rollout, tokenizer: Any, count: int = 3) -> list[dict[str, Any]]:
    """A few decoded prompt/response/score triples, for a human to look at."""
    samples = []
    prompt_part = slice(0, rollout.context_length)
    for row in range(min(count, len(rollout))):
        prompt = rollout.input_ids[row, prompt_part][rollout.attention_mask[row, prompt_part].bool()]
        response = rollout.responses[row][rollout.response_mask[row]]
        samples.append({"prompt": tokenizer.decode(prompt, skip_special_tokens=True),
                        "response": tokenizer.decode(response, skip_special_tokens=True),
                        "score": rollout.raw_scores[row].item()})
    return samples
