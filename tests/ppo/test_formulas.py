"""Each PPO formula against a direct, loop-by-loop transcription of its textbook definition."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest
import torch

from rlhf_pipeline.ppo.formulas import (
    adaptive_kl_coef,
    dense_token_rewards,
    explained_variance,
    gae_advantages_and_returns,
    kl_penalty,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    token_rewards,
    value_loss,
)
from tests.two_processes import launch_two_processes

LENGTHS = [5, 3, 1, 4]  # valid tokens per right-padded row; width 5


def right_padded_mask(lengths: list[int], width: int = 5) -> torch.Tensor:
    return torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]


def with_garbage_padding(values: torch.Tensor, mask: torch.Tensor, garbage: float) -> torch.Tensor:
    return torch.where(mask, values, torch.full_like(values, garbage))


def valid_items(values: torch.Tensor, lengths: list[int]) -> list[float]:
    return [values[row, t].item() for row, length in enumerate(lengths) for t in range(length)]


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    return torch.randn(len(LENGTHS), 5, dtype=torch.float64), right_padded_mask(LENGTHS)


@pytest.mark.parametrize("garbage", [0.0, 1e6, math.inf, math.nan])
def test_masked_statistics_ignore_padding(batch: tuple[torch.Tensor, torch.Tensor], garbage: float) -> None:
    values, mask = batch
    padded = with_garbage_padding(values, mask, garbage)
    items = valid_items(values, LENGTHS)
    assert masked_mean(padded, mask).item() == pytest.approx(statistics.fmean(items))
    assert masked_var(padded, mask).item() == pytest.approx(statistics.variance(items))
    assert masked_var(padded, mask, unbiased=False).item() == pytest.approx(statistics.pvariance(items))
    row_means = masked_mean(padded, mask, dim=1)
    for row, length in enumerate(LENGTHS):
        assert row_means[row].item() == pytest.approx(statistics.fmean(values[row, :length].tolist()))


@pytest.mark.parametrize("garbage", [0.0, -1e6, math.nan])
def test_masked_whiten_uses_valid_tokens_only(batch: tuple[torch.Tensor, torch.Tensor], garbage: float) -> None:
    values, mask = batch
    padded = with_garbage_padding(values, mask, garbage)
    items = valid_items(values, LENGTHS)
    mean, std = statistics.fmean(items), statistics.stdev(items)

    whitened = masked_whiten(padded, mask)
    expected = [(x - mean) / std for x in items]
    assert valid_items(whitened, LENGTHS) == pytest.approx(expected, abs=1e-6)
    assert (whitened[~mask] == 0).all()

    kept = valid_items(masked_whiten(padded, mask, shift_mean=False), LENGTHS)
    assert statistics.fmean(kept) == pytest.approx(mean)  # the batch mean stays
    assert statistics.stdev(kept) == pytest.approx(1.0)  # the spread is rescaled to one


def test_whitening_that_keeps_the_mean_does_not_keep_signs() -> None:
    """What the docstring warns of: a small negative reward in a wide batch with a positive mean turns positive."""
    rewards = torch.tensor([[-0.1, -3.0, 2.1, 3.0]], dtype=torch.float64)
    kept = masked_whiten(rewards, torch.ones_like(rewards, dtype=torch.bool), shift_mean=False)
    assert rewards[0, 0] < 0 < kept[0, 0]


_SHARDED = """
import sys
import torch
import torch.distributed as dist
from rlhf_pipeline.ppo.formulas import explained_variance, masked_whiten
dist.init_process_group("gloo")
rank = dist.get_rank()
values, targets, mask = torch.load(sys.argv[1])
rows = slice(0, 2) if rank == 0 else slice(2, None)  # shards of unequal size and token count


def total(tensor):
    dist.all_reduce(tensor)
    return tensor


result = {"global": masked_whiten(values[rows], mask[rows], sum_over_processes=total),
          "kept_mean": masked_whiten(values[rows], mask[rows], shift_mean=False, sum_over_processes=total),
          "local": masked_whiten(values[rows], mask[rows]),
          "ev": explained_variance(values[rows], targets[rows], mask[rows], sum_over_processes=total)}
torch.save(result, sys.argv[2] + f".{rank}")
dist.barrier()  # neither rank leaves while the other still talks to it (gloo aborts the process otherwise)
dist.destroy_process_group()
"""


def test_two_processes_whiten_with_the_statistics_of_the_whole_batch(batch: tuple[torch.Tensor, torch.Tensor],
                                                                     tmp_path: Path) -> None:
    """Two real processes over gloo, each with part of the rows, give what one process gives on all of them."""
    values, mask = batch
    targets = values + 0.3 * torch.randn_like(values)
    torch.save((values, targets, mask), tmp_path / "batch.pt")
    script = tmp_path / "sharded.py"
    script.write_text(_SHARDED)
    launch_two_processes(script, str(tmp_path / "batch.pt"), str(tmp_path / "out"), timeout=120)
    ranks = [torch.load(tmp_path / f"out.{rank}") for rank in (0, 1)]
    for name, shift_mean in (("global", True), ("kept_mean", False)):
        joined = torch.cat([part[name] for part in ranks])
        torch.testing.assert_close(joined, masked_whiten(values, mask, shift_mean=shift_mean))
    assert not torch.allclose(torch.cat([part["local"] for part in ranks]), masked_whiten(values, mask))
    for part in ranks:
        torch.testing.assert_close(part["ev"], explained_variance(values, targets, mask))


def gae_reference(rewards: list[float], values: list[float], gamma: float, lam: float) -> list[float]:
    """A_t = Σ_l (γλ)^l δ_{t+l} with δ_t = r_t + γ V_{t+1} − V_t and V = 0 past the end: a plain double loop."""
    length = len(rewards)
    deltas = [rewards[t] + gamma * (values[t + 1] if t + 1 < length else 0.0) - values[t] for t in range(length)]
    return [sum((gamma * lam) ** k * deltas[t + k] for k in range(length - t)) for t in range(length)]


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_double_loop_on_variable_lengths(batch: tuple[torch.Tensor, torch.Tensor], gamma: float,
                                                     lam: float) -> None:
    values, mask = batch
    torch.manual_seed(1)
    rewards = torch.randn_like(values)
    advantages, returns = gae_advantages_and_returns(
        with_garbage_padding(rewards, mask, 1e3), with_garbage_padding(values, mask, -1e3), mask, gamma, lam
    )
    for row, length in enumerate(LENGTHS):
        expected = gae_reference(rewards[row, :length].tolist(), values[row, :length].tolist(), gamma, lam)
        assert advantages[row, :length].tolist() == pytest.approx(expected, abs=1e-9)
        assert returns[row, :length].tolist() == pytest.approx(
            [a + v for a, v in zip(expected, values[row, :length].tolist(), strict=True)], abs=1e-9
        )
    assert (advantages[~mask] == 0).all() and (returns[~mask] == 0).all()


def test_gae_with_lambda_one_and_gamma_one_is_reward_to_go_minus_value() -> None:
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.2, 0.1, 9.0]])
    mask = right_padded_mask([3], width=4)
    advantages, returns = gae_advantages_and_returns(rewards, values, mask, gamma=1.0, lam=1.0)
    assert advantages[0, :3].tolist() == pytest.approx([0.5, 0.8, 0.9])
    assert returns[0, :3].tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_token_rewards_put_the_score_on_the_last_valid_token(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    kl, mask = batch
    scores = torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=torch.float64)
    rewards = token_rewards(scores, with_garbage_padding(kl, mask, math.nan), mask, kl_coef=0.1)
    for row, length in enumerate(LENGTHS):
        for t in range(5):
            expected = -0.1 * kl[row, t].item() + (scores[row].item() if t == length - 1 else 0.0)
            assert rewards[row, t].item() == pytest.approx(expected if t < length else 0.0)


def test_dense_rewards_land_on_the_tokens_that_end_each_step(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Step rewards at the step ends, −β·KL everywhere, the score at the end; returns = rewards still to come."""
    kl, mask = batch
    scores = torch.tensor([1.0, 0.0, -1.0, 0.5], dtype=torch.float64)
    step_ends = {0: {1: -0.2, 4: -0.05}, 1: {0: -1.5, 2: -0.1}, 2: {0: -0.3}, 3: {3: -2.0}}  # row -> {token: reward}
    step_rewards = torch.full_like(kl, math.nan)  # padding never counts, whatever it holds
    for row, ends in step_ends.items():
        step_rewards[row, : LENGTHS[row]] = 0.0
        for t, value in ends.items():
            step_rewards[row, t] = value
    rewards = dense_token_rewards(scores, step_rewards, with_garbage_padding(kl, mask, math.nan), mask, kl_coef=0.1)
    _, returns = gae_advantages_and_returns(rewards, torch.zeros_like(kl), mask, gamma=1.0, lam=1.0)
    for row, length in enumerate(LENGTHS):
        direct = [-0.1 * kl[row, t].item() + step_ends[row].get(t, 0.0) + (scores[row].item() if t == length - 1
                                                                            else 0.0) for t in range(length)]
        assert rewards[row, :length].tolist() == pytest.approx(direct)
        assert rewards[row, length:].tolist() == [0.0] * (5 - length)
        assert returns[row, :length].tolist() == pytest.approx([sum(direct[t:]) for t in range(length)])
    no_steps = torch.zeros_like(kl)
    assert torch.equal(dense_token_rewards(scores, no_steps, kl, mask, 0.1), token_rewards(scores, kl, mask, 0.1))


def test_kl_estimators_match_their_formulas_and_the_true_kl() -> None:
    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.5, -1.0, -0.5])
    assert kl_penalty(logp, ref, "k1").tolist() == pytest.approx([0.5, -1.0, 0.0])
    ratios = [math.exp(r - p) for p, r in zip(logp.tolist(), ref.tolist(), strict=True)]
    assert kl_penalty(logp, ref, "k3").tolist() == pytest.approx([(r - 1) - math.log(r) for r in ratios])
    assert (kl_penalty(logp, ref, "k3") >= 0).all()
    with pytest.raises(ValueError, match="kl_estimator"):
        kl_penalty(logp, ref, "k2")  # type: ignore[arg-type]

    # Both are unbiased estimators of KL(π‖π_ref) on tokens sampled from π.
    torch.manual_seed(0)
    policy = torch.log_softmax(torch.randn(6), dim=0)
    reference = torch.log_softmax(torch.randn(6), dim=0)
    true_kl = (policy.exp() * (policy - reference)).sum().item()
    tokens = torch.multinomial(policy.exp(), 200_000, replacement=True)
    for estimator in ("k1", "k3"):
        estimate = kl_penalty(policy[tokens], reference[tokens], estimator).mean().item()
        assert estimate == pytest.approx(true_kl, abs=0.02)


def test_clipped_surrogate_value_and_gradients() -> None:
    # token:            in range  above, A>0  below, A<0  below, A>0  above, A<0  padding
    ratios = torch.tensor([[1.1, 1.5, 0.5, 0.5, 1.5, 3.0]], dtype=torch.float64)
    advantages = torch.tensor([[1.0, 2.0, -1.0, 1.0, -2.0, 5.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, True, True, False]])
    old_logprobs = torch.full_like(ratios, -1.0)
    logprobs = (old_logprobs + ratios.log()).requires_grad_()

    loss, clip_fraction, approx_kl = policy_loss(logprobs, old_logprobs, advantages, mask, cliprange=0.2)

    terms = []
    for r, a in zip(ratios[0, :5].tolist(), advantages[0, :5].tolist(), strict=True):
        terms.append(max(-a * r, -a * min(max(r, 0.8), 1.2)))
    assert loss.item() == pytest.approx(statistics.fmean(terms))
    assert clip_fraction.item() == pytest.approx(2 / 5)
    assert approx_kl.item() == pytest.approx(statistics.fmean((r - 1) - math.log(r) for r in ratios[0, :5].tolist()))

    loss.backward()
    grad = logprobs.grad[0]
    assert grad[1] == 0 and grad[2] == 0, "a clipped ratio must contribute no gradient"
    assert grad[5] == 0, "padding must contribute no gradient"
    # Unclipped tokens: d(−A·r)/d log π = −A·r, averaged over the 5 valid tokens.
    for t in (0, 3, 4):
        expected = -advantages[0, t].item() * ratios[0, t].item() / 5
        assert grad[t].item() == pytest.approx(expected)


def test_clipped_value_loss_value_and_gradients() -> None:
    old_values = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    values = torch.tensor([[0.1, 0.5, -0.5, 0.5, 7.0]], dtype=torch.float64, requires_grad=True)
    returns = torch.tensor([[0.0, 1.0, 0.0, -1.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, True, False]])

    loss, clip_fraction = value_loss(values, old_values, returns, mask, cliprange_value=0.2)

    terms = []
    for v, v_old, ret in zip(values[0, :4].tolist(), old_values[0, :4].tolist(), returns[0, :4].tolist(), strict=True):
        clipped = v_old + min(max(v - v_old, -0.2), 0.2)
        terms.append(0.5 * max((v - ret) ** 2, (clipped - ret) ** 2))
    assert loss.item() == pytest.approx(statistics.fmean(terms))
    # Token 1 moved 0.5 towards its return: the clipped (worse) error wins and stops the gradient.
    assert clip_fraction.item() == pytest.approx(1 / 4)
    loss.backward()
    assert values.grad[0, 1] == 0 and values.grad[0, 4] == 0
    for t in (0, 2, 3):
        assert values.grad[0, t].item() == pytest.approx((values[0, t] - returns[0, t]).item() / 4)

    unclipped, zero = value_loss(values, old_values, returns, mask, cliprange_value=None)
    assert unclipped.item() == pytest.approx(statistics.fmean(0.5 * (v - r) ** 2 for v, r in
                                                              zip(values[0, :4].tolist(), returns[0, :4].tolist(),
                                                                  strict=True)))
    assert zero.item() == 0


def test_explained_variance_of_perfect_and_constant_critics(batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    returns, mask = batch
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    constant = torch.full_like(returns, masked_mean(returns, mask).item())
    assert explained_variance(constant, returns, mask).item() == pytest.approx(0.0, abs=1e-9)
    noisy = with_garbage_padding(returns + 0.1, mask, math.nan)
    assert explained_variance(noisy, returns, mask).item() == pytest.approx(1.0)


@pytest.mark.parametrize(("kl", "expected_error"), [(12.0, 0.2), (6.6, 0.1), (6.0, 0.0), (5.4, -0.1), (0.0, -0.2)])
def test_adaptive_kl_coefficient_moves_by_the_clipped_proportional_error(kl: float, expected_error: float) -> None:
    """Ziegler et al.: e = clip(KL/target − 1, ±0.2), β ← β(1 + e·n/horizon); target 6, n 100, horizon 1000."""
    assert adaptive_kl_coef(0.1, kl, target=6.0, horizon=1000, episodes=100) == pytest.approx(
        0.1 * (1 + expected_error * 100 / 1000))
