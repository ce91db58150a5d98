"""PPO health monitors on hand-made log entries: each fires past its threshold, stays quiet below it."""

from __future__ import annotations

import math
from typing import Any

import pytest

from rlhf_pipeline.ppo.config import PPOConfig
from rlhf_pipeline.ppo.monitors import MONITOR_NAMES, check_health


def entry(step: int, **values: float) -> dict[str, Any]:
    healthy = {"objective/kl": 0.5, "objective/entropy": 2.0, "response/length": 20.0,
               "response/eos_fraction": 0.95, "objective/scores": 0.1, "objective/scores_std": 1.0}
    return {"step": step, **healthy, **{key.replace("__", "/"): value for key, value in values.items()}}


def fired(config: PPOConfig, current: dict[str, Any], *earlier: dict[str, Any]) -> list[str]:
    return [alert["monitor"] for alert in check_health(config, current, list(earlier))]


def test_monitors_are_off_by_default_and_never_fire_on_a_healthy_run() -> None:
    config = PPOConfig()
    assert all(getattr(config, name) is None for name in MONITOR_NAMES if name != "max_logprob_gap")
    assert config.max_logprob_gap == 0.05 and config.early_stop_on_alert is False  # read only where an engine logs it
    wild = entry(3, objective__kl=1e6, objective__entropy=0.0, response__length=500.0, response__eos_fraction=0.0)
    assert fired(config, wild, entry(1), entry(2)) == []
    lenient = PPOConfig(max_kl=5.0, min_entropy=0.1, max_length_drift=0.5, max_missing_eos_fraction=0.5,
                        max_reward_jump=3.0)
    assert fired(lenient, entry(3, objective__scores=0.4), entry(1), entry(2)) == []


@pytest.mark.parametrize(
    ("threshold", "values", "monitor"),
    [({"max_kl": 1.0}, {"objective__kl": 1.5}, "max_kl"),
     ({"min_entropy": 1.0}, {"objective__entropy": 0.4}, "min_entropy"),
     ({"max_length_drift": 0.5}, {"response__length": 31.0}, "max_length_drift"),  # +55% of 20 tokens
     ({"max_length_drift": 0.5}, {"response__length": 9.0}, "max_length_drift"),  # -55%
     ({"max_missing_eos_fraction": 0.2}, {"response__eos_fraction": 0.7}, "max_missing_eos_fraction"),
     ({}, {"generation__logprob_gap": 0.2}, "max_logprob_gap"),  # on by default: a stale or lossy engine
     ({"max_reward_jump": 2.0}, {"objective__scores": 2.6}, "max_reward_jump")],  # 2.5 std above step 2
)
def test_each_monitor_fires_past_its_threshold(threshold: dict[str, float], values: dict[str, float],
                                               monitor: str) -> None:
    config = PPOConfig(**threshold)
    alerts = check_health(config, entry(3, **values), [entry(1), entry(2)])
    assert [a["monitor"] for a in alerts] == [monitor]
    assert alerts[0]["threshold"] == threshold.get(monitor, 0.05)
    assert monitor in alerts[0]["message"]


def test_values_are_measured_against_the_first_and_previous_entries() -> None:
    config = PPOConfig(max_length_drift=0.5, max_reward_jump=1.0)
    first, previous = entry(1, response__length=10.0), entry(2, objective__scores=1.0, objective__scores_std=0.5)
    alerts = {a["monitor"]: a for a in check_health(config, entry(3, response__length=16.0,
                                                                  objective__scores=2.0), [first, previous])}
    assert alerts["max_length_drift"]["value"] == pytest.approx(0.6)
    assert alerts["max_reward_jump"]["value"] == pytest.approx(1.0 / math.sqrt((0.5**2 + 1.0**2) / 2))
    assert "since step 2" in alerts["max_reward_jump"]["message"]
    assert fired(config, entry(1, objective__scores=50.0)) == []  # the first entry has nothing to jump from


def test_non_finite_values_trip_the_monitor_that_watches_them() -> None:
    alerts = check_health(PPOConfig(max_kl=10.0), entry(2, objective__kl=float("nan")), [entry(1)])
    assert [a["monitor"] for a in alerts] == ["max_kl"] and "not finite" in alerts[0]["message"]


@pytest.mark.parametrize(("overrides", "field"),
                         [({"max_kl": 0.0}, "max_kl"), ({"min_entropy": -1.0}, "min_entropy"),
                          ({"max_missing_eos_fraction": 1.0}, "max_missing_eos_fraction"),
                          ({"max_missing_eos_fraction": 0.1, "stop_token": None}, "max_missing_eos_fraction")])
def test_threshold_errors_name_the_field(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        PPOConfig(**overrides)
