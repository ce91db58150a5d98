"""The PPO formulas, one function per quantity, on [batch, response_length] tensors.

`mask` always marks the valid response tokens (True/1) of right-padded responses; padded positions
never influence a result, whatever values they hold. References: Schulman et al. 2017 (PPO, clipped
surrogate), Schulman et al. 2016 (GAE), Ouyang et al. 2022 (per-token KL penalty, reward at the last
token), Schulman 2020 "Approximating KL divergence" (k1/k3 estimators), Zheng et al. 2023 (the Fudan
"Secrets of RLHF" write-up: value clipping, whitening), Wang et al. 2024 (Math-Shepherd: a reward per step).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

KLEstimator = Literal["k1", "k3"]


SumOverProcesses = Callable[[torch.Tensor], torch.Tensor]


def _no_reduce(total: torch.Tensor) -> torch.Tensor:
    return total


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean over valid tokens only: sum(x·m) / sum(m); padding (even inf/nan) is selected away, not scaled."""
    mask = mask.bool()
    total = torch.where(mask, values, torch.zeros_like(values)).sum(dim=dim)
    count = mask.sum(dim=dim).clamp(min=1)
    return total / count


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True,
               sum_over_processes: SumOverProcesses = _no_reduce) -> torch.Tensor:
    """Variance over valid tokens, with Bessel's correction n/(n−1) when there are at least two of them.

    With `sum_over_processes` (a sum all-reduce) the tokens are every process's: the mean first, then the
    squared deviations from it, so the result is the single-process one on the gathered batch.
    """
    mean, count = masked_global_mean(values, mask, sum_over_processes)
    squares = sum_over_processes(torch.where(mask.bool(), (values - mean) ** 2, torch.zeros_like(values)).sum())
    variance = squares / count.clamp(min=1)
    if unbiased and count > 1:
        variance = variance * count / (count - 1)
    return variance


def masked_global_mean(values: torch.Tensor, mask: torch.Tensor,
                       sum_over_processes: SumOverProcesses = _no_reduce) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, count) of the valid tokens of every process (one all-reduce of sum and count)."""
    mask = mask.bool()
    totals = torch.stack([torch.where(mask, values, torch.zeros_like(values)).sum(),
                          mask.sum().to(values.dtype)])
    total, count = sum_over_processes(totals).unbind()
    return total / count.clamp(min=1), count


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  sum_over_processes: SumOverProcesses = _no_reduce) -> torch.Tensor:
    """(x − μ)/σ over the valid tokens (of every process, with `sum_over_processes`); padding becomes 0.

    shift_mean=False adds μ back: (x − μ)/σ + μ, the spread rescaled to one and the mean kept, as TRL's
    reward whitening does. That does not keep each value's sign (x = μ − σ/2 with μ = σ/4 turns negative,
    and the reverse), only the batch mean; the scale is what it changes.
    """
    mean, _ = masked_global_mean(values, mask, sum_over_processes)
    var = masked_var(values, mask, sum_over_processes=sum_over_processes)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k1") -> torch.Tensor:
    """Per-token estimate of KL(π‖π_ref) from tokens sampled by π: k1 = log π − log π_ref, k3 = (r − 1) − log r."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        ref_over_policy = -log_ratio
        return torch.expm1(ref_over_policy) - ref_over_policy
    raise ValueError(f"kl_estimator must be 'k1' or 'k3', got {estimator!r}")


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """InstructGPT's per-token reward: −β·KL on every token, plus the reward-model score on the last valid one."""
    rewards = torch.where(mask.bool(), -kl_coef * kl, torch.zeros_like(kl))
    last = mask.long().sum(dim=1).clamp(min=1) - 1
    return rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))


def dense_token_rewards(scores: torch.Tensor, step_rewards: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor,
                        kl_coef: float) -> torch.Tensor:
    """Per-token reward with a process reward model (Math-Shepherd's step-by-step PPO): InstructGPT's −β·KL on every
    token and the answer's score on its last valid token (`token_rewards`), plus each step's reward on the token
    that ends the step (`step_rewards`: zero on every other token; padding never counts)."""
    steps = torch.where(mask.bool(), step_rewards.to(kl.dtype), torch.zeros_like(kl))
    return token_rewards(scores, kl, mask, kl_coef) + steps


def gae_advantages_and_returns(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE(γ,λ): A_t = Σ_l (γλ)^l δ_{t+l}, δ_t = r_t + γV_{t+1} − V_t, with V = 0 after the last valid token; R = A + V.

    Masked positions are skipped (they neither add reward nor cut the recursion) and get A = R = 0.
    """
    mask = mask.bool()
    zeros = torch.zeros_like(values[:, 0])
    next_value, next_advantage = zeros, zeros
    advantages = torch.zeros_like(values)
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        valid = mask[:, t]
        advantages[:, t] = torch.where(valid, advantage, zeros)
        next_advantage = torch.where(valid, advantage, next_advantage)
        next_value = torch.where(valid, values[:, t], next_value)
    returns = torch.where(mask, advantages + values, torch.zeros_like(values))
    return advantages, returns


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate E[max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε))], ρ = π/π_old; also (clip fraction, KL(π_old‖π)).

    Where the clipped term wins, the loss is constant in π: that token gets no gradient, which is
    how PPO keeps the update inside the trust region.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = masked_mean(kl_penalty(old_logprobs, logprobs, "k3"), mask)
    return loss, clip_fraction.detach(), approx_kl.detach()


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    cliprange_value: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """0.5·E[max((V − R)², (clip(V, V_old ± ε) − R)²)]: V moves at most ε per rollout; also the clip fraction."""
    squared_error = (values - returns) ** 2
    if cliprange_value is None:
        return 0.5 * masked_mean(squared_error, mask), torch.zeros((), device=values.device)
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    clipped_squared_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(squared_error, clipped_squared_error), mask)
    clip_fraction = masked_mean((clipped_squared_error > squared_error).float(), mask)
    return loss, clip_fraction.detach()


def explained_variance(predictions: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                       sum_over_processes: SumOverProcesses = _no_reduce) -> torch.Tensor:
    """1 − Var[R − V]/Var[R] over valid tokens: 1 is a perfect critic, 0 no better than a constant, < 0 worse."""
    target_var = masked_var(targets, mask, sum_over_processes=sum_over_processes)
    residual_var = masked_var(targets - predictions, mask, sum_over_processes=sum_over_processes)
    return 1.0 - residual_var / target_var.clamp(min=1e-8)


def adaptive_kl_coef(kl_coef: float, kl: float, target: float, horizon: float, episodes: int) -> float:
    """Ziegler et al. (2019)'s KL controller: β ← β·(1 + clip(KL/target − 1, ±0.2)·episodes/horizon).

    `kl` is this step's mean KL per answer and `episodes` the answers it was measured on: β grows while the
    policy is further from the reference than `target` and shrinks while it is closer, at most 20% of
    episodes/horizon per step.
    """
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * episodes / horizon)
