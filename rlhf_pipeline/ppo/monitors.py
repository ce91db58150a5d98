"""PPO health monitors: thresholds on the logged statistics that flag a run going wrong.

RLHF runs fail quietly. The policy drifts far from the reference (KL), collapses onto a few tokens
(entropy), learns that longer or unfinished answers score higher (length drift, missing stop token), or
its score jumps at once (it found a flaw in the reward model), or the engine that samples its answers drifts from
it (a stale weight sync, a lossy dtype). Each monitor compares one number of a log
entry with a threshold from `PPOConfig`; all thresholds are off (None) by default, except `max_logprob_gap`,
which only a sampling engine that reports its own log-probs (vLLM) can trip. A value that is not
finite (NaN, inf) trips any monitor that watches it.

Monitors read only the log history (this entry plus the earlier ones), so a resumed run judges exactly
as the uninterrupted one would.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rlhf_pipeline.ppo.config import PPOConfig

Entry = dict[str, Any]


Reading = tuple[float, str] | None  # (value, what it means in words), or None when there is nothing to judge


@dataclass(frozen=True)
class Monitor:
    """One health check: the PPOConfig field holding its threshold, how to read the value, what to do."""

    name: str
    upper: bool  # True: alert above the threshold; False: alert below it
    read: Callable[[Entry, Entry, Entry | None], Reading]  # (this entry, first entry, previous entry)
    advice: str


def _kl(entry: Entry, _first: Entry, _previous: Entry | None) -> Reading:
    value = entry["objective/kl"]
    return value, f"mean KL to the reference {value:.4g} nats per answer"


def _entropy(entry: Entry, _first: Entry, _previous: Entry | None) -> Reading:
    value = entry["objective/entropy"]
    return value, f"policy entropy {value:.4g} nats per token"


def _length_drift(entry: Entry, first: Entry, _previous: Entry | None) -> Reading:
    """Relative change of the mean answer length since the first log entry."""
    start, now = first["response/length"], entry["response/length"]
    value = abs(now - start) / max(start, 1e-8)
    return value, f"mean answer length {now:.1f} tokens, {value:.0%} away from {start:.1f} at step {first['step']}"


def _missing_eos(entry: Entry, _first: Entry, _previous: Entry | None) -> Reading:
    value = 1.0 - entry["response/eos_fraction"]
    return value, f"{value:.0%} of answers end without the stop token"


def _reward_jump(entry: Entry, _first: Entry, previous: Entry | None) -> Reading:
    """|Δ mean score| between consecutive log entries, in units of the pooled within-batch score std."""
    if previous is None:
        return None
    delta = entry["objective/scores"] - previous["objective/scores"]
    pooled = math.sqrt((entry["objective/scores_std"] ** 2 + previous["objective/scores_std"] ** 2) / 2)
    value = abs(delta) / max(pooled, 1e-8)
    return value, f"mean score moved {delta:+.4g} ({value:.3g} std) since step {previous['step']}"


def _logprob_gap(entry: Entry, _first: Entry, _previous: Entry | None) -> Reading:
    """Only engines that report log-probs (vLLM) log the gap; Hugging Face samples from the training model itself."""
    if "generation/logprob_gap" not in entry:
        return None
    value = entry["generation/logprob_gap"]
    return value, f"the sampling engine's log-probs differ from the policy's by {value:.3g} nats per token"


MONITORS: tuple[Monitor, ...] = (
    Monitor("max_kl", True, _kl,
            "the policy is drifting away from the SFT model; raise kl_coef or lower learning_rate"),
    Monitor("min_entropy", False, _entropy,
            "the policy is collapsing onto a few tokens; lower learning_rate or raise kl_coef"),
    Monitor("max_length_drift", True, _length_drift,
            "the policy may be exploiting a length bias of the reward model; read the samples, raise kl_coef"),
    Monitor("max_missing_eos_fraction", True, _missing_eos, "raise missing_eos_penalty or response_length"),
    Monitor("max_reward_jump", True, _reward_jump,
            "a sudden jump often means the policy found a flaw in the reward model; read the samples"),
    Monitor("max_logprob_gap", True, _logprob_gap,
            "the engine samples from another policy than the one trained (a stale sync, a lossy dtype): check "
            "generation.sync, or set generation.dtype: float32"),
)
MONITOR_NAMES = tuple(m.name for m in MONITORS)


def check_health(config: PPOConfig, entry: Entry, earlier: Sequence[Entry]) -> list[dict[str, Any]]:
    """Alerts for one numeric log entry, given the numeric entries logged before it (oldest first).

    Each alert is {"monitor", "value", "threshold", "message"}; the message says what to change.
    """
    first = earlier[0] if earlier else entry
    previous = earlier[-1] if earlier else None
    alerts = []
    for monitor in MONITORS:
        threshold = getattr(config, monitor.name, None)  # a config without the field: that monitor is off
        reading = monitor.read(entry, first, previous) if threshold is not None else None
        if reading is None:
            continue
        value, meaning = reading
        if not math.isfinite(value):
            relation = "is not finite"
        elif value > threshold if monitor.upper else value < threshold:
            relation = f"{'>' if monitor.upper else '<'} {monitor.name} {threshold:g}"
        else:
            continue
        alerts.append({"monitor": monitor.name, "value": value, "threshold": threshold,
                       "message": f"{meaning} {relation}: {monitor.advice}"})
    return alerts
